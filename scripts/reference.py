import qatforge.quiet  # noqa: F401
from qatforge.reference import build
from qatforge.runlog import logged

with logged(snakemake) as log:
    p = snakemake.params
    info = build(
        snakemake.input.merged,
        snakemake.input.test,
        snakemake.output[0],
        n_prompts=p.n_prompts,
        n_nll=p.n_nll,
        max_new_tokens=p.max_new_tokens,
        max_len=p.max_tokens,
        top_k=p.top_k,
        tail_samples=p.tail_samples,
        threads=snakemake.threads,
    )
    log.info("reference: %s", info)

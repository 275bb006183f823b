from qatforge.select import select_best
from qatforge.runlog import logged

with logged(snakemake) as log:
    p = snakemake.params
    best = select_best(
        snakemake.input.base,
        snakemake.input.checkpoints,
        snakemake.input.dev,
        snakemake.output[0],
        metric=p.metric,
        pinned=p.pinned,
        n_prompts=p.n_prompts,
        max_new_tokens=p.max_new_tokens,
        max_len=p.max_tokens,
        qat_scheme=p.qat_scheme,
        qat_mode=p.qat_mode,
        step0=p.step0,
        threads=snakemake.threads,
    )
    log.info("selected %s", best.get("selected"))

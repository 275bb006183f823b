import qatforge.quiet  # noqa: F401
from qatforge.select import select_best
from qatforge.runlog import logged
from qatforge.train import TrainSettings

with logged(snakemake) as log:
    p = snakemake.params
    best = select_best(
        snakemake.input.base,
        snakemake.input.checkpoints,
        snakemake.input.dev,
        snakemake.output[0],
        settings=TrainSettings.from_config(p.settings, threads=snakemake.threads, max_len=p.max_tokens),
        metric=p.metric,
        pinned=p.pinned,
        n_prompts=p.n_prompts,
        n_eval=p.n_eval,
        max_new_tokens=p.max_new_tokens,
    )
    log.info("selected %s", best.get("selected"))

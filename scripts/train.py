import qatforge.quiet  # noqa: F401
from qatforge.train import TrainSettings, train_run
from qatforge.runlog import logged

with logged(snakemake) as log:
    p = snakemake.params
    settings = TrainSettings.from_config(p.settings, threads=snakemake.threads, max_len=p.max_tokens)
    train_run(
        snakemake.input.base,
        snakemake.input.train,
        snakemake.input.dev,
        snakemake.output[0],
        settings,
        work_dir=p.work_dir,
        log=log.info,
    )

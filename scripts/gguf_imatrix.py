import qatforge.quiet  # noqa: F401
from qatforge.export.gguf import imatrix_from_parquet
from qatforge.runlog import logged

with logged(snakemake) as log:
    p = snakemake.params
    info = imatrix_from_parquet(
        snakemake.input.gguf,
        snakemake.input.train,
        snakemake.output[0],
        chunks=p.chunks,
        ctx=p.ctx,
        seed=p.seed,
        threads=snakemake.threads,
        log=log.info,
    )
    log.info("imatrix: %s", info)

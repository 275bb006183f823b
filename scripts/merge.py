import qatforge.quiet  # noqa: F401
from qatforge.merge import merge
from qatforge.runlog import logged
from qatforge.select import best_checkpoint_dir

with logged(snakemake) as log:
    adapter = best_checkpoint_dir(snakemake.input.best, snakemake.input.checkpoints)
    run, scheme = snakemake.wildcards.run, snakemake.params.qat_scheme
    info = merge(
        snakemake.input.base,
        adapter,
        snakemake.output[0],
        qat_scheme=scheme,
        trust_remote_code=snakemake.params.trust_remote_code,
        provenance={"run": run, "checkpoint": adapter.name if adapter else "step-0", "qat_scheme": scheme},
        threads=snakemake.threads,
        log=log.info,
    )
    log.info("merged %s: %s", adapter, info)

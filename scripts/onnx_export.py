import qatforge.quiet  # noqa: F401
from qatforge.export.onnx import export
from qatforge.runlog import logged

with logged(snakemake) as log:
    info = export(snakemake.input.merged, snakemake.output[0], snakemake.params.settings,
                  variant=snakemake.wildcards.variant, threads=snakemake.threads, log=log.info)
    log.info("onnx %s: %s", snakemake.wildcards.variant, info)

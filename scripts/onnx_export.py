from qatforge.export.onnx import export
from qatforge.runlog import logged

with logged(snakemake) as log:
    info = export(snakemake.input.merged, snakemake.output[0], threads=snakemake.threads, log=log.info)
    log.info("onnx: %s", info)

from qatforge.export.onnx import quantize_int8
from qatforge.runlog import logged

with logged(snakemake) as log:
    info = quantize_int8(snakemake.input.fp32, snakemake.output[0], log=log.info)
    log.info("onnx int8: %s", info)

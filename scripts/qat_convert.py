from qatforge.qat import qat_convert
from qatforge.runlog import logged

with logged(snakemake) as log:
    info = qat_convert(snakemake.input.merged, snakemake.output[0], snakemake.params.scheme)
    log.info("qat_convert: %s", info)

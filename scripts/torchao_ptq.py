import qatforge.quiet  # noqa: F401
from qatforge.export.torchao import ptq
from qatforge.runlog import logged

with logged(snakemake) as log:
    info = ptq(snakemake.input.merged, snakemake.output[0], snakemake.wildcards.scheme, log=log.info)
    log.info("torchao: %s", info)

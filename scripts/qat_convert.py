from qatforge.qat import qat_convert
from qatforge.runlog import logged

with logged(snakemake) as log:
    info = qat_convert(
        snakemake.input.merged,
        snakemake.output[0],
        snakemake.params.scheme,
        provenance={"run": snakemake.wildcards.run, "qat_scheme": snakemake.params.scheme},
        threads=snakemake.threads,
        log=log.info,
    )
    log.info("qat_convert: %s", info)

import qatforge.quiet  # noqa: F401
from qatforge.export.record import source_record
from qatforge.export.torchao import qat_convert
from qatforge.runlog import logged

with logged(snakemake) as log:
    merged = snakemake.input.merged
    info = qat_convert(
        merged,
        snakemake.output[0],
        snakemake.params.scheme,
        provenance=source_record(merged),  # run, checkpoint and hash of the merged source of truth
        threads=snakemake.threads,
        log=log.info,
    )
    log.info("qat_convert: %s", info)

from qatforge.export.gguf import convert
from qatforge.runlog import logged

with logged(snakemake) as log:
    p = snakemake.params
    info = convert(
        snakemake.input.merged,
        snakemake.output.gguf,
        outtype=p.outtype,
        pre_tokenizer=p.pre_tokenizer,
        log=log.info,
    )
    log.info("converted: %s", info)

import qatforge.quiet  # noqa: F401
from qatforge.export.gguf import convert, parity_texts_from_parquet
from qatforge.runlog import logged

with logged(snakemake) as log:
    p = snakemake.params
    merged = snakemake.input.merged
    info = convert(
        merged,
        snakemake.output.gguf,
        outtype=p.outtype,
        pre_tokenizer=p.pre_tokenizer,
        model_name=p.model_name,
        parity_texts=parity_texts_from_parquet(snakemake.input.dev, merged),
        log=log.info,
    )
    log.info("converted: %s", info)

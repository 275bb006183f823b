import qatforge.quiet  # noqa: F401
from qatforge.export.gguf.precheck import check_base
from qatforge.runlog import logged

with logged(snakemake) as log:
    p = snakemake.params
    info = check_base(
        snakemake.input.base,
        snakemake.input.dev,
        snakemake.output[0],
        outtype=p.outtype,
        pre_tokenizer=p.pre_tokenizer,
        model_name=p.model_name,
        runs=p.plan,
        log=log.info,
    )
    log.info("GGUF checks of the base passed in %s s", info["seconds"])

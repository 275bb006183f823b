from qatforge.data import prepare
from qatforge.io import write_json
from qatforge.runlog import logged

with logged(snakemake) as log:
    p = snakemake.params
    summary = prepare(
        snakemake.input.data,
        snakemake.output.train,
        snakemake.output.eval,
        seed=p.seed,
        eval_fraction=p.eval_fraction,
        max_tokens=p.max_tokens,
        on_bad_rows=p.on_bad_rows,
    )
    log.info("prepared data: %s", summary)
    write_json(snakemake.output.summary, summary)

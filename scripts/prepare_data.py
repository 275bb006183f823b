import qatforge.quiet  # noqa: F401
from qatforge.data import prepare
from qatforge.io import write_json
from qatforge.runlog import logged

with logged(snakemake) as log:
    p = snakemake.params
    out = snakemake.output
    summary = prepare(
        snakemake.input.data,
        out.train,
        out.dev,
        out.test,
        dev_fraction=p.dev_fraction,
        test_fraction=p.test_fraction,
        max_tokens=p.max_tokens,
        on_bad_rows=p.on_bad_rows,
        data_format=p.data_format,
        n_prompts=snakemake.config["eval"]["n_prompts"],
        n_nll=snakemake.config["eval"]["n_nll"],
    )
    log.info("format %s; %d rows read, %d dropped (%s)", summary["format"], summary["rows_read"],
             summary["rows_dropped"], summary["dropped_by_reason"])
    log.info("split: train %d, dev %d, test %d; dropped for leakage (a test or dev question in a user turn): "
             "train %d, dev %d", summary["train_rows"], summary["dev_rows"], summary["test_rows"],
             summary["leakage_dropped"]["train"], summary["leakage_dropped"]["dev"])
    log.info("prepared data: %s", summary)
    write_json(out.summary, summary)

from pathlib import Path

import qatforge.quiet  # noqa: F401
from qatforge.report import build_report
from qatforge.runlog import logged

with logged(snakemake) as log:
    out = snakemake.output
    summary = build_report(
        snakemake.input.evals,
        out.csv,
        out.md,
        Path(out.pareto).parent,
        out_qat_csv=out.qat_csv,
        accuracy_margin=snakemake.params.accuracy_margin,
        fail_on_parity=snakemake.params.fail_on_parity,
        skipped=dict(snakemake.params.skipped),
    )
    log.info("report: %s", summary)

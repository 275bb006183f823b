from pathlib import Path

from qatforge.report import build_report
from qatforge.runlog import logged

with logged(snakemake) as log:
    out = snakemake.output
    summary = build_report(
        [Path(f) for f in snakemake.input.evals],
        out.csv,
        out.md,
        pareto_png=out.pareto,
        speed_png=out.speed,
        accuracy_margin=snakemake.params.accuracy_margin,
        log=log.info,
    )
    log.info("report: %s", summary)

"""The polars report: one row per evaluated artifact, losses against the merged model, base vs
fine-tuned, QAT vs PTQ, a recommendation, plots, gate.

Inputs are only the per-artifact evaluation JSONs (``qatforge.evaluate.run.run_eval``) plus a few
parameters, so a change to one artifact reruns only its evaluation and this aggregation.

``load`` reads the JSONs into rows and the frame, ``stats`` holds the paired bootstrap, ``compare``
the comparisons across rows, the recommendation and the QAT/PTQ verdict, ``markdown`` and ``plots`` the report's
sections and figures, ``build`` writes the report and ``gate`` checks it.
"""

from qatforge.report.build import build_report
from qatforge.report.compare import (QAT_VS_PTQ_COLUMNS, TARGETS, UNMATCHED, add_losses, base_vs_finetuned,
                                     baseline_run, qat_vs_ptq, qat_vs_ptq_frame, recommend, to_baseline, verdict)
from qatforge.report.gate import parity_gate
from qatforge.report.load import EXTRA_COLUMNS, FORMAT_ORDER, NO_SCHEME, load_evals, to_frame
from qatforge.report.markdown import markdown_table
from qatforge.report.plots import PALETTE, make_plots, pareto_front
from qatforge.report.stats import BOOTSTRAP, bootstrap_ci, paired_loss, paired_losses, recovery_difference

__all__ = [
    "BOOTSTRAP", "EXTRA_COLUMNS", "FORMAT_ORDER", "NO_SCHEME", "PALETTE", "QAT_VS_PTQ_COLUMNS",
    "TARGETS", "UNMATCHED", "add_losses", "base_vs_finetuned", "baseline_run", "bootstrap_ci", "build_report",
    "load_evals", "make_plots", "markdown_table", "paired_loss", "paired_losses", "pareto_front", "parity_gate",
    "qat_vs_ptq", "qat_vs_ptq_frame", "recommend", "recovery_difference", "to_baseline", "to_frame", "verdict",
]

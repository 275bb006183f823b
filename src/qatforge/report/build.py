"""``build_report``: report.csv, report.md, qat_vs_ptq.csv and the plots from the evaluation JSONs."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from qatforge.io import atomic_file
from qatforge.report.compare import (add_losses, base_vs_finetuned, qat_vs_ptq, qat_vs_ptq_frame, recommend,
                                     verdict)
from qatforge.report.load import deployed, label, load_evals, to_frame
from qatforge.report.markdown import (base_section, loss_section, markdown_table, qat_section, recommend_section,
                                      speed_section, verdict_section)
from qatforge.report.plots import make_plots
from qatforge.spec.formats import lookup

log = logging.getLogger("qatforge.report")


def _row_dicts(df: Any, rows: Sequence[Mapping]) -> list[dict]:
    """Frame rows (sorted, typed) joined with the JSON extras they came from."""
    by_key = {(r["run"], r["format"], r["variant"]): r for r in rows}
    out = []
    for d in df.to_dicts():
        full = dict(by_key[(d["run"], d["format"], d["variant"])])
        full.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items() if k != "failures"})
        out.append(full)
    return out


def build_report(
    eval_jsons: Sequence[str | Path],
    out_csv: str | Path,
    out_md: str | Path,
    plots_dir: str | Path,
    *,
    out_qat_csv: str | Path | None = None,
    accuracy_margin: float,
    fail_on_parity: bool = True,
    seed: int = 0,
    skipped: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write report.csv, report.md, qat_vs_ptq.csv (``out_qat_csv``) and the plots from the
    per-artifact JSONs; return a summary. ``skipped`` ({format: reason}, formats.on_unsupported:
    skip) is listed in report.md; report.csv has no rows for those formats."""
    skipped = dict(skipped or {})
    raw = load_evals(eval_jsons)
    add_losses(raw, seed=seed)
    df = to_frame(raw)
    rows = _row_dicts(df, raw)
    judged = [r for r in rows if deployed(r)]
    failing = [r for r in judged if r["parity_pass"] is False]
    for r in failing:
        log.error("parity FAILED: %s: %s", label(r), "; ".join(r.get("failures") or []) or "no reason recorded")

    with atomic_file(out_csv) as tmp:
        df.write_csv(tmp)

    comparisons = qat_vs_ptq(rows, seed=seed)
    if out_qat_csv is not None:
        with atomic_file(out_qat_csv) as tmp:
            qat_vs_ptq_frame(comparisons).write_csv(tmp)
    gains = base_vs_finetuned(rows, seed=seed)
    rec = recommend(rows, accuracy_margin)
    for entry in rec["targets"].values():
        if entry["choice"] is None and entry["format"] in skipped:
            entry["reason"] = f"{entry['format']} skipped for this base (see Skipped formats)"
    plots = make_plots(rows, plots_dir, comparisons)

    md = ["# qatforge report", ""]
    n_ref = len(rows) - len(judged)
    md.append(f"{len(judged)} artifacts from {len({r['run'] for r in rows})} runs; "
              f"{len(judged) - len(failing)} pass parity, {len(failing)} fail"
              f"{f'; not judged: {n_ref} reference-only (the base model)' if n_ref else ''}. "
              f"Parity gate: {'on — the pipeline fails while any row fails' if fail_on_parity else 'off (report only)'}.")
    md.append("")
    if skipped:
        md += ["## Skipped formats", "", "Not built for this base (formats.on_unsupported: skip); report.csv has "
               "no rows for them:", ""]
        md += [f"- **{fmt}**{f' (and {also})' if (also := lookup(fmt).also_skipped) else ''}: {reason}"
               for fmt, reason in sorted(skipped.items())] + [""]
    if failing:
        md += ["## Parity failures", ""]
        for r in failing:
            md.append(f"- **{label(r)}**: {'; '.join(r.get('failures') or []) or 'no reason recorded'}")
        md.append("")
    md += ["## All artifacts", "",
           "Failing rows first. Quality: exact-match accuracy on the test prompts (greedy, the runtime's own "
           "chat template) and mean NLL / PPL at the answer positions of the test conversations. Parity against the "
           "run's reference (its merged model): KL divergence and top-1 agreement on identical token ids, "
           "share of identical greedy generations, and tokenizer/template parity. The hf/base row is the base "
           "model before fine-tuning: reference only, parity n/a. Speed: median tokens/s of the speed pass "
           "(its section).", "", markdown_table(rows), ""]
    md += base_section(gains)
    md += loss_section(rows)
    md += speed_section(rows)
    md += qat_section(comparisons)
    md += verdict_section(comparisons)
    md += recommend_section(rec)
    md += ["## Plots", ""]
    md += [f"![{p.stem}]({Path(os.path.relpath(p, Path(out_md).parent)).as_posix()})" for p in plots] + [""]
    with atomic_file(out_md) as tmp:
        tmp.write_text("\n".join(md))

    return {
        "rows": len(rows),
        "skipped": skipped,
        "failing": [label(r) for r in failing],
        "recommendation": {t: (label(e["choice"]) if e["choice"] else None) for t, e in rec["targets"].items()},
        "rollback": label(rec["baseline"]) if rec["baseline"] else None,
        "base_vs_finetuned": [{k: it[k] for k in ("run", "accuracy", "nll")} for it in gains],
        "qat_vs_ptq": [
            {k: it.get(k) for k in ("qat_run", "qat_mode", "baseline_run", "format", "variant", "accuracy", "nll",
                                    "kld", "twin", "missing", "unmatched")}
            | ({"ship": verdict(it)["ship"]} if it.get("qat") and not it.get("missing") else {})
            for it in comparisons
        ],
        "plots": [str(p) for p in plots],
    }

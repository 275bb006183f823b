"""Comparisons across rows: losses against the merged model, base vs fine-tuned, QAT vs PTQ, the
recommendation per deployment target."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from qatforge.report.load import NO_SCHEME, deployed
from qatforge.report.stats import paired_accuracy_losses, paired_kld_losses, paired_loss, paired_nll_losses
from qatforge.spec.formats import BASE_ARTIFACT, FORMATS, MERGED_ARTIFACT, lookup

# (label, format) of each deployment target, in the recommendation's order (formats.Format.label)
TARGETS = tuple((f.label, f.name) for f in sorted(FORMATS.values(), key=lambda f: f.rank) if f.label)
QAT_VS_PTQ_COLUMNS = ("qat_run", "qat_mode", "format", "variant", "metric", "ptq_loss", "qat_loss", "recovery",
                      "recovery_ci_low", "recovery_ci_high")
UNMATCHED = "PTQ of a QAT-trained model"


def _find(rows: Sequence[Mapping], run: str, fmt: str, variant: str) -> Mapping | None:
    for r in rows:
        if r["run"] == run and r["format"] == fmt and r["variant"] == variant:
            return r
    return None


def baseline_run(rows: Sequence[Mapping]) -> str | None:
    """The baseline run (``config.baseline_run``): the run of the base model's row, None without one."""
    return next((r["run"] for r in rows if (r["format"], r["variant"]) == BASE_ARTIFACT), None)


def _unquantized(r: Mapping) -> bool:
    """Whether the row's variant quantizes nothing (``formats.Format.unquantized``)."""
    return r["variant"].lower() in {v.lower() for v in lookup(r["format"]).unquantized}


def qat_vs_ptq(rows: Sequence[Mapping], *, seed: int = 0) -> list[dict[str, Any]]:
    """Each QAT run's matched artifact (the quantizer it trained for, ``spec.schemes.matched_artifact``)
    against the baseline run's artifact of the same quantizer (PTQ), both measured against the
    baseline merged model: accuracy, NLL and KLD losses with recovery. The baseline run is the one
    the QAT run's rows record (``config.comparison_baseline``). Unmatched quantized artifacts of QAT
    runs come back as ``{"unmatched": ...}`` items."""
    from qatforge.spec.schemes import matched_artifact

    out = []
    for qrun in sorted({r["run"] for r in rows if r["qat_scheme"] != NO_SCHEME}):
        qrows = [r for r in rows if r["run"] == qrun]
        scheme = qrows[0]["qat_scheme"]
        base_run = next((r["baseline_run"] for r in qrows if r.get("baseline_run")), None)
        fmt, variant = matched_artifact(scheme)
        base = _find(rows, base_run, *MERGED_ARTIFACT) if base_run else None
        q, p = _find(rows, qrun, fmt, variant), (_find(rows, base_run, fmt, variant) if base_run else None)
        item: dict[str, Any] = {"qat_run": qrun, "qat_mode": qrows[0].get("qat_mode"), "baseline_run": base_run,
                                "scheme": scheme, "format": fmt, "variant": variant, "qat": q, "ptq": p, "base": base,
                                "qat_merged": _find(rows, qrun, *MERGED_ARTIFACT)}
        missing = [n for n, r in (("QAT artifact", q), ("PTQ artifact", p), ("baseline merged model", base)) if r is None]
        if missing:
            item["missing"] = missing
        else:
            if all(r.get("per_prompt_correct") for r in (base, p, q)):
                item["accuracy"] = paired_accuracy_losses(
                    base["per_prompt_correct"], p["per_prompt_correct"], q["per_prompt_correct"], seed=seed)
            if all(r.get("per_seq_nll_sum") for r in (base, p, q)):
                item["nll"] = paired_nll_losses(base, p, q, seed=seed)
            item["kld"] = paired_kld_losses(p, q, seed=seed)
        out.append(item)
        for r in qrows:
            if deployed(r) and (r["format"], r["variant"]) != (fmt, variant) and not _unquantized(r):
                out.append({"qat_run": qrun, "format": r["format"], "variant": r["variant"], "unmatched": UNMATCHED})
    return out


def qat_vs_ptq_frame(items: Sequence[Mapping]) -> Any:
    """``results/qat_vs_ptq.csv``: one row per matched pair and metric (accuracy, nll, kld); recovery
    NaN when the PTQ loss is within noise (its interval reaches zero)."""
    import polars as pl

    data: dict[str, list] = {c: [] for c in QAT_VS_PTQ_COLUMNS}
    for it in items:
        if it.get("unmatched") or it.get("missing"):
            continue
        for metric in ("accuracy", "nll", "kld"):
            s = it.get(metric)
            if s is None:
                continue
            rec = s["recovered"] if s["meaningful"] else None
            ci = s["recovered_ci"] if s["meaningful"] else (None, None)
            vals = {"qat_run": it["qat_run"], "qat_mode": it.get("qat_mode") or "", "format": it["format"],
                    "variant": it["variant"], "metric": metric, "ptq_loss": s["ptq_loss"], "qat_loss": s["qat_loss"],
                    "recovery": rec, "recovery_ci_low": ci[0], "recovery_ci_high": ci[1]}
            for c in QAT_VS_PTQ_COLUMNS:
                data[c].append(float("nan") if vals[c] is None else vals[c])
    schema = {c: (pl.String if c in ("qat_run", "qat_mode", "format", "variant", "metric") else pl.Float64)
              for c in QAT_VS_PTQ_COLUMNS}
    return pl.DataFrame(data, schema=schema)


def recommend(rows: Sequence[Mapping], accuracy_margin: float) -> dict[str, Any]:
    """Per deployment target: the smallest artifact passing parity within the accuracy margin."""
    base_run = baseline_run(rows)
    base = _find(rows, base_run, *MERGED_ARTIFACT) if base_run else None
    out: dict[str, Any] = {"baseline": base, "accuracy_margin": accuracy_margin, "targets": {}}
    for target, fmt in TARGETS:
        cands = [r for r in rows if r["format"] == fmt and deployed(r)]
        entry: dict[str, Any] = {"format": fmt, "candidates": len(cands), "choice": None, "reason": ""}
        if base is None:
            entry["reason"] = "no baseline merged model evaluated"
        elif not cands:
            entry["reason"] = f"no {fmt} artifact evaluated"
        else:
            floor = base["accuracy"] - accuracy_margin
            ok = [r for r in cands if r["parity_pass"] and r["accuracy"] is not None and r["accuracy"] >= floor - 1e-12]
            if ok:
                entry["choice"] = min(ok, key=lambda r: (r["size_mb"], -r["accuracy"], r.get("nll") or 0.0))
            else:
                n_pass = sum(bool(r["parity_pass"]) for r in cands)
                entry["reason"] = (f"none of {len(cands)} {fmt} artifacts passes parity and reaches accuracy "
                                   f">= {floor:.3f} ({n_pass} pass parity)")
        out["targets"][target] = entry
    return out


def add_losses(rows: Sequence[dict], *, seed: int = 0) -> None:
    """Set every row's ``LOSS_COLUMNS``: its ``paired_loss`` against its run's merged model (None if none)."""
    for r in rows:
        merged = _find(rows, r["run"], *MERGED_ARTIFACT)
        for measure, col in (("accuracy", "acc_loss"), ("nll", "nll_loss")):
            s = paired_loss(merged, r, measure, seed=seed) if merged else None
            r[col], r[f"{col}_ci_low"], r[f"{col}_ci_high"] = (s["loss"], *s["ci"]) if s else (None, None, None)


def base_vs_finetuned(rows: Sequence[Mapping], *, seed: int = 0) -> list[dict[str, Any]]:
    """The base model against each run's merged model: the fine-tuning gain (the base's
    ``paired_loss`` against it) in accuracy and NLL. Empty without a base row."""
    base = next((r for r in rows if (r["format"], r["variant"]) == BASE_ARTIFACT), None)
    if base is None:
        return []
    merged = sorted((r for r in rows if (r["format"], r["variant"]) == MERGED_ARTIFACT), key=lambda r: r["run"])
    return [{"run": m["run"], "base": base, "merged": m, "accuracy": paired_loss(m, base, "accuracy", seed=seed),
             "nll": paired_loss(m, base, "nll", seed=seed)} for m in merged]

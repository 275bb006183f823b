"""Comparisons across rows: losses against the merged model, base vs fine-tuned, QAT vs PTQ, the
recommendation per deployment target."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from qatforge.report.load import NO_SCHEME, deployed
from qatforge.report.stats import paired_loss, paired_losses, recovery_difference
from qatforge.spec.formats import BASE_ARTIFACT, FORMATS, MERGED_ARTIFACT, lookup

# (label, format) of each deployment target, in the recommendation's order (formats.Format.label)
TARGETS = tuple((f.label, f.name) for f in sorted(FORMATS.values(), key=lambda f: f.rank) if f.label)
QAT_VS_PTQ_COLUMNS = ("qat_run", "qat_mode", "format", "variant", "metric", "ptq_loss", "qat_loss", "recovery",
                      "recovery_ci_low", "recovery_ci_high", "twin_run", "recovery_minus_twin",
                      "recovery_minus_twin_ci_low", "recovery_minus_twin_ci_high")
MEASURES = ("accuracy", "nll", "kld")
TWIN_MODE = "unsloth"  # a QAT run in this qat.mode is the Unsloth-design twin of a run otherwise alike
UNMATCHED = "PTQ of a QAT-trained model"


def find_row(rows: Sequence[Mapping], run: str, fmt: str, variant: str) -> Mapping | None:
    """The row of ``run``'s artifact ``fmt``/``variant``, None if it was not evaluated."""
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
        base = find_row(rows, base_run, *MERGED_ARTIFACT) if base_run else None
        q, p = find_row(rows, qrun, fmt, variant), (find_row(rows, base_run, fmt, variant) if base_run else None)
        item: dict[str, Any] = {"qat_run": qrun, "qat_mode": qrows[0].get("qat_mode"), "baseline_run": base_run,
                                "scheme": scheme, "format": fmt, "variant": variant, "qat": q, "ptq": p, "base": base,
                                "qat_merged": find_row(rows, qrun, *MERGED_ARTIFACT)}
        missing = [n for n, r in (("QAT artifact", q), ("PTQ artifact", p), ("baseline merged model", base)) if r is None]
        if missing:
            item["missing"] = missing
        else:
            item.update({m: paired_losses(m, base, p, q, seed=seed) for m in MEASURES})
        out.append(item)
        for r in qrows:
            if deployed(r) and (r["format"], r["variant"]) != (fmt, variant) and not _unquantized(r):
                out.append({"qat_run": qrun, "format": r["format"], "variant": r["variant"], "unmatched": UNMATCHED})
    _add_twins(out, seed)
    return out


def _add_twins(items: Sequence[dict], seed: int) -> None:
    """Give each complete pair whose run has an Unsloth-mode twin (qat.mode unsloth, same scheme,
    baseline run and quantizer) ``twin``: the twin's run and, per measure, this run's recovery minus
    the twin's with its paired interval (:func:`~qatforge.report.stats.recovery_difference`)."""
    done = [it for it in items if not it.get("unmatched") and not it.get("missing")]
    for it in done:
        if it.get("qat_mode") == TWIN_MODE:
            continue
        twin = next((t for t in done if t.get("qat_mode") == TWIN_MODE and t["qat_run"] != it["qat_run"]
                     and all(t[k] == it[k] for k in ("scheme", "baseline_run", "format", "variant"))), None)
        if twin is not None:
            it["twin"] = {"run": twin["qat_run"], **{
                m: recovery_difference(m, it["base"], it["ptq"], it["qat"], twin["qat"], seed=seed) for m in MEASURES}}


def qat_vs_ptq_frame(items: Sequence[Mapping]) -> Any:
    """``results/qat_vs_ptq.csv``: one row per matched pair and metric (accuracy, nll, kld); recovery
    NaN when the PTQ loss is within noise (its interval reaches zero). A run with an Unsloth-mode twin
    also has ``twin_run`` and its recovery minus the twin's with the interval (else empty / NaN)."""
    import polars as pl

    data: dict[str, list] = {c: [] for c in QAT_VS_PTQ_COLUMNS}
    for it in items:
        if it.get("unmatched") or it.get("missing"):
            continue
        twin = it.get("twin") or {}
        for metric in MEASURES:
            s = it.get(metric)
            if s is None:
                continue
            rec = s["recovered"] if s["meaningful"] else None
            ci = s["recovered_ci"] if s["meaningful"] else (None, None)
            diff = twin.get(metric) or {"difference": None, "ci": (None, None)}
            vals = {"qat_run": it["qat_run"], "qat_mode": it.get("qat_mode") or "", "format": it["format"],
                    "variant": it["variant"], "metric": metric, "ptq_loss": s["ptq_loss"], "qat_loss": s["qat_loss"],
                    "recovery": rec, "recovery_ci_low": ci[0], "recovery_ci_high": ci[1],
                    "twin_run": twin.get("run", ""), "recovery_minus_twin": diff["difference"],
                    "recovery_minus_twin_ci_low": diff["ci"][0], "recovery_minus_twin_ci_high": diff["ci"][1]}
            for c in QAT_VS_PTQ_COLUMNS:
                data[c].append(float("nan") if vals[c] is None else vals[c])
    schema = {c: (pl.String if c in ("qat_run", "qat_mode", "format", "variant", "metric", "twin_run") else pl.Float64)
              for c in QAT_VS_PTQ_COLUMNS}
    return pl.DataFrame(data, schema=schema)


def recommend(rows: Sequence[Mapping], accuracy_margin: float) -> dict[str, Any]:
    """Per deployment target: the smallest artifact passing parity within the accuracy margin."""
    base_run = baseline_run(rows)
    base = find_row(rows, base_run, *MERGED_ARTIFACT) if base_run else None
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
        merged = find_row(rows, r["run"], *MERGED_ARTIFACT)
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


def to_baseline(r: Mapping, measure: str) -> float | None:
    """A row's KLD (``kld_mean``) or top-1 agreement (``top1_agree``) against the baseline merged model,
    the model the user started from: a QAT run's ``vs_baseline_*``, else its own (its run's merged
    model is the baseline)."""
    return r.get(f"vs_baseline_{measure}") if r.get("baseline_run") else r.get(measure)


# The verdict's tolerances: a QAT file up to this much larger, or slower beyond the speed pass's
# spread, is not recommended for a quality gain alone.
SIZE_TOLERANCE = 1.05


def _slower(a: Mapping, b: Mapping) -> bool:
    """Whether ``a`` generates slower than ``b`` beyond the spread of both speed passes."""
    hi, lo = a.get("gen_tps_p75") or a.get("gen_tps"), b.get("gen_tps_p25") or b.get("gen_tps")
    return hi is not None and lo is not None and hi < lo


def verdict(item: Mapping) -> dict[str, Any]:
    """Which file of a matched QAT/PTQ pair to ship, and why, in numbers. The QAT file when it passes
    parity, its NLL and KLD to the baseline merged model are better than PTQ's with intervals that
    exclude zero (``gain_ci`` above 0), its accuracy is not significantly worse, it is at most
    :data:`SIZE_TOLERANCE` × the PTQ file's size and not slower beyond the speed spread; else the
    PTQ file (no training run to maintain), with the first reason that failed."""
    q, p = item["qat"], item["ptq"]
    size, speed = q["size_mb"] / p["size_mb"], (q["gen_tps"] / p["gen_tps"] if q.get("gen_tps") and p.get("gen_tps") else None)
    numbers = (f"size {q['size_mb']:.3g} vs {p['size_mb']:.3g} MiB ({size:.2f}×), gen "
               + (f"{q['gen_tps']:.0f} vs {p['gen_tps']:.0f} tok/s ({speed:.2f}×)" if speed else "tok/s n/a"))
    reasons = []
    if not q["parity_pass"]:
        reasons.append("the QAT file fails parity against its own merged model")
    for m, name in (("nll", "NLL"), ("kld", "KLD")):
        s = item.get(m)
        if s is None:
            reasons.append(f"no per-item {name} results")
        elif not s["gain_ci"][0] > 0:
            reasons.append(f"its {name} gain over PTQ is not significant ({s['gain']:+.3g}, 95 % CI "
                           f"[{s['gain_ci'][0]:+.3g}, {s['gain_ci'][1]:+.3g}])")
    acc = item.get("accuracy")
    if acc is not None and acc["gain_ci"][1] < 0:
        reasons.append(f"it loses accuracy against PTQ ({acc['gain'] * 100:+.3g} pt)")
    if size > SIZE_TOLERANCE:
        reasons.append(f"it is {size:.2f}× the PTQ file's size")
    if _slower(q, p):
        reasons.append("it generates slower than the PTQ file beyond the speed pass's spread")
    ship = "PTQ" if reasons else "QAT"
    if ship == "PTQ" and not p["parity_pass"] and q["parity_pass"]:
        reasons.append("but the PTQ file fails parity too: ship neither without a look at the failures")
    quality = "; ".join(f"{name} to baseline merged: QAT {item[m]['qat_loss']:.3g} vs PTQ {item[m]['ptq_loss']:.3g}"
                        + (f", recovers {item[m]['recovered'] * 100:.0f} %" if item[m]["recovered"] is not None else "")
                        for m, name in (("nll", "NLL loss"), ("kld", "KLD")) if item.get(m))
    return {"ship": ship, "file": q if ship == "QAT" else p, "quality": quality, "numbers": numbers,
            "reasons": reasons}

"""The polars report: one row per evaluated artifact, losses against the merged model, base vs
fine-tuned, QAT vs PTQ, a recommendation, plots, gate.

Inputs are only the per-artifact evaluation JSONs (``qatforge.evaluate.run.run_eval``) plus a few
parameters, so a change to one artifact reruns only its evaluation and this aggregation.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from qatforge.columns import BOOL_COLUMNS, FLOAT_COLUMNS, LOSS_COLUMNS, REPORT_COLUMNS, SPEED_COLUMNS, STR_COLUMNS
from qatforge.formats import BASE_ARTIFACT, FORMATS, REFERENCE_ONLY, is_deployment_artifact
from qatforge.io import atomic_dir, atomic_file, read_json

log = logging.getLogger("qatforge.report")

EXTRA_COLUMNS = ("threads", "n_prompts", "failures")
FORMAT_ORDER = {f: i for i, f in enumerate(FORMATS)}
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown")
TARGETS = (("llama.cpp / Ollama", "gguf"), ("torchao", "torchao"), ("ONNX Runtime", "onnx"))
NO_SCHEME = "none"
BOOTSTRAP = 2000
FULL_PRECISION_GGUF = {"F32", "F16", "BF16"}


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def load_evals(eval_jsons: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read the evaluation JSONs; clear error naming the file for a missing column or bad value."""
    rows = []
    seen: dict[tuple, Path] = {}
    for p in map(Path, eval_jsons):
        try:
            rec = read_json(p)
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: cannot read evaluation JSON: {e}") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{p}: evaluation JSON is not an object")
        missing = [c for c in REPORT_COLUMNS if c not in rec]
        if missing:
            raise ValueError(f"{p}: missing report columns {missing}")
        if rec["format"] not in FORMATS:
            raise ValueError(f"{p}: unknown format {rec['format']!r} (expected one of {list(FORMATS)})")
        key = (rec["run"], rec["format"], rec["variant"])
        if key in seen:
            raise ValueError(f"{p}: duplicate artifact {'/'.join(key)} (also in {seen[key]})")
        seen[key] = p
        rec = dict(rec)
        rec["qat_scheme"] = rec["qat_scheme"] or NO_SCHEME
        # a deployment artifact without a verdict fails; a reference-only row (the base) has none
        rec["parity_pass"] = bool(rec["parity_pass"]) if is_deployment_artifact(*key[1:]) else None
        rec["_path"] = str(p)
        rows.append(rec)
    if not rows:
        raise ValueError("no evaluation JSONs given")
    return rows


def _sort_key(r: Mapping[str, Any]) -> tuple:
    return (r["parity_pass"] is not False, r["run"], FORMAT_ORDER[r["format"]], -(r["size_mb"] or 0.0), r["variant"])


def _deployed(r: Mapping[str, Any]) -> bool:
    return is_deployment_artifact(r["format"], r["variant"])


def to_frame(rows: Sequence[Mapping[str, Any]]) -> Any:
    """polars DataFrame with the report columns in fixed order (failing rows first), then the extras,
    the speed and the loss columns (NaN where a row has none; ``parity_pass`` null on reference-only rows)."""
    import polars as pl

    rows = sorted(rows, key=_sort_key)
    cols = REPORT_COLUMNS + EXTRA_COLUMNS + SPEED_COLUMNS + LOSS_COLUMNS
    data: dict[str, list] = {c: [] for c in cols}
    for r in rows:
        for c in REPORT_COLUMNS:
            v = r.get(c)
            if c in FLOAT_COLUMNS:
                v = float("nan") if v is None else float(v)
            elif c in BOOL_COLUMNS:
                v = None if v is None else bool(v)
            else:
                v = str(v)
            data[c].append(v)
        data["threads"].append(int(r.get("threads") or 0))
        data["n_prompts"].append(int(r.get("n_prompts") or 0))
        data["failures"].append("; ".join(r.get("failures") or []) or "none")
        for c in SPEED_COLUMNS + LOSS_COLUMNS:
            data[c].append(float("nan") if r.get(c) is None else float(r[c]))
    schema = {c: pl.String for c in STR_COLUMNS} | {c: pl.Float64 for c in FLOAT_COLUMNS + SPEED_COLUMNS + LOSS_COLUMNS}
    schema |= {c: pl.Boolean for c in BOOL_COLUMNS} | {"threads": pl.Int64, "n_prompts": pl.Int64, "failures": pl.String}
    return pl.DataFrame(data, schema={c: schema[c] for c in cols})


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def bootstrap_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.nanpercentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def _resample_idx(n: int, b: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def _accuracy_loss(x0: np.ndarray, x: np.ndarray, idx: np.ndarray) -> tuple[float, np.ndarray]:
    """Accuracy lost by per-prompt results ``x`` against ``x0``, and on each resample of ``idx``."""
    return float(x0.mean() - x.mean()), x0[idx].mean(1) - x[idx].mean(1)


def _nll_loss(cnt: np.ndarray, s0: np.ndarray, s: np.ndarray, idx: np.ndarray) -> tuple[float, np.ndarray]:
    """Token-weighted NLL added by per-conversation sums ``s`` over ``s0``, and on each resample."""
    return float((s.sum() - s0.sum()) / cnt.sum()), (s[idx].sum(1) - s0[idx].sum(1)) / cnt[idx].sum(1)


def paired_accuracy_losses(
    base: Sequence[bool], ptq: Sequence[bool], qat: Sequence[bool], *, b: int = BOOTSTRAP, seed: int = 0
) -> dict[str, Any]:
    """Accuracy lost by PTQ and by QAT relative to the baseline, paired bootstrap over prompts."""
    x0, xp, xq = (np.asarray(v, dtype=float) for v in (base, ptq, qat))
    if not (len(x0) == len(xp) == len(xq)) or len(x0) == 0:
        raise ValueError(f"per-prompt results differ in length: {len(x0)}, {len(xp)}, {len(xq)}")
    idx = _resample_idx(len(x0), b, seed)
    (ptq_l, ptq_b), (qat_l, qat_b) = _accuracy_loss(x0, xp, idx), _accuracy_loss(x0, xq, idx)
    return _losses(ptq_l, qat_l, ptq_b, qat_b, len(x0))


def paired_nll_losses(
    base: Mapping[str, Sequence[float]], ptq: Mapping[str, Sequence[float]], qat: Mapping[str, Sequence[float]],
    *, b: int = BOOTSTRAP, seed: int = 0,
) -> dict[str, Any]:
    """NLL added by PTQ and by QAT (token-weighted), paired bootstrap over test conversations."""
    cnt = np.asarray(base["per_seq_tokens"], dtype=float)
    s0, sp, sq = (np.asarray(r["per_seq_nll_sum"], dtype=float) for r in (base, ptq, qat))
    if not (len(s0) == len(sp) == len(sq) == len(cnt)) or len(cnt) == 0:
        raise ValueError("per-conversation NLL lists differ in length")
    idx = _resample_idx(len(cnt), b, seed)
    (ptq_l, ptq_b), (qat_l, qat_b) = _nll_loss(cnt, s0, sp, idx), _nll_loss(cnt, s0, sq, idx)
    return _losses(ptq_l, qat_l, ptq_b, qat_b, len(cnt))


def paired_loss(ref: Mapping, row: Mapping, measure: str, *, b: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any] | None:
    """Loss of evaluation ``row`` against ``ref`` on the same test items, with its paired bootstrap
    95 % interval: ``"accuracy"`` ref − row over prompts, ``"nll"`` row − ref (nats/token) over
    conversations. None when either lacks the per-item results or they do not pair up."""
    if measure == "accuracy":
        x0, x = (np.asarray(r.get("per_prompt_correct") or [], dtype=float) for r in (ref, row))
        if not len(x0) or len(x) != len(x0):
            return None
        n = len(x0)
        loss, boot = _accuracy_loss(x0, x, _resample_idx(n, b, seed))
    elif measure == "nll":
        cnt = np.asarray(ref.get("per_seq_tokens") or [], dtype=float)
        s0, s = (np.asarray(r.get("per_seq_nll_sum") or [], dtype=float) for r in (ref, row))
        same_items = list(row.get("per_seq_tokens") or []) == list(ref.get("per_seq_tokens") or [])
        if not cnt.sum() or not same_items or not len(s0) == len(s) == len(cnt):
            return None
        n = len(cnt)
        loss, boot = _nll_loss(cnt, s0, s, _resample_idx(n, b, seed))
    else:
        raise ValueError(f"unknown measure {measure!r} (accuracy or nll)")
    return {"loss": loss, "ci": bootstrap_ci(boot), "n": n}


def _losses(ptq: float, qat: float, ptq_b: np.ndarray, qat_b: np.ndarray, n: int) -> dict[str, Any]:
    ptq_ci = bootstrap_ci(ptq_b)
    # The PTQ loss is "within noise" when its 95 % CI reaches zero (or it is not a loss at all).
    meaningful = ptq > 0 and ptq_ci[0] > 0
    out = {"n": n, "ptq_loss": float(ptq), "ptq_loss_ci": ptq_ci, "qat_loss": float(qat),
           "qat_loss_ci": bootstrap_ci(qat_b), "gain": float(ptq - qat), "gain_ci": bootstrap_ci(ptq_b - qat_b),
           "meaningful": bool(meaningful), "recovered": None, "recovered_ci": None}
    if meaningful:
        ok = ptq_b > 0
        out["recovered"] = float((ptq - qat) / ptq)
        out["recovered_ci"] = bootstrap_ci((ptq_b[ok] - qat_b[ok]) / ptq_b[ok])
    return out


# --------------------------------------------------------------------------------------------
# report sections
# --------------------------------------------------------------------------------------------
def _find(rows: Sequence[Mapping], run: str, fmt: str, variant: str) -> Mapping | None:
    for r in rows:
        if r["run"] == run and r["format"] == fmt and r["variant"] == variant:
            return r
    return None


def baseline_run(rows: Sequence[Mapping]) -> str | None:
    """The run without a QAT scheme that has a merged HF row ("baseline" preferred)."""
    runs = sorted({r["run"] for r in rows if r["qat_scheme"] == NO_SCHEME and r["format"] == "hf"
                   and r["variant"] == "merged"})
    if not runs:
        return None
    return "baseline" if "baseline" in runs else runs[0]


QAT_VS_PTQ_COLUMNS = ("qat_run", "qat_mode", "format", "variant", "metric", "ptq_loss", "qat_loss", "recovery",
                      "recovery_ci_low", "recovery_ci_high")
UNMATCHED = "PTQ of a QAT-trained model"


def paired_kld_losses(ptq: Mapping, qat: Mapping, *, b: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any] | None:
    """KLD to the baseline merged model of a PTQ artifact (its own ``per_seq_kld_sum``: its run is
    the baseline) and of a QAT artifact (``vs_baseline_per_seq_kld_sum``), paired over conversations."""
    cnt = np.asarray(ptq.get("per_seq_tokens") or [], dtype=float)
    sp = np.asarray(ptq.get("per_seq_kld_sum") or [], dtype=float)
    sq = np.asarray(qat.get("vs_baseline_per_seq_kld_sum") or [], dtype=float)
    if not cnt.sum() or not len(sp) == len(sq) == len(cnt) or list(qat.get("per_seq_tokens") or []) != list(cnt):
        return None
    zero = np.zeros_like(cnt)
    idx = _resample_idx(len(cnt), b, seed)
    (ptq_l, ptq_b), (qat_l, qat_b) = _nll_loss(cnt, zero, sp, idx), _nll_loss(cnt, zero, sq, idx)
    return _losses(ptq_l, qat_l, ptq_b, qat_b, len(cnt))


def qat_vs_ptq(rows: Sequence[Mapping], *, seed: int = 0) -> list[dict[str, Any]]:
    """Each QAT run's matched artifact (the quantizer it trained for, ``qat_schemes.matched_artifact``)
    against the baseline run's artifact of the same quantizer (PTQ), both measured against the
    baseline merged model: accuracy, NLL and KLD losses with recovery. Unmatched quantized
    artifacts of QAT runs come back as ``{"unmatched": ...}`` items."""
    from qatforge.qat_schemes import matched_artifact

    out = []
    for qrun in sorted({r["run"] for r in rows if r["qat_scheme"] != NO_SCHEME}):
        qrows = [r for r in rows if r["run"] == qrun]
        scheme = qrows[0]["qat_scheme"]
        base_run = next((r.get("baseline_run") for r in qrows if r.get("baseline_run")), None) or baseline_run(rows)
        fmt, variant = matched_artifact(scheme)
        base = _find(rows, base_run, "hf", "merged") if base_run else None
        q, p = _find(rows, qrun, fmt, variant), (_find(rows, base_run, fmt, variant) if base_run else None)
        item: dict[str, Any] = {"qat_run": qrun, "qat_mode": qrows[0].get("qat_mode"), "baseline_run": base_run,
                                "scheme": scheme, "format": fmt, "variant": variant, "qat": q, "ptq": p, "base": base,
                                "qat_merged": _find(rows, qrun, "hf", "merged")}
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
            if _deployed(r) and (r["format"], r["variant"]) not in ((fmt, variant), ("hf", "merged")) \
                    and r["variant"].upper() not in FULL_PRECISION_GGUF and r["variant"] != "fp32":
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
    base = _find(rows, base_run, "hf", "merged") if base_run else None
    out: dict[str, Any] = {"baseline": base, "accuracy_margin": accuracy_margin, "targets": {}}
    for target, fmt in TARGETS:
        cands = [r for r in rows if r["format"] == fmt and _deployed(r)]
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
        merged = _find(rows, r["run"], "hf", "merged")
        for measure, col in (("accuracy", "acc_loss"), ("nll", "nll_loss")):
            s = paired_loss(merged, r, measure, seed=seed) if merged else None
            r[col], r[f"{col}_ci_low"], r[f"{col}_ci_high"] = (s["loss"], *s["ci"]) if s else (None, None, None)


def base_vs_finetuned(rows: Sequence[Mapping], *, seed: int = 0) -> list[dict[str, Any]]:
    """The base model against each run's merged model: the fine-tuning gain (the base's
    ``paired_loss`` against it) in accuracy and NLL. Empty without a base row."""
    base = next((r for r in rows if (r["format"], r["variant"]) == BASE_ARTIFACT), None)
    if base is None:
        return []
    merged = sorted((r for r in rows if r["format"] == "hf" and r["variant"] == "merged"), key=lambda r: r["run"])
    return [{"run": m["run"], "base": base, "merged": m, "accuracy": paired_loss(m, base, "accuracy", seed=seed),
             "nll": paired_loss(m, base, "nll", seed=seed)} for m in merged]


def _fmt(v: Any, col: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if col in ("kld_mean", "kld_max"):
        return f"{v:.2e}"
    if col in ("accuracy", "top1_agree", "gen_match"):
        return f"{v:.3f}"
    if col in ("nll",):
        return f"{v:.4f}"
    if col in ("ppl", "size_mb", "load_s"):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    if col in ("prompt_tps", "gen_tps", "peak_rss_mb") + SPEED_COLUMNS:
        return f"{v:.0f}"
    if col == "sha256":
        return str(v)[:12]
    return str(v)


def _label(r: Mapping | None) -> str:
    return "n/a" if r is None else f"{r['run']}/{r['format']}/{r['variant']}"


def markdown_table(rows: Sequence[Mapping], cols: Sequence[str] = REPORT_COLUMNS) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), c).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def _signed(v: float, scale: float = 1.0, unit: str = "") -> str:
    """``v * scale`` with its sign, 3 significant digits; rounding noise (|x| < 1e-12) shows as +0."""
    return f"{round(v * scale, 12) + 0.0:+.3g}{unit}"


def _ci(ci: Sequence[float] | None, scale: float = 1.0, unit: str = "") -> str:
    return "n/a" if ci is None else f"[{_signed(ci[0], scale, unit)}, {_signed(ci[1], scale, unit)}]"


def _qat_section(items: Sequence[Mapping]) -> list[str]:
    md = ["## QAT vs PTQ", ""]
    pairs = [it for it in items if not it.get("unmatched")]
    if not pairs:
        md += ["No QAT run paired with a baseline run (a run with qat_scheme and a baseline merged model) "
               "was evaluated.", ""]
        return md
    md += [
        "Each QAT run's artifact of the quantizer it trained for against the baseline run's artifact of the "
        "same quantizer (PTQ), both measured against the baseline merged model on the same test set (also in "
        "`qat_vs_ptq.csv`). *Loss* = baseline − artifact for accuracy (points), artifact − baseline for NLL "
        "(nats/token), and KLD to the baseline merged model at the answer positions; *recovered* = (PTQ loss − "
        "QAT loss) / PTQ loss, given only when the PTQ loss's interval excludes zero. 95 % intervals: paired "
        "bootstrap over test prompts (accuracy) and over test conversations (NLL, KLD), {} resamples. Exact match "
        "on N prompts moves in steps of 1/N.".format(BOOTSTRAP),
        "",
        "| pair | artifact | accuracy | NLL | PPL | size MiB | KLD to baseline merged | top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for it in pairs:
        for name, r in (("baseline merged", it["base"]), ("QAT run merged", it["qat_merged"]),
                        ("PTQ (baseline run)", it["ptq"]), ("QAT", it["qat"])):
            if r is None:
                continue
            own = r["run"] == it["baseline_run"]
            kld = r["kld_mean"] if own else r.get("vs_baseline_kld_mean")
            top1 = r["top1_agree"] if own else r.get("vs_baseline_top1_agree")
            md.append(f"| {it['qat_run']} ({it.get('qat_mode') or 'n/a'}) {it['format']} {it['variant']} | {name}: "
                      f"{_label(r)} | {_fmt(r['accuracy'], 'accuracy')} | {_fmt(r['nll'], 'nll')} | {_fmt(r['ppl'], 'ppl')} | "
                      f"{_fmt(r['size_mb'], 'size_mb')} | {_fmt(kld, 'kld_mean')} | {_fmt(top1, 'top1_agree')} |")
    md.append("")
    for it in pairs:
        head = f"**{it['format']} {it['variant']}** ({it['qat_run']}, qat.mode {it.get('qat_mode') or 'n/a'}, vs {it['baseline_run']})"
        if it.get("missing"):
            md += [f"- {head}: not comparable, missing {', '.join(it['missing'])}.", ""]
            continue
        for measure, unit, scale in (("accuracy", " pt", 100.0), ("nll", "", 1.0), ("kld", "", 1.0)):
            s = it.get(measure)
            if s is None:
                md.append(f"- {head}, {measure}: per-item results missing, no interval.")
                continue
            base_txt = (f"- {head}, {measure}: PTQ loss {s['ptq_loss'] * scale:+.3g}{unit} {_ci(s['ptq_loss_ci'], scale, unit)}, "
                        f"QAT loss {s['qat_loss'] * scale:+.3g}{unit} {_ci(s['qat_loss_ci'], scale, unit)}, "
                        f"QAT − PTQ gain {s['gain'] * scale:+.3g}{unit} {_ci(s['gain_ci'], scale, unit)} (n={s['n']}). ")
            if s["meaningful"]:
                base_txt += (f"QAT recovers {s['recovered'] * 100:.0f} % of the PTQ loss "
                             f"(95 % CI {s['recovered_ci'][0] * 100:.0f} % to {s['recovered_ci'][1] * 100:.0f} %).")
                if s["gain_ci"][0] <= 0 <= s["gain_ci"][1]:
                    base_txt += " The QAT − PTQ difference itself is within noise."
                elif s["gain"] < 0:
                    base_txt += " **QAT is worse than PTQ here.**"
            else:
                base_txt += ("The PTQ loss is within noise (its interval reaches zero or it is no loss), "
                             "so a recovery share is not meaningful.")
            md.append(base_txt)
        md.append("")
    unmatched = [it for it in items if it.get("unmatched")]
    if unmatched:
        md += [f"{UNMATCHED} (quantizers the run did not train for; not QAT results): "
               + ", ".join(f"{it['qat_run']}/{it['format']}/{it['variant']}" for it in unmatched) + ".", ""]
    return md


def _excludes_zero(lo: float | None, hi: float | None) -> bool:
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def _base_section(items: Sequence[Mapping]) -> list[str]:
    md = ["## Base vs fine-tuned", ""]
    if not items:
        return md + ["No base model row: the config has no baseline run (a run without qat_scheme).", ""]
    base = items[0]["base"]
    md += [
        f"The base model before fine-tuning ({_label(base)}, `{base.get('artifact') or 'results/base'}`, fp32 "
        "compute) on the same test set, against each run's merged model. *Gain* = merged − base for accuracy "
        "(points) and base − merged for NLL (nats/token): positive means fine-tuning helped. 95 % intervals: "
        f"paired bootstrap over test prompts (accuracy) and test conversations (NLL), {BOOTSTRAP} resamples. Parity "
        f"does not apply: {REFERENCE_ONLY[BASE_ARTIFACT]} (its KLD and top-1 are informative only).", "",
        "| merged model | accuracy base → merged | accuracy gain [95 % CI] | NLL base → merged | NLL gain [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    for it in items:
        cells = []
        for measure, unit, scale in (("accuracy", " pt", 100.0), ("nll", "", 1.0)):
            s = it[measure]
            cells.append(f"{_fmt(base[measure], measure)} → {_fmt(it['merged'][measure], measure)}")
            cells.append("n/a (per-item results missing)" if s is None
                         else f"{_signed(s['loss'], scale, unit)} {_ci(s['ci'], scale, unit)}")
        md.append(f"| {_label(it['merged'])} | " + " | ".join(cells) + " |")
    return md + [""]


def _loss_section(rows: Sequence[Mapping]) -> list[str]:
    md = ["## Loss against the merged model", "",
          "Every deployment artifact against its run's merged model on the test set (the `acc_loss*` and "
          "`nll_loss*` columns of report.csv): accuracy loss = merged − artifact (points), NLL loss = artifact − "
          f"merged (nats/token), paired bootstrap 95 % intervals ({BOOTSTRAP} resamples, fixed seed). *Excludes "
          "0*: the measures whose interval lies on one side of zero.", "",
          "| artifact | accuracy loss [95 % CI] | NLL loss [95 % CI] | excludes 0 |", "|---|---|---|---|"]
    arts = [r for r in rows if _deployed(r) and (r["format"], r["variant"]) != ("hf", "merged")]
    for r in sorted(arts, key=lambda r: (r["run"], FORMAT_ORDER[r["format"]], r["variant"])):
        cells, sig = [], []
        for name, col, unit, scale in (("accuracy", "acc_loss", " pt", 100.0), ("NLL", "nll_loss", "", 1.0)):
            lo, hi = r.get(f"{col}_ci_low"), r.get(f"{col}_ci_high")
            if r.get(col) is None:
                cells.append("n/a")
                continue
            cells.append(f"{_signed(r[col], scale, unit)} {_ci((lo, hi), scale, unit)}")
            if _excludes_zero(lo, hi):
                sig.append(name)
        md.append(f"| {_label(r)} | {cells[0]} | {cells[1]} | {', '.join(sig) or 'neither'} |")
    return md + [""]


def _speed_section(rows: Sequence[Mapping]) -> list[str]:
    md = ["## Speed", "",
          "Measured after the parity pass, on a second runtime instance with deployment settings: llama.cpp with "
          "its default KV cache type and batch, last logits only, its own greedy sampler and perf counters; "
          "onnxruntime on the graph with past key values and default session options; transformers with "
          "use_cache (merged model in fp32, the reference format; TorchAO in its quantized tensors). Every prompt "
          "generates exactly max_new_tokens (EOS ignored) after one warm-up pass. Figures: median tokens/s over "
          "repeats × prompts, [25th, 75th percentile] (min and max below 4 runs). RSS: peak during the speed "
          "pass; peak_rss_mb in the table above is the whole evaluation's.", "",
          "| artifact | threads | prompt tok/s | gen tok/s | speed RSS MiB |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["run"], FORMAT_ORDER[r["format"]], r["variant"])):
        tps = [f"{_fmt(r.get(c), c)} [{_fmt(r.get(c + '_p25'), c)}, {_fmt(r.get(c + '_p75'), c)}]"
               for c in ("prompt_tps", "gen_tps")]
        md.append(f"| {_label(r)} | {r.get('threads') or 'n/a'} | {tps[0]} | {tps[1]} | "
                  f"{_fmt(r.get('speed_rss_mb'), 'speed_rss_mb')} |")
    return md + [""]


def _recommend_section(rec: Mapping[str, Any]) -> list[str]:
    md = ["## Recommendation", ""]
    base = rec["baseline"]
    if base is not None:
        md += [f"Baseline: {_label(base)}, accuracy {_fmt(base['accuracy'], 'accuracy')}; accepted artifacts pass "
               f"parity and reach accuracy >= {base['accuracy'] - rec['accuracy_margin']:.3f} "
               f"(margin {rec['accuracy_margin']}). The smallest such artifact per target:", ""]
    md += ["| target | recommended artifact | size MiB | accuracy | KLD mean | top-1 | gen tok/s | sha256 |",
           "|---|---|---|---|---|---|---|---|"]
    for target, e in rec["targets"].items():
        c = e["choice"]
        if c is None:
            md.append(f"| {target} | none: {e['reason']} | | | | | | |")
        else:
            md.append(f"| {target} | {_label(c)} | {_fmt(c['size_mb'], 'size_mb')} | {_fmt(c['accuracy'], 'accuracy')} | "
                      f"{_fmt(c['kld_mean'], 'kld_mean')} | {_fmt(c['top1_agree'], 'top1_agree')} | "
                      f"{_fmt(c['gen_tps'], 'gen_tps')} | {_fmt(c['sha256'], 'sha256')} |")
    md.append("")
    if base is not None:
        md += [f"Rollback artifact (every target): the baseline merged model {_label(base)} "
               f"(`{base.get('artifact') or base['source_checkpoint']}`, sha256 {_fmt(base['sha256'], 'sha256')}), the 16-bit source of "
               "truth every export was built from.", ""]
    return md


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (smaller size, higher quality), by increasing size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _num(v: Any, default: float = 0.0) -> float:
    return default if v is None or math.isnan(v) else float(v)


def make_plots(rows: Sequence[Mapping], plots_dir: str | Path) -> list[Path]:
    """quality_vs_size.png (accuracy and NLL vs size, Pareto front; the base model as a black star, off
    the front) and tokens_per_s.png (medians, spread bars; the base in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(FORMATS)}
    good = [r for r in rows if r["size_mb"] is not None and r["accuracy"] is not None]
    refs = [r for r in good if not _deployed(r)]
    good = [r for r in good if _deployed(r)]
    names = ["quality_vs_size.png", "tokens_per_s.png"]
    with atomic_dir(plots_dir) as tmp:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for ax, col, better in ((axes[0], "accuracy", 1.0), (axes[1], "nll", -1.0)):
            sub = [r for r in good if r.get(col) is not None]
            for fmt, c in colors.items():
                for passed, marker in ((True, "o"), (False, "x")):
                    pick = [r for r in sub if r["format"] == fmt and bool(r["parity_pass"]) == passed]
                    if pick:
                        ax.scatter([r["size_mb"] for r in pick], [r[col] for r in pick], c=c, marker=marker, s=36,
                                   label=fmt if passed else f"{fmt} (parity fails)")
            ref_sub = [r for r in refs if r.get(col) is not None]
            if ref_sub:
                ax.scatter([r["size_mb"] for r in ref_sub], [r[col] for r in ref_sub], c="black", marker="*", s=90,
                           label="base model (reference only)")
            # the front only over artifacts that pass parity (the ones a recommendation may pick)
            sub = [r for r in sub if r["parity_pass"]]
            pts = [(r["size_mb"], better * r[col]) for r in sub]
            for r in good + ref_sub:
                if r.get(col) is None:
                    continue
                mark = " ✗" if r["parity_pass"] is False else ""
                ax.annotate(f"{r['run']}/{r['variant']}{mark}", (r["size_mb"], r[col]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
            front = pareto_front(pts)
            if front:
                ax.plot([sub[i]["size_mb"] for i in front], [sub[i][col] for i in front], "k--", lw=0.8,
                        label="Pareto front")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.tick_params(axis="x", which="minor", labelsize=7)
            ax.set_xlabel("size on disk (MiB, log)")
            ax.set_ylabel("exact-match accuracy" if col == "accuracy" else "NLL (nats/token, lower is better)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("Quality vs size per artifact")
        fig.tight_layout()
        fig.savefig(tmp / names[0], dpi=110)
        plt.close(fig)

        srt = sorted(rows, key=lambda r: (r["run"], FORMAT_ORDER[r["format"]], r["variant"]))
        labels = [_label(r) for r in srt]
        fig, axes = plt.subplots(1, 2, figsize=(13, max(3.0, 0.28 * len(srt) + 1.5)), sharey=True)
        for ax, col, title in ((axes[0], "gen_tps", "generated tokens/s"), (axes[1], "prompt_tps", "prompt tokens/s")):
            vals = [_num(r[col]) for r in srt]
            err = [[max(v - _num(r.get(f"{col}_p25"), v), 0.0) for v, r in zip(vals, srt)],
                   [max(_num(r.get(f"{col}_p75"), v) - v, 0.0) for v, r in zip(vals, srt)]]
            ax.barh(range(len(srt)), vals, xerr=err, capsize=2,
                    color=[colors[r["format"]] if _deployed(r) else "tab:gray" for r in srt])
            ax.set_yticks(range(len(srt)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.set_xlabel(title)
            ax.grid(axis="x", alpha=0.3)
        axes[0].invert_yaxis()  # once: the y axis is shared
        threads = sorted({r.get("threads") for r in rows if r.get("threads")})
        fig.suptitle(f"Speed per artifact: median, 25th-75th percentile "
                     f"(threads: {', '.join(map(str, threads)) or 'n/a'})")
        fig.tight_layout()
        fig.savefig(tmp / names[1], dpi=110)
        plt.close(fig)
    return [Path(plots_dir) / n for n in names]


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------
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
    judged = [r for r in rows if _deployed(r)]
    failing = [r for r in judged if r["parity_pass"] is False]
    for r in failing:
        log.error("parity FAILED: %s: %s", _label(r), "; ".join(r.get("failures") or []) or "no reason recorded")

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
    plots = make_plots(rows, plots_dir)

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
        md += [f"- **{fmt}**{' (and the Ollama Modelfile)' if fmt == 'gguf' else ''}: {reason}"
               for fmt, reason in sorted(skipped.items())] + [""]
    if failing:
        md += ["## Parity failures", ""]
        for r in failing:
            md.append(f"- **{_label(r)}**: {'; '.join(r.get('failures') or []) or 'no reason recorded'}")
        md.append("")
    md += ["## All artifacts", "",
           "Failing rows first. Quality: exact-match accuracy on the test prompts (greedy, the runtime's own "
           "chat template) and mean NLL / PPL at the answer positions of the test conversations. Parity against the "
           "run's reference (its merged model): KL divergence and top-1 agreement on identical token ids, "
           "share of identical greedy generations, and tokenizer/template parity. The hf/base row is the base "
           "model before fine-tuning: reference only, parity n/a. Speed: median tokens/s of the speed pass "
           "(its section).", "", markdown_table(rows), ""]
    md += _base_section(gains)
    md += _loss_section(rows)
    md += _speed_section(rows)
    md += _qat_section(comparisons)
    md += _recommend_section(rec)
    md += ["## Plots", ""]
    md += [f"![{p.stem}]({Path(os.path.relpath(p, Path(out_md).parent)).as_posix()})" for p in plots] + [""]
    with atomic_file(out_md) as tmp:
        tmp.write_text("\n".join(md))

    return {
        "rows": len(rows),
        "skipped": skipped,
        "failing": [_label(r) for r in failing],
        "recommendation": {t: (_label(e["choice"]) if e["choice"] else None) for t, e in rec["targets"].items()},
        "rollback": _label(rec["baseline"]) if rec["baseline"] else None,
        "base_vs_finetuned": [{k: it[k] for k in ("run", "accuracy", "nll")} for it in gains],
        "qat_vs_ptq": [
            {k: it.get(k) for k in ("qat_run", "qat_mode", "baseline_run", "format", "variant", "accuracy", "nll",
                                    "kld", "missing", "unmatched")}
            for it in comparisons
        ],
        "plots": [str(p) for p in plots],
    }


def parity_gate(report_csv: str | Path, out_ok: str | Path) -> None:
    """Write ``out_ok`` when every deployment artifact of the report passes parity, else raise listing
    the failures. Reference-only rows (the base model, parity_pass empty) are not judged; a
    deployment artifact without a verdict fails."""
    import polars as pl

    df = pl.read_csv(report_csv, schema_overrides={"parity_pass": pl.Boolean})
    if "parity_pass" not in df.columns:
        raise ValueError(f"{report_csv}: no parity_pass column")
    judged = [r for r in df.to_dicts() if is_deployment_artifact(r["format"], r["variant"])]
    if not judged:
        raise ValueError(f"{report_csv}: the report has no deployment artifact rows")
    bad = [r for r in judged if r["parity_pass"] is not True]
    if bad:
        lines = [
            f"  {r['run']}/{r['format']}/{r['variant']}: "
            f"{'no parity verdict' if r['parity_pass'] is None else r.get('failures', '') or 'no reason recorded'} "
            f"(kld_mean={r['kld_mean']}, top1_agree={r['top1_agree']}, gen_match={r['gen_match']}, "
            f"token_parity={r['token_parity']})"
            for r in bad
        ]
        raise RuntimeError(f"parity failed for {len(bad)} of {len(judged)} artifacts in {report_csv}:\n" + "\n".join(lines))
    n_ref = df.height - len(judged)
    with atomic_file(out_ok) as tmp:
        tmp.write_text(f"all {len(judged)} artifacts in {Path(report_csv).name} pass parity"
                       f"{f' (not judged: {n_ref} reference-only, the base model)' if n_ref else ''}\n")

"""The report.md sections and tables."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from qatforge.report.compare import UNMATCHED, to_baseline, verdict
from qatforge.report.load import FORMAT_ORDER, deployed, label
from qatforge.report.stats import BOOTSTRAP
from qatforge.spec.columns import REPORT_COLUMNS, SPEED_COLUMNS
from qatforge.spec.formats import BASE_ARTIFACT, MERGED_ARTIFACT, REFERENCE_ONLY


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


def qat_section(items: Sequence[Mapping]) -> list[str]:
    """The ``## QAT vs PTQ`` section: the pairs' table, losses with intervals, recovery."""
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
                      f"{label(r)} | {_fmt(r['accuracy'], 'accuracy')} | {_fmt(r['nll'], 'nll')} | {_fmt(r['ppl'], 'ppl')} | "
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
        md += _twin_lines(it, head)
        md.append("")
    unmatched = [it for it in items if it.get("unmatched")]
    if unmatched:
        md += [f"{UNMATCHED} (quantizers the run did not train for; not QAT results): "
               + ", ".join(f"{it['qat_run']}/{it['format']}/{it['variant']}" for it in unmatched) + ".", ""]
    return md


def _twin_lines(it: Mapping, head: str) -> list[str]:
    """The design difference: this run's recovery minus its Unsloth-mode twin's, per measure."""
    twin = it.get("twin")
    if not twin:
        return []
    cells = []
    for measure in ("accuracy", "nll", "kld"):
        d = twin.get(measure)
        if d is None:
            cells.append(f"{measure} n/a (PTQ loss within noise or per-item results missing)")
            continue
        sig = "excludes 0" if _excludes_zero(*d["ci"]) else "within noise"
        cells.append(f"{measure} {_signed(d['difference'], 100, ' pt')} {_ci(d['ci'], 100, ' pt')} ({sig})")
    return [f"- {head}: recovery minus its Unsloth-mode twin {twin['run']}'s (qat.mode unsloth, otherwise the "
            f"same settings; paired over the same test items): " + "; ".join(cells) + "."]


def verdict_section(items: Sequence[Mapping]) -> list[str]:
    """The ``## Which file to ship`` section: per matched QAT/PTQ pair, :func:`compare.verdict`."""
    pairs = [it for it in items if not it.get("unmatched") and not it.get("missing")]
    if not pairs:
        return []
    md = ["## Which file to ship", "",
          "Per quantizer a QAT run trained for: its QAT file or the baseline run's PTQ file of the same quantizer, "
          "both judged against the baseline merged model (the model the user fine-tuned). QAT is recommended "
          "when it passes parity, its NLL and KLD gains over PTQ have 95 % intervals above zero, it loses no "
          "accuracy significantly, and it is no larger (5 % tolerance) or slower (beyond the speed spread) "
          "than the PTQ file; otherwise PTQ, which needs no training run.", "",
          "| quantizer | QAT run | ship | file | quality | size and speed (QAT vs PTQ) | why |", "|---|---|---|---|---|---|---|"]
    for it in pairs:
        v = verdict(it)
        why = "; ".join(v["reasons"]) if v["reasons"] else "better NLL and KLD, intervals above zero"
        md.append(f"| {it['format']} {it['variant']} | {it['qat_run']} ({it.get('qat_mode') or 'n/a'}) | **{v['ship']}** | "
                  f"{label(v['file'])} | {v['quality']} | {v['numbers']} | {why.replace('|', '/')} |")
    return md + [""]


def _excludes_zero(lo: float | None, hi: float | None) -> bool:
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def base_section(items: Sequence[Mapping]) -> list[str]:
    """The ``## Base vs fine-tuned`` section: each run's fine-tuning gain."""
    md = ["## Base vs fine-tuned", ""]
    if not items:
        return md + ["No base model row: the config has no baseline run (a run without qat_scheme).", ""]
    base = items[0]["base"]
    md += [
        f"The base model before fine-tuning ({label(base)}, `{base.get('artifact') or 'results/base'}`, fp32 "
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
        md.append(f"| {label(it['merged'])} | " + " | ".join(cells) + " |")
    return md + [""]


def loss_section(rows: Sequence[Mapping]) -> list[str]:
    """The ``## Loss against the merged model`` section: each deployment artifact's losses."""
    md = ["## Loss against the merged model", "",
          "Every deployment artifact against its run's merged model on the test set (the `acc_loss*` and "
          "`nll_loss*` columns of report.csv): accuracy loss = merged − artifact (points), NLL loss = artifact − "
          f"merged (nats/token), paired bootstrap 95 % intervals ({BOOTSTRAP} resamples, fixed seed). *Excludes "
          "0*: the measures whose interval lies on one side of zero.", "",
          "| artifact | accuracy loss [95 % CI] | NLL loss [95 % CI] | excludes 0 |", "|---|---|---|---|"]
    arts = [r for r in rows if deployed(r) and (r["format"], r["variant"]) != MERGED_ARTIFACT]
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
        md.append(f"| {label(r)} | {cells[0]} | {cells[1]} | {', '.join(sig) or 'neither'} |")
    return md + [""]


def speed_section(rows: Sequence[Mapping]) -> list[str]:
    """The ``## Speed`` section: tokens/s and RSS per artifact."""
    md = ["## Speed", "",
          "Measured after the parity pass, on a second runtime instance with deployment settings: llama.cpp with "
          "its default KV cache type and batch, last logits only, its own greedy sampler and perf counters; "
          "ONNX Runtime GenAI's Generator on the folder as the builder wrote it (its genai_config.json, the "
          "thread count overlaid); transformers with "
          "use_cache (merged model in fp32, the reference format; TorchAO in its quantized tensors). Every prompt "
          "generates exactly max_new_tokens (EOS ignored) after one warm-up pass. Figures: median tokens/s over "
          "repeats × prompts, [25th, 75th percentile] (min and max below 4 runs). RSS: peak during the speed "
          "pass; peak_rss_mb in the table above is the whole evaluation's.", "",
          "| artifact | threads | prompt tok/s | gen tok/s | speed RSS MiB |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["run"], FORMAT_ORDER[r["format"]], r["variant"])):
        tps = [f"{_fmt(r.get(c), c)} [{_fmt(r.get(c + '_p25'), c)}, {_fmt(r.get(c + '_p75'), c)}]"
               for c in ("prompt_tps", "gen_tps")]
        md.append(f"| {label(r)} | {r.get('threads') or 'n/a'} | {tps[0]} | {tps[1]} | "
                  f"{_fmt(r.get('speed_rss_mb'), 'speed_rss_mb')} |")
    return md + [""]


def recommend_section(rec: Mapping[str, Any]) -> list[str]:
    """The ``## Recommendation`` section: ``compare.recommend`` per target and the rollback."""
    md = ["## Recommendation", ""]
    base = rec["baseline"]
    if base is not None:
        md += [f"Baseline: {label(base)}, accuracy {_fmt(base['accuracy'], 'accuracy')}; accepted artifacts pass "
               f"parity and reach accuracy >= {base['accuracy'] - rec['accuracy_margin']:.3f} "
               f"(margin {rec['accuracy_margin']}). The smallest such artifact per target:", ""]
    md += ["KLD and top-1 are against the baseline merged model (the model the user started from) for every row, "
           "a QAT run's included.", "",
           "| target | recommended artifact | size MiB | accuracy | KLD to baseline merged | top-1 vs baseline merged | "
           "gen tok/s | sha256 |",
           "|---|---|---|---|---|---|---|---|"]
    for target, e in rec["targets"].items():
        c = e["choice"]
        if c is None:
            md.append(f"| {target} | none: {e['reason']} | | | | | | |")
        else:
            md.append(f"| {target} | {label(c)} | {_fmt(c['size_mb'], 'size_mb')} | {_fmt(c['accuracy'], 'accuracy')} | "
                      f"{_fmt(to_baseline(c, 'kld_mean'), 'kld_mean')} | {_fmt(to_baseline(c, 'top1_agree'), 'top1_agree')} | "
                      f"{_fmt(c['gen_tps'], 'gen_tps')} | {_fmt(c['sha256'], 'sha256')} |")
    md.append("")
    if base is not None:
        md += [f"Rollback artifact (every target): the baseline merged model {label(base)} "
               f"(`{base.get('artifact') or base['source_checkpoint']}`, sha256 {_fmt(base['sha256'], 'sha256')}), the 16-bit source of "
               "truth every export was built from.", ""]
    return md

"""``make bench``: measured, repeatable performance figures of the pipeline itself (issue 8).

``python bench/perf.py --out results/perf [--quick] [--only SECTIONS]`` (from the project root) writes
``<out>/<section>.json`` and ``<out>/summary.md`` (one table). Sections:

* ``cold``: the default config built from an empty ``results/`` in a fresh copy of the project
  (``snakemake --cores all results/report.csv``); per-job times from the ``benchmark:`` TSVs
  (their ``max_rss`` is sampled by Snakemake every 0.5 s, then every 30 s: a lower bound).
* ``noop``: ``snakemake results/report.csv`` on the built project (median of 3).
* ``parallel``: the export + evaluation part of that build (``--forcerun`` of every rule reading
  ``results/runs/*/merged``, hence every job downstream of it) rebuilt with 1 core, then all.
* ``incremental``: ``pure: true`` set on one GGUF quant (Q8_0), then rebuilt: time / cold time, jobs.
* ``dag``: ``snakemake -n`` of a generated config of 10 runs x 30 quants (median of 3).
* ``growth``: merge, GGUF BF16, Q4_K_M, ONNX and TorchAO PTQ of random-init Qwen3 models of
  ~4M / 50M / 500M parameters, each stage in its own process.
* ``qat``: QAT at a harsh weight-only scheme (int2-w128) from the trained baseline versus the
  same number of plain LoRA steps followed by PTQ (the control).
* ``step_cost``: seconds per training step of each distilled QAT run of the config against a plain
  LoRA step at the same rank, interleaved in one process from the built baseline's merged model
  (``step_cost``): the ratio the QAT design costs per step.
* ``scale``: the whole DAG on a random-init base of Qwen3-0.6B's shape (``SIZES["0.6B"]``) with a
  few steps and prompts (``scale_config``): every rule's wall time and peak RSS (its ``benchmark:``
  TSV) against the bf16 size and its bound (``SCALE_BOUNDS``), projected to 1.7B/4B/8B.

Every process is accounted like ``/usr/bin/time -v``: ``os.wait4`` gives its wall time, CPU
time and peak RSS (the largest of the process and its waited-for descendants). ``--quick``
runs only ``dag`` and ``growth`` at 4M and 50M.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from qatforge.io import package_versions, read_json, write_json

PROJECT_FILES = ("Snakefile", "rules", "scripts", "config", "data", "envs", "report", "profiles", "assets")
REPORT = "results/report.csv"
# The rules reading results/runs/{run}/merged: forcing them reruns everything downstream of it.
EXPORT_RULES = ("gguf_convert", "onnx_export", "torchao_ptq", "qat_convert", "reference")
SECTIONS = ("cold", "noop", "parallel", "incremental", "dag", "growth", "qat", "qat_modes", "step_cost", "scale")  # in run order
QUICK_SECTIONS = ("dag", "growth")
NEEDS_BUILD = ("parallel", "incremental", "noop", "qat", "qat_modes", "step_cost")
# Random-init Qwen3 dimensions (rows multiples of 256, vocab 1024 from build_tokenizer).
SIZES: dict[str, dict[str, int]] = {
    "4M": dict(hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2, head_dim=64),
    "50M": dict(hidden=512, intermediate=1536, layers=16, heads=8, kv_heads=4, head_dim=64),
    "500M": dict(hidden=1024, intermediate=3072, layers=40, heads=16, kv_heads=8, head_dim=64),
    # Qwen3-0.6B's shape: 596M parameters with its 151,936-token vocabulary, tied (fp32 graph > 2 GB)
    "0.6B": dict(hidden=1024, intermediate=3072, layers=28, heads=16, kv_heads=8, head_dim=128, vocab=151936,
                 tied=1),
}
STAGES = ("merge", "gguf_bf16", "gguf_q4_k_m", "onnx", "onnx_int4", "torchao", "qat_convert")
DAG_QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1",
                   "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS", "IQ4_NL")
DAG_VARIANTS = (("", {}), ("-pure", {"pure": True}), ("-lot", {"leave_output_tensor": True}),
                ("-imat", {"imatrix": True}))
DAG_SCHEMES = (None, "int8-int4", "int8", "int4-w32", "int2-w128")
TARGETS = {"cold_s": 480.0, "speedup": 1.4, "incremental_frac": 0.05, "noop_s": 3.0, "dag_s": 5.0,
           "rss_ratio": 2.5, "time_slope": 1.3, "qat_recovery": 0.85, "qat_recovery_ci_low": 0.5,
           "step_ratio": 1.6}
STEP_COST_STEPS, STEP_COST_ROUNDS = 20, 3  # steps per measured call, calls per arm (median)
RSS_JUDGED_FROM_MB = 512  # below this the ~0.3-0.5 GiB of imported libraries dominates peak RSS
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
MiB = 2**20
HARNESS = str(Path(__file__).resolve())  # re-run as a script for the stage and qat processes
# The scale section's bounds on peak RSS: train/select_best hold float32 models (the student, and
# the teacher of a distilled run); every other rule is judged against the bf16 file.
SCALE_HOLD_FP32 = ("train", "select_best")
SCALE_PROJECT = {"1.7B": 1.72e9, "4B": 4.02e9, "8B": 8.19e9}  # Qwen3 1.7B / 4B / 8B parameter counts


class PerfError(RuntimeError):
    """A measured command failed (the message names it and its log)."""


# --------------------------------------------------------------------------- pure helpers


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_benchmark(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a Snakemake ``benchmark:`` TSV (s, h:m:s, max_rss [MB], ..., cpu_time); NA -> None."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "s" not in rows[0]:
        raise ValueError(f"{path}: not a Snakemake benchmark file (no 's' column or no rows)")
    return [{k: (v if k == "h:m:s" else _num(v)) for k, v in r.items()} for r in rows]


def job_times(bench_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One entry per ``benchmarks/**/*.tsv``: job (path without .tsv), rule group, s, max_rss_mb.

    The group is the first path component (``gguf_quantize/baseline/Q8_0`` -> ``gguf_quantize``).
    Repeated benchmark rows give the median ``s`` and the largest ``max_rss``. Slowest first.
    """
    bench_dir = Path(bench_dir)
    out = []
    for f in sorted(bench_dir.rglob("*.tsv")):
        rows = read_benchmark(f)
        job = f.relative_to(bench_dir).with_suffix("").as_posix()
        rss = [r["max_rss"] for r in rows if r.get("max_rss") is not None]
        cpu = [r["cpu_time"] for r in rows if r.get("cpu_time") is not None]
        out.append({"job": job, "group": job.split("/")[0], "s": statistics.median(r["s"] for r in rows),
                    "max_rss_mb": max(rss) if rss else None, "cpu_s": statistics.median(cpu) if cpu else None})
    return sorted(out, key=lambda j: -j["s"])


def group_totals(jobs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Summed seconds per rule group, largest first."""
    tot: dict[str, float] = {}
    for j in jobs:
        tot[j["group"]] = tot.get(j["group"], 0.0) + j["s"]
    return {k: round(v, 2) for k, v in sorted(tot.items(), key=lambda kv: -kv[1])}


_JOB = re.compile(r"^(?:local)?rule (\S+):\s*$")
_WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")
_TOTAL = re.compile(r"^total\s+(\d+)\s*$")


def jobs_from_log(text: str) -> list[str]:
    """The jobs a Snakemake run (or dry-run) scheduled, ``rule[wildcards]``, from its console log."""
    jobs: list[list[str]] = []
    in_job = False
    for line in text.splitlines():
        m = _JOB.match(line)
        if m:
            jobs.append([m.group(1), ""])
            in_job = True
        elif in_job and line.startswith((" ", "\t")):
            w = _WILDCARDS.match(line)
            if w:
                jobs[-1][1] = w.group(1).strip()
        else:
            in_job = False
    return [f"{r}[{w}]" if w else r for r, w in jobs]


def job_count(text: str) -> int | None:
    """The ``total`` of Snakemake's "Job stats" table (None when nothing was scheduled)."""
    for line in text.splitlines():
        m = _TOTAL.match(line.strip())
        if m:
            return int(m.group(1))
    return None


def dag_config(config: Mapping[str, Any], n_runs: int = 10, n_quants: int = 30) -> dict[str, Any]:
    """A valid config with ``n_runs`` runs (baselines and QAT schemes in turn) and ``n_quants``
    GGUF quants (llama.cpp types x {plain, pure, leave_output_tensor, imatrix}), else as ``config``."""
    limit = len(DAG_QUANT_TYPES) * len(DAG_VARIANTS)
    if not 1 <= n_quants <= limit or n_runs < 1:
        raise ValueError(f"need n_runs >= 1 and 1 <= n_quants <= {limit}, got {n_runs}, {n_quants}")
    cfg = copy.deepcopy(dict(config))
    runs = {}
    for i in range(n_runs):
        scheme = DAG_SCHEMES[i % len(DAG_SCHEMES)]
        runs[f"run{i:02d}-{scheme or 'baseline'}"] = {"qat_scheme": scheme, "train": {"lr": round(5e-4 * (1 + i / 10), 6)}}
    quants = {}
    for suffix, opts in DAG_VARIANTS:
        for qtype in DAG_QUANT_TYPES:
            if len(quants) < n_quants:
                quants[qtype + suffix] = {"type": qtype, **opts}
    for name, spec in quants.items():  # IQ4_XS is used with an importance matrix, as in the default
        if spec["type"] == "IQ4_XS":
            spec["imatrix"] = True
    gguf = cfg.setdefault("gguf", {})
    gguf["quants"] = quants
    if gguf.get("default_quant") not in quants:
        gguf["default_quant"] = next(iter(quants))
    cfg["runs"] = runs
    return cfg


def loglog_slope(x0: float, y0: float, x1: float, y1: float) -> float | None:
    """d log y / d log x between two points (1.0 = linear growth)."""
    if min(x0, y0, x1, y1) <= 0 or x0 == x1:
        return None
    return math.log(y1 / y0) / math.log(x1 / x0)


def growth_analysis(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stage: time slope (log-log, two largest sizes), raw and marginal RSS / bf16 at the largest.

    The marginal ratio ``(rss - rss_smallest) / (bf16 - bf16_smallest)`` removes the fixed
    footprint of the libraries (torch, onnxruntime, llama.cpp), which dominates small models.
    """
    out: dict[str, dict[str, Any]] = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        ok = sorted((r for r in rows if r["stage"] == stage and not r.get("error")), key=lambda r: r["params"])
        if not ok:
            continue
        small, big = ok[0], ok[-1]
        a: dict[str, Any] = {"largest": big["size"], "bf16_mb": big["bf16_mb"], "rss_ratio": big["rss_ratio"],
                             "slope": None, "marginal_rss_ratio": None, "peak_at": peak_call(big.get("peak_stack"))}
        if len(ok) >= 2:
            prev = ok[-2]
            t = "call_s" if all(r.get("call_s") for r in (prev, big)) else "wall_s"
            s = loglog_slope(prev["params"], prev[t], big["params"], big[t])
            a["slope"] = round(s, 3) if s is not None else None
            a["slope_between"] = [prev["size"], big["size"]]
            a["slope_of"] = t
            dbytes = (big["bf16_mb"] - small["bf16_mb"])
            if dbytes > 0:
                a["marginal_rss_ratio"] = round((big["max_rss_mb"] - small["max_rss_mb"]) / dbytes, 3)
        out[stage] = a
    return out


def peak_call(stack: Sequence[str] | None) -> str | None:
    """The innermost qatforge frame and the innermost frame of a sampled peak-RSS stack."""
    if not stack:
        return None
    ours = [f for f in stack if f.startswith("qatforge/")]
    inner = stack[-1]
    return f"{ours[-1]} → {inner}" if ours and ours[-1] != inner else inner


def _fmt_s(s: float | None) -> str:
    return "–" if s is None else (f"{s:.2f} s" if s < 10 else f"{s:.0f} s" if s < 600 else f"{s / 60:.1f} min")


def _fmt_mb(mb: float | None) -> str:
    return "–" if mb is None else (f"{mb:.0f} MiB" if mb < 1024 else f"{mb / 1024:.2f} GiB")


def _ok(value: float | None, limit: float, above: bool = False) -> str:
    if value is None:
        return "–"
    return "yes" if (value >= limit if above else value <= limit) else "**no**"


def summary_rows(figs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, met) rows of whatever sections ``figs`` holds."""
    rows: list[tuple[str, str, str, str]] = []
    for name, f in figs.items():
        if f.get("error"):
            rows.append((name, f"failed: {str(f['error']).splitlines()[0][:120]}", "", "**no**"))
    c = figs.get("cold", {})
    if "wall_s" in c:
        rows.append((f"cold build, default config (`--cores {c['cores']}`)",
                     f"{_fmt_s(c['wall_s'])} wall, {_fmt_s(c['cpu_s'])} CPU, {c['n_jobs']} jobs, "
                     f"peak RSS {_fmt_mb(c['max_rss_mb'])}; base cache {c.get('base_cache')}", "≤ 8 min",
                     _ok(c["wall_s"], TARGETS["cold_s"])))
        top = ", ".join(f"{k} {_fmt_s(v)}" for k, v in list(c["group_totals"].items())[:4])
        rows.append(("cold build: summed job time by rule (benchmark TSVs)", top, "", ""))
    p = figs.get("parallel", {})
    if "speedup" in p:
        one, two = p["cores_1"], p["cores_n"]
        rows.append((f"exports + evaluation ({one['n_jobs']} jobs downstream of merged): 1 core vs {p['cores']}",
                     f"{_fmt_s(one['wall_s'])} vs {_fmt_s(two['wall_s'])}: {p['speedup']:.2f}x",
                     f"≥ {TARGETS['speedup']}x", _ok(p["speedup"], TARGETS["speedup"], above=True)))
    i = figs.get("incremental", {})
    if "wall_s" in i:
        rows.append((f"incremental: `pure: {str(i['pure']).lower()}` on quant {i['quant']}",
                     f"{_fmt_s(i['wall_s'])} = {100 * i['fraction_of_cold']:.1f} % of cold; jobs: "
                     + ", ".join(i["jobs"]), "≤ 5 %", _ok(i["fraction_of_cold"], TARGETS["incremental_frac"])))
    n = figs.get("noop", {})
    if "median_s" in n:
        rows.append(("no-op `snakemake results/report.csv` (median of %d)" % len(n["runs"]),
                     _fmt_s(n["median_s"]), "≤ 3 s", _ok(n["median_s"], TARGETS["noop_s"])))
    d = figs.get("dag", {})
    if "median_s" in d:
        rows.append((f"`snakemake -n`, {d['n_runs']} runs x {d['n_quants']} quants (median of {len(d['runs'])})",
                     f"{_fmt_s(d['median_s'])}, {d['n_jobs']} jobs"
                     + (f" (a one-rule workflow: {_fmt_s(d['floor_median_s'])})" if d.get("floor_median_s") else ""),
                     "≤ 5 s", _ok(d["median_s"], TARGETS["dag_s"])))
    g = figs.get("growth", {})
    for r in g.get("rows", []):
        label = f"export growth {r['size']} ({r['params'] / 1e6:.1f}M params, bf16 {_fmt_mb(r['bf16_mb'])}): {r['stage']}"
        if r.get("error"):
            rows.append((label, f"failed: {r['error'][:120]}", "", "**no**"))
            continue
        rows.append((label, f"{_fmt_s(r['wall_s'])} ({_fmt_s(r.get('call_s'))} in the call), peak RSS "
                     f"{_fmt_mb(r['max_rss_mb'])} = {r['rss_ratio']:.2f}x bf16", "", ""))
    for stage, a in g.get("analysis", {}).items():
        marg = "" if a["marginal_rss_ratio"] is None else f", above the {g['sizes'][0]} footprint {a['marginal_rss_ratio']:.2f}x"
        judged = a.get("bf16_mb", 0) >= RSS_JUDGED_FROM_MB
        at = f"; peak in {a['peak_at']}" if judged and a.get("peak_at") and a["rss_ratio"] > TARGETS["rss_ratio"] else ""
        rows.append((f"export growth, {stage}: peak RSS / bf16 at {a['largest']}", f"{a['rss_ratio']:.2f}x{marg}{at}",
                     f"≤ {TARGETS['rss_ratio']}x (bf16 ≥ {RSS_JUDGED_FROM_MB} MiB)",
                     _ok(a["rss_ratio"], TARGETS["rss_ratio"]) if judged else "n/a: library footprint dominates"))
        if a["slope"] is not None:
            rows.append((f"export growth, {stage}: time exponent {'→'.join(a['slope_between'])}",
                         f"{a['slope']:.2f} (t ∝ params^k)", "≈ 1 (linear)", _ok(a["slope"], TARGETS["time_slope"])))
    q = figs.get("qat", {})
    if "recovered_nll" in q:
        pct = lambda v: "n/a (PTQ lost nothing)" if v is None else f"{100 * v:.0f} %"  # noqa: E731
        st, pq, qq = q["start_ptq"], q["ptq"], q["qat"]
        rows.append((f"QAT {q['scheme']}: eval NLL float → quantized ({q['n_eval']} eval conversations)",
                     f"trained baseline, PTQ {st['nll_float']:.3f} → {st['nll_quant']:.3f}; +{q['steps']} plain "
                     f"steps, PTQ {pq['nll_float']:.3f} → {pq['nll_quant']:.3f}; +{q['steps']} QAT steps "
                     f"{qq['nll_float']:.3f} → {qq['nll_quant']:.3f}", "", ""))
        rows.append((f"QAT {q['scheme']}: share of the PTQ increase recovered",
                     f"NLL {pct(q['recovered_nll'])}, KLD {pct(q['recovered_kld'])} "
                     f"(KLD to own float model: PTQ {pq['kld']:.4f}, QAT {qq['kld']:.4f})", "> 0",
                     _ok(q["recovered_nll"], 0.0, above=True)))
    m = figs.get("qat_modes", {})
    for r in m.get("qat_vs_ptq", []):
        rec = r.get("recovery")
        got = ("n/a (PTQ loss within noise)" if rec is None or (isinstance(rec, float) and math.isnan(rec))
               else f"{100 * rec:.0f} % [{100 * r['recovery_ci_low']:.0f}, {100 * r['recovery_ci_high']:.0f}]")
        judged = r["metric"] in ("nll", "kld") and r["qat_mode"] != "unsloth"
        met = (rec is not None and not math.isnan(rec) and rec >= TARGETS["qat_recovery"]
               and r["recovery_ci_low"] > TARGETS["qat_recovery_ci_low"])
        rows.append((f"QAT vs PTQ, {r['qat_run']} ({r['qat_mode']}) {r['format']} {r['variant']}, {r['metric']}",
                     f"PTQ loss {r['ptq_loss']:.3g}, QAT loss {r['qat_loss']:.3g}, recovery {got}",
                     f"≥ {TARGETS['qat_recovery']:.0%}, CI low > {TARGETS['qat_recovery_ci_low']:.0%}" if judged else "",
                     ("yes" if met else "**no**") if judged else ""))
        d = r.get("recovery_minus_twin")
        if r.get("twin_run") and d is not None and not math.isnan(d):
            lo, hi = r["recovery_minus_twin_ci_low"], r["recovery_minus_twin_ci_high"]
            rows.append((f"QAT design: {r['qat_run']} minus its Unsloth-mode twin {r['twin_run']}, {r['metric']} recovery",
                         f"{100 * d:+.0f} pt [{100 * lo:+.0f}, {100 * hi:+.0f}]", "interval excludes 0",
                         "yes" if lo > 0 or hi < 0 else "**no**"))
    sc_ = figs.get("step_cost", {})
    for plain, g in sc_.get("groups", {}).items():
        for run, ratio in g["ratio"].items():
            if run == plain:
                continue
            rows.append((f"QAT step cost: {run} / plain LoRA at its rank ({plain}), {g['steps']} steps x "
                         f"{g['rounds']} interleaved rounds, median",
                         f"{g['median_s'][run]:.3f} s / {g['median_s'][plain]:.3f} s = {ratio:.2f}x",
                         f"≤ {TARGETS['step_ratio']}x", _ok(ratio, TARGETS["step_ratio"])))
    sc = figs.get("scale", {})
    if "rows" in sc:
        rows.append((f"scale: whole DAG on a random-init {sc['size']} base ({sc['params'] / 1e6:.0f}M params, bf16 "
                     f"{_fmt_mb(sc['bf16_mb'])})", f"{'completed' if sc['completed'] else 'FAILED'} in "
                     f"{_fmt_s(sc['wall_s'])}, {len(sc['rows'])} jobs, largest peak {_fmt_mb(sc['peak_rss_mb'])}",
                     "completes within 24 GiB", "yes" if sc["completed"] and sc["within_24gib"] else "**no**"))
        for r in sc["rows"]:
            rows.append((f"scale: {r['job']}",
                         f"{_fmt_s(r['s'])}, peak {_fmt_mb(r.get('max_rss_mb'))} = {r['x_bf16']}x bf16",
                         f"≤ {_fmt_mb(r['bound_mb'])} ({r['bound']})", "yes" if r["within"] else "**no**"))
    return rows


def summary_table(figs: Mapping[str, Mapping[str, Any]]) -> str:
    """The one Markdown table of ``summary.md``."""
    lines = ["| Figure | Measured | Target | Met |", "|---|---|---|---|"]
    for row in summary_rows(figs):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- process accounting


def measure(cmd: Sequence[str], *, cwd: str | os.PathLike | None = None, log_file: str | os.PathLike | None = None,
            env: Mapping[str, str] | None = None, check: bool = True) -> dict[str, Any]:
    """Run ``cmd`` to completion (output to ``log_file``); wall, user and system seconds and peak
    RSS in MiB from ``os.wait4`` (as ``/usr/bin/time -v``: the largest process of the tree)."""
    env = {**os.environ, **ENV, **(env or {})}
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "w") if log_file else subprocess.DEVNULL
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_file:
            out.close()
    res = {"cmd": " ".join(str(c) for c in cmd), "cwd": str(cwd or "."), "returncode": proc.returncode,
           "wall_s": round(wall, 3), "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2),
           "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "max_rss_mb": round(ru.ru_maxrss / 1024, 1),
           "log": str(log_file) if log_file else None}
    if check and proc.returncode != 0:
        tail = Path(log_file).read_text()[-3000:] if log_file else ""
        raise PerfError(f"`{res['cmd']}` (in {res['cwd']}) exited with {proc.returncode}; log {log_file}:\n{tail}")
    return res


def _read(path: str | os.PathLike | None) -> str:
    return Path(path).read_text() if path and Path(path).is_file() else ""


def smk(*args: str) -> list[str]:
    """The snakemake CLI of this interpreter."""
    return [sys.executable, "-m", "snakemake", *args]


def copy_project(project: str | os.PathLike, dest: str | os.PathLike, config: Mapping | None = None) -> Path:
    """A fresh project directory at ``dest`` (replaced if present) with an empty ``results/``;
    ``config`` replaces ``config/config.yaml`` when given."""
    import yaml

    project, dest = Path(project), Path(dest)
    if not (project / "Snakefile").is_file():
        raise PerfError(f"{project} is not the qatforge project (no Snakefile); pass --project")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = project / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    if config is not None:
        (dest / "config" / "config.yaml").write_text(yaml.safe_dump(dict(config), sort_keys=False))
    (dest / "results").mkdir()
    return dest


def _smk_run(proj: Path, log: Path, *args: str, check: bool = True) -> dict[str, Any]:
    r = measure(smk(*args), cwd=proj, log_file=log, check=check)
    text = _read(log)
    r["jobs"] = jobs_from_log(text)
    r["n_jobs"] = len(r["jobs"])
    return r


# --------------------------------------------------------------------------- pipeline sections


def bench_cold(project: Path, work: Path, cores: str) -> dict[str, Any]:
    proj = copy_project(project, work / "project")
    r = _smk_run(proj, work / "logs" / "cold.log", REPORT, "--cores", cores)
    jobs = job_times(proj / "benchmarks")
    record = proj / "results" / "base" / "export.json"
    base = read_json(record)["provenance"]["info"] if record.is_file() else {}
    return {"what": "default config from an empty results/ in a fresh copy of the project (install excluded; "
                    "the builtin base comes from the machine cache when its recipe was built before)",
            "command": f"snakemake --cores {cores} {REPORT}", "cores": cores, **r,
            "base_cache": base.get("cache"), "base_recipe_key": base.get("recipe_key"),
            "benchmarked_jobs": jobs, "group_totals": group_totals(jobs),
            "summed_job_s": round(sum(j["s"] for j in jobs), 1)}


def workflow_rules(proj: Path) -> list[str]:
    """The rule names of the workflow in ``proj`` (``snakemake --list-rules``)."""
    r = measure(smk("--list-rules"), cwd=proj, log_file=proj / ".perf-rules.log")
    text = Path(r["log"]).read_text()
    Path(r["log"]).unlink()
    return [line.strip() for line in text.splitlines() if re.fullmatch(r"\s*[A-Za-z_]\w*\s*", line)]


def bench_parallel(proj: Path, work: Path, cores: str) -> dict[str, Any]:
    forced = [r for r in EXPORT_RULES if r in workflow_rules(proj)]  # unknown names would be an error
    res: dict[str, Any] = {
        "what": "rebuild of every job downstream of results/runs/*/merged (exports, reference, "
                "evaluations, report) on the built project, forced with --forcerun " + " ".join(forced),
        "cores": cores}
    for key, c in (("cores_1", "1"), ("cores_n", cores)):
        args = (REPORT, "--cores", c, "--forcerun", *forced)
        res[key] = {"command": "snakemake " + " ".join(args), **_smk_run(proj, work / "logs" / f"parallel-{c}.log", *args)}
    res["speedup"] = round(res["cores_1"]["wall_s"] / res["cores_n"]["wall_s"], 3)
    return res


def bench_incremental(proj: Path, work: Path, cores: str, cold_s: float | None, quant: str | None = None) -> dict[str, Any]:
    import yaml

    cfg_path = proj / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    quants = cfg["gguf"]["quants"]
    quant = quant or ("Q8_0" if "Q8_0" in quants else next(iter(quants)))
    pure = not quants[quant].get("pure", False)  # toggled, so a rerun of this section edits again
    quants[quant]["pure"] = pure
    # Left edited (restoring it would make the next build rerun the quant again).
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = _smk_run(proj, work / "logs" / "incremental.log", REPORT, "--cores", cores)
    return {"what": f"gguf.quants.{quant}.pure set to {str(pure).lower()} in the built project's config, "
                    f"then `snakemake --cores {cores} {REPORT}`", "quant": quant, "pure": pure, **r, "cold_s": cold_s,
            "fraction_of_cold": round(r["wall_s"] / cold_s, 4) if cold_s else None}


def bench_noop(proj: Path, work: Path, repeats: int) -> dict[str, Any]:
    runs = [_smk_run(proj, work / "logs" / f"noop-{i}.log", REPORT, "--cores", "1") for i in range(repeats)]
    if any(r["n_jobs"] for r in runs):
        raise PerfError(f"the no-op build ran jobs: {runs[0]['jobs']} (see {runs[0]['log']})")
    return {"what": f"`snakemake {REPORT} --cores 1` on the fully built project", "runs": runs,
            "median_s": round(statistics.median(r["wall_s"] for r in runs), 3)}


def bench_dag(project: Path, work: Path, repeats: int, n_runs: int = 10, n_quants: int = 30) -> dict[str, Any]:
    import yaml

    cfg = dag_config(yaml.safe_load((project / "config" / "config.yaml").read_text()), n_runs, n_quants)
    proj = copy_project(project, work / "dag", config=cfg)
    runs = [_smk_run(proj, work / "logs" / f"dag-{i}.log", REPORT, "-n", "--cores", "1") for i in range(repeats)]
    # Snakemake's own floor: start-up, plugin discovery and a one-job dry run of a one-rule workflow.
    floor_dir = work / "dag-floor"
    floor_dir.mkdir(parents=True, exist_ok=True)
    (floor_dir / "Snakefile").write_text('rule a:\n    output: "a"\n    shell: "touch {output}"\n')
    floor = [measure(smk("-n", "--cores", "1", "a"), cwd=floor_dir, log_file=work / "logs" / f"dag-floor-{i}.log")
             for i in range(repeats)]
    return {"what": f"`snakemake -n {REPORT}` of a generated config ({n_runs} runs x {n_quants} quants), nothing built",
            "n_runs": n_runs, "n_quants": n_quants, "n_jobs": job_count(_read(runs[-1]["log"])),
            "runs": [{k: v for k, v in r.items() if k != "jobs"} for r in runs],
            "median_s": round(statistics.median(r["wall_s"] for r in runs), 3),
            "floor_median_s": round(statistics.median(r["wall_s"] for r in floor), 3)}


# --------------------------------------------------------------------------- export growth


def _stage_cmd(stage: str, d: Path, **kw: Any) -> list[str]:
    cmd = [sys.executable, HARNESS, "stage", stage, str(d)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def bench_growth(work: Path, sizes: Sequence[str], data: Path, threads: int, keep: bool,
                 partial: Path | None = None) -> dict[str, Any]:
    """Every stage at every size; the figures so far are rewritten to ``partial`` after each stage."""
    rows: list[dict[str, Any]] = []
    setups: dict[str, Any] = {}

    def result() -> dict[str, Any]:
        return {"what": "random-init Qwen3 (qatforge.tiny), LoRA r=16 on all linear layers; one process per "
                        f"stage, {threads} threads; peak RSS of the stage's largest process (os.wait4); "
                        "sampled_peak_mb: summed RSS of the stage's process tree, with the call stack at its peak",
                "sizes": list(sizes), "dims": {s: SIZES[s] for s in sizes}, "setup": setups, "rows": rows,
                "analysis": growth_analysis(rows)}

    for size in sizes:
        d = work / f"growth-{size}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        r = measure(_stage_cmd("setup", d, size=size, data=data.resolve(), threads=threads),
                    log_file=work / "logs" / f"growth-{size}-setup.log")
        info = read_json(d / "setup.json")
        setups[size] = {**r, **info}
        bf16_mb = info["params"] * 2 / MiB
        for stage in STAGES:
            row: dict[str, Any] = {"size": size, "params": info["params"], "bf16_mb": round(bf16_mb, 1), "stage": stage}
            try:
                m = measure(_stage_cmd(stage, d, threads=threads), log_file=work / "logs" / f"growth-{size}-{stage}.log")
                st = read_json(d / f"{stage}.json")
                row.update(m, call_s=st["call_s"], rss_ratio=round(m["max_rss_mb"] / bf16_mb, 3),
                           sampled_peak_mb=st["sampled_peak_mb"], peak_stack=st["peak_stack"])
            except PerfError as e:
                row["error"] = str(e)
            rows.append(row)
            print(f"growth {size} {stage}: {row.get('wall_s', 'failed')} s, {row.get('max_rss_mb')} MiB", flush=True)
            if partial:
                write_json(partial, {**result(), "partial": True})
        if not keep:
            shutil.rmtree(d)
    return result()


def _setup(d: Path, dims: Mapping[str, int], data: Path, seed: int = 0) -> dict[str, Any]:
    """Tokenizer trained on ``data``, a random-init model saved as a bf16 base, a random LoRA r=16 adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qatforge.data import load_rows
    from qatforge.tiny import build_model, build_tokenizer
    from qatforge.train import DEFAULT_TARGETS

    rows = load_rows(data)
    tok = build_tokenizer(t for r in rows for m in r["messages"] for t in (m["role"] + "\n", m["content"]))
    shape = {k: v for k, v in dims.items() if k not in ("vocab", "tied")}
    model = build_model(tok, seed=seed, **shape)
    if dims.get("vocab"):  # a real model's vocabulary: rows past the tokenizer's are never looked up
        model.resize_token_embeddings(dims["vocab"])
    if dims.get("tied"):
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=DEFAULT_TARGETS,
                                                  task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B, so the merge really changes every targeted weight
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    peft_model.save_pretrained(d / "adapter")
    model = peft_model.unload()
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(d / "base", safe_serialization=True)
    tok.save_pretrained(d / "base")
    return {"params": params, "dims": dict(dims)}


def _short(filename: str) -> str:
    """A frame's file relative to site-packages or src/, else its last two path parts."""
    for marker in ("site-packages/", "/src/"):
        if marker in filename:
            return filename.split(marker)[-1]
    return "/".join(Path(filename).parts[-2:])


class PeakSampler:
    """Samples the summed RSS of this process and its children every ``interval`` s in a thread and
    keeps the main thread's call stack at the peak: which call holds the memory."""

    def __init__(self, interval: float = 0.05, depth: int = 12) -> None:
        self.interval, self.depth = interval, depth
        self.peak_mb, self.stack = 0.0, []  # type: float, list[str]

    def __enter__(self) -> "PeakSampler":
        import threading

        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import traceback

        import psutil

        me = psutil.Process()
        while not self._stop.wait(self.interval):
            try:
                rss = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
            except psutil.Error:
                continue
            if rss / MiB > self.peak_mb * 1.01:
                self.peak_mb = rss / MiB
                frame = sys._current_frames().get(self._main)
                names = [f"{_short(f.filename)}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame)] if frame else []
                # qatforge's own frames (the call to blame), then the innermost ``depth`` frames.
                ours = [n for n in names[:-self.depth] if n.startswith("qatforge/")]
                self.stack = ours + names[-self.depth:]


def run_stage(stage: str, d: Path, *, size: str | None = None, data: Path | None = None, threads: int = 2) -> dict[str, Any]:
    """One export-growth stage in this process; writes and returns ``d/<stage>.json``."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with PeakSampler() as peak:
        info = _stage_call(stage, d, size=size, data=data, threads=threads)
    res = {"stage": stage, "call_s": round(time.perf_counter() - t0, 3), "sampled_peak_mb": round(peak.peak_mb, 1),
           "peak_stack": peak.stack, "info": info}
    if stage == "setup":
        res.update(info)
    write_json(d / f"{stage}.json", res)
    return res


def _stage_call(stage: str, d: Path, *, size: str | None, data: Path | None, threads: int) -> Any:
    if stage == "setup":
        if size not in SIZES or data is None:
            raise ValueError(f"setup needs --size (one of {', '.join(SIZES)}) and --data")
        return _setup(d, SIZES[size], data)
    if stage == "merge":
        from qatforge.merge import merge

        return merge(d / "base", d / "adapter", d / "merged", dtype="bfloat16", threads=threads)
    if stage == "gguf_bf16":
        from qatforge.export.gguf import convert

        return convert(d / "merged", d / "gguf" / "Model-BF16.gguf", outtype="bf16", pre_tokenizer="qwen2", log=print)
    if stage == "gguf_q4_k_m":
        from qatforge.export.gguf import quantize

        return quantize(d / "gguf" / "Model-BF16.gguf", d / "gguf" / "Model-Q4_K_M.gguf", qtype="Q4_K_M",
                        threads=threads, log=print)
    if stage in ("onnx", "onnx_int4"):  # ONNX Runtime GenAI's model builder, fp32 and int4 (block 32)
        from qatforge.export.onnx import export

        settings = {"precision": "fp32"} if stage == "onnx" else {"precision": "int4", "block_size": 32}
        return export(d / "merged", d / "onnx" / settings["precision"], settings, threads=threads, log=print)
    if stage == "torchao":
        from qatforge.export.torchao import ptq

        return ptq(d / "merged", d / "torchao" / "int8-int4", "int8-int4", threads=threads, log=print)
    if stage == "qat_convert":  # a merged model converted as a QAT run's is (the same quantization path)
        from qatforge.export.torchao import qat_convert

        return qat_convert(d / "merged", d / "torchao" / "qat_converted", "int8-int4", threads=threads, log=print)
    raise ValueError(f"unknown stage {stage!r}; stages: setup, {', '.join(STAGES)}")


# --------------------------------------------------------------------------- QAT machinery check


def _quant_metrics(merged: Path, scheme: str, convs: Sequence[Sequence[dict]], max_len: int) -> dict[str, float]:
    """Eval NLL of ``merged`` (fp32) before and after ``quantize_for_deploy(scheme)``, and the mean
    KL(float || quantized), both at the answer positions (``parity.compare_answers``)."""
    import numpy as np
    import torch

    from qatforge.chat import IGNORE_INDEX, collate, encode_for_training
    from qatforge.model import load_causal_lm, load_tokenizer
    from qatforge.parity import compare_answers, mean_nll
    from qatforge.export.torchao import quantize_for_deploy

    tok = load_tokenizer(merged)
    model = load_causal_lm(merged, dtype=torch.float32).eval()
    rows = [encode_for_training(tok, c, max_len) for c in convs]
    ids = [np.asarray(r["input_ids"]) for r in rows]
    masks = [np.asarray(r["labels"]) != IGNORE_INDEX for r in rows]

    def logits() -> list[np.ndarray]:
        out = []
        for i in range(0, len(rows), 8):
            b = collate(rows[i:i + 8], tok.pad_token_id)
            with torch.no_grad():
                lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float().numpy()
            out += [x[:len(r["input_ids"])] for x, r in zip(lg, rows[i:i + 8])]  # right padding dropped
        return out

    ref = logits()
    quantize_for_deploy(model, scheme)
    m = compare_answers(ref, logits(), ids, masks)
    return {"nll_float": mean_nll(ref, ids, masks), "nll_quant": m["nll"], "kld": m["kld_mean"],
            "tokens": int(sum(m["per_seq_tokens"]))}


def qat_check(merged: Path, train_parquet: Path, eval_parquet: Path, work: Path, *, steps: int,
              scheme: str = "int2-w128", n_eval: int | None = None, max_len: int = 256, lr: float = 5e-4,
              batch_size: int = 16, seed: int = 1234, threads: int = 2) -> dict[str, Any]:
    """QAT (``scheme``) from the trained ``merged`` model vs ``steps`` plain LoRA steps then PTQ.

    Both arms train a fresh LoRA adapter on ``merged`` for ``steps`` steps with the same settings
    (the QAT arm with ``scheme``'s fake quantization), merge it, and quantize the merged model
    with ``scheme``. ``recovered_nll = (nll_ptq - nll_qat) / (nll_ptq - nll_float_plain)``:
    the share of the NLL increase of PTQ that QAT recovers; ``recovered_kld = 1 - kld_qat /
    kld_ptq`` (each KLD against its own unquantized merged model). Both are measured on the first
    ``n_eval`` conversations of ``eval_parquet`` (all when None).
    """
    from qatforge.data import read_conversations
    from qatforge.merge import merge
    from qatforge.train import TrainSettings, train_run

    convs = read_conversations(eval_parquet)[:n_eval]  # [:None] is all
    res: dict[str, Any] = {"scheme": scheme, "steps": steps, "n_eval": len(convs), "start": str(merged),
                           "settings": {"lr": lr, "batch_size": batch_size, "seed": seed, "max_len": max_len}}
    res["start_ptq"] = _quant_metrics(merged, scheme, convs, max_len)
    for arm, qs in (("ptq", None), ("qat", scheme)):
        d = work / f"qat-{arm}"
        if d.exists():
            shutil.rmtree(d)
        t0 = time.perf_counter()
        st = TrainSettings(max_steps=steps, save_steps=steps, batch_size=batch_size, lr=lr, qat_scheme=qs,
                           seed=seed, threads=threads, max_len=max_len, eval_rows=0)
        train_run(merged, train_parquet, eval_parquet, d / "checkpoints", st, work_dir=d / ".work", log=print)
        merge(merged, d / "checkpoints" / f"checkpoint-{steps}", d / "merged", qat_scheme=qs, threads=threads)
        res[arm] = {**_quant_metrics(d / "merged", scheme, convs, max_len),
                    "train_merge_s": round(time.perf_counter() - t0, 1)}
    ptq, qat = res["ptq"], res["qat"]
    gap = ptq["nll_quant"] - ptq["nll_float"]
    res["recovered_nll"] = round((ptq["nll_quant"] - qat["nll_quant"]) / gap, 4) if gap > 0 else None
    res["recovered_kld"] = round(1 - qat["kld"] / ptq["kld"], 4) if ptq["kld"] > 0 else None
    return res


def step_cost(merged: Path, train_parquet: Path, dev_parquet: Path, work: Path, arms: Mapping[str, Mapping[str, Any]],
              *, reference: str, steps: int = STEP_COST_STEPS, rounds: int = STEP_COST_ROUNDS, threads: int = 2,
              max_len: int = 2048) -> dict[str, Any]:
    """Seconds per training step of each arm (``qatforge.spec.config.train_settings`` dicts), all from
    ``merged`` (a distilled arm's teacher) on the same batches: ``rounds`` rounds, each running every
    arm once for ``steps`` steps in turn (interleaved, so drift of the machine hits every arm alike),
    no checkpoint evaluation, one save at the end. Per arm the median of its rounds, and its ratio
    to the median of ``reference``."""
    from qatforge.train import TrainSettings, train_run

    per: dict[str, list[float]] = {name: [] for name in arms}
    for k in range(rounds):
        for name, spec in arms.items():
            d = work / f"{name}-{k}"
            if d.exists():
                shutil.rmtree(d)
            st = TrainSettings.from_config(spec, max_steps=steps, save_steps=steps, eval_rows=0, threads=threads,
                                           max_len=max_len, backend="hf")
            info = train_run(merged, train_parquet, dev_parquet, d / "checkpoints", st, work_dir=d / ".work",
                             log=lambda _m: None)
            per[name].append(float(info["seconds_per_step"]))
            shutil.rmtree(d)
    med = {name: statistics.median(v) for name, v in per.items()}
    return {"steps": steps, "rounds": rounds, "threads": threads, "reference": reference, "seconds_per_step": per,
            "median_s": med, "ratio": {name: round(med[name] / med[reference], 3) for name in arms}}


def step_cost_arms(config: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The arms of the step-cost section: each distilled QAT run as configured, and per LoRA rank
    and row order among them a plain LoRA arm (``lora-r<r>``, ``-<sampling>`` unless random: the
    baseline's settings at that rank and order, so both see the same padding). Returns the arms
    and, per QAT run, the plain arm it is judged against."""
    from qatforge.spec import config as qcfg

    base_run = qcfg.baseline_runs(config)[0]
    arms: dict[str, dict[str, Any]] = {}
    against: dict[str, str] = {}
    for run in qcfg.qat_runs(config):
        spec = qcfg.train_settings(config, run)
        if not spec.get("distill"):
            continue
        sampling = spec.get("sampling", "random")
        plain = f"lora-r{spec['lora']['r']}" + ("" if sampling == "random" else f"-{sampling}")
        if plain not in arms:
            ref = copy.deepcopy(qcfg.train_settings(config, base_run))
            ref["lora"] = {**ref["lora"], "r": spec["lora"]["r"], "alpha": spec["lora"]["alpha"]}
            ref["sampling"] = sampling
            arms[plain] = ref
        arms[run] = spec
        against[run] = plain
    return arms, against



# --------------------------------------------------------------------------- driver


def environment() -> dict[str, Any]:
    import psutil

    return {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
            "cpus": os.cpu_count(), "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "versions": package_versions("snakemake", "torch", "transformers", "torchao", "onnxruntime-genai",
                                         "onnxruntime", "llama_cpp_python", "gguf")}


def write_summary(out: Path, command: str) -> Path:
    figs = {s: read_json(out / f"{s}.json") for s in SECTIONS if (out / f"{s}.json").is_file()}
    env = environment()
    text = (f"# qatforge performance\n\nMeasured {env['date_utc']} on {env['cpus']} CPUs, {env['mem_gib']} GiB RAM "
            f"(Python {env['python']}, snakemake {env['versions'].get('snakemake')}, torch "
            f"{env['versions'].get('torch')}) by `{command}`; figures in `{out}/<section>.json`.\n\n"
            + summary_table(figs))
    path = out / "summary.md"
    path.write_text(text)
    return path


def _built(proj: Path) -> bool:
    return (proj / REPORT).is_file()


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    project = Path(args.project).resolve()
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    sections = args.only.split(",") if args.only else list(QUICK_SECTIONS if args.quick else SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; sections: {', '.join(SECTIONS)}")
    sizes = args.sizes.split(",") if args.sizes else (["4M", "50M"] if args.quick else list(SIZES))
    command = "python bench/perf.py " + " ".join(args.argv)
    proj = work / "project"
    failed = []
    for section in (s for s in SECTIONS if s in sections):
        print(f"== {section}", flush=True)
        try:
            if section in NEEDS_BUILD and not _built(proj):
                raise PerfError(f"{proj} is not built (run the 'cold' section first)")
            if section == "cold":
                res = bench_cold(project, work, args.cores)
            elif section == "parallel":
                res = bench_parallel(proj, work, args.cores)
            elif section == "incremental":
                cold = read_json(out / "cold.json") if (out / "cold.json").is_file() else {}
                res = bench_incremental(proj, work, args.cores, cold.get("wall_s"))
            elif section == "noop":
                res = bench_noop(proj, work, args.repeats)
            elif section == "dag":
                res = bench_dag(project, work, args.repeats)
            elif section == "growth":
                res = bench_growth(work, sizes, project / "data" / "chat.jsonl", args.threads, args.keep_work,
                                   partial=out / "growth.json")
            elif section == "qat":
                res = bench_qat(proj, work, args)
            elif section == "step_cost":
                res = bench_step_cost(proj, work, args)
            elif section == "scale":
                res = bench_scale(project, work, args.cores, args.threads, args.scale_size)
            else:
                res = bench_qat_modes(proj, work, args.cores)
        except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
            failed.append(section)
            res = {"error": str(e) if isinstance(e, PerfError) else f"{type(e).__name__}: {e}"}
            print(f"{section} failed: {e}", file=sys.stderr, flush=True)
        res["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        res["harness_command"] = command
        write_json(out / f"{section}.json", res)
        if section == "scale" and "kinds" in (res.get("resource_slopes") or {}):
            write_json(out / "resource_slopes.json", res["resource_slopes"])  # cp to bench/ to use it
    print(write_summary(out, command).read_text())
    if not args.keep_work and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def scale_config(config: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """The default config on ``base`` with a few steps and prompts: every rule kind still runs
    (baseline, one distilled QAT run, GGUF Q4_K_M, the QAT mix Q4_0 and an imatrix quant, TorchAO,
    ONNX fp32 and int4)."""
    cfg = copy.deepcopy(dict(config))
    # the GGUF- and ONNX-targeted QAT runs' jobs are of qat-int8-int4's kinds
    cfg["runs"] = {k: v for k, v in cfg["runs"].items() if k not in ("qat-gguf-q4_0", "qat-onnx-int4")}
    cfg["model"] = {**cfg["model"], "base": str(base), "name": "Scale06B"}
    few = {"max_steps": 2, "save_steps": 1, "batch_size": 8}
    cfg["train"] = {**cfg["train"], **few}
    for spec in cfg["runs"].values():
        if spec.get("train"):
            spec["train"] = {**spec["train"], **few}
    cfg["eval"] = {**cfg["eval"], "n_prompts": 4, "n_nll": 4, "max_new_tokens": 8, "speed_prompts": 1,
                   "speed_repeats": 1}
    cfg["gguf"] = {**cfg["gguf"], "imatrix": {"chunks": 4, "ctx": 128},
                   "quants": {q: v for q, v in cfg["gguf"]["quants"].items() if q in ("Q4_K_M", "Q4_0", "IQ4_XS")}}
    cfg["torchao"] = {**cfg["torchao"], "schemes": ["int8-int4"]}
    cfg["onnx"] = {**cfg["onnx"], "variants": {k: v for k, v in cfg["onnx"]["variants"].items() if k in ("fp32", "int4")}}
    cfg["report"] = {**cfg["report"], "fail_on_parity": False}  # a random-init model: parity is not the point
    return cfg


def scale_bound_mb(job: str, params: int, distilled_runs: Sequence[str]) -> tuple[float, str]:
    """The issue's peak-RSS bound (MiB) of one job (its benchmark path, ``<rule>/<wildcards...>``)
    and how it is made."""
    gib = 1024.0
    rule, *parts = job.split("/")
    if rule in SCALE_HOLD_FP32:
        models = 2 if any(r in parts for r in distilled_runs) else 1
        return 2 * models * params * 4 / MiB + gib, f"2 x fp32 x {models} model{'s' * (models > 1)} + 1 GiB"
    return 2.5 * params * 2 / MiB + gib, "2.5 x bf16 + 1 GiB"


def _project(rss_mb: float, factor: float) -> float:
    """A peak RSS scaled to ``factor`` x the parameters: the libraries' footprint
    (``RSS_JUDGED_FROM_MB``) stays, the rest grows with the model."""
    fixed = min(rss_mb, RSS_JUDGED_FROM_MB)
    return fixed + (rss_mb - fixed) * factor


def scale_rows(jobs: Sequence[Mapping[str, Any]], params: int, distilled_runs: Sequence[str]) -> list[dict[str, Any]]:
    """One row per benchmarked job: wall, peak RSS, x bf16, its bound and the projections."""
    bf16 = params * 2 / MiB
    rows = []
    for j in jobs:
        bound, how = scale_bound_mb(j["job"], params, distilled_runs)
        rss = j.get("max_rss_mb")
        rows.append({**j, "x_bf16": None if rss is None else round(rss / bf16, 2), "bound_mb": round(bound),
                     "bound": how, "within": None if rss is None else rss <= bound,
                     "projected_mb": {k: None if rss is None else round(_project(rss, p / params)) for k, p in SCALE_PROJECT.items()}})
    return rows


def scale_slopes(table: Mapping[str, Any], cfg: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]], params: int,
                 vocab: int, note: str) -> dict[str, Any]:
    """The resource table (``qatforge.spec.resources``) refitted to the scale run: per rule kind the
    job with the largest peak RSS, its wall time and its :class:`~qatforge.spec.resources.Load`."""
    from dataclasses import asdict

    from qatforge.spec import resources as R

    size = R.ModelSize(params, vocab, "scale bench")
    runs: dict[str, dict[str, Any]] = {}
    for j in jobs:
        rule, *parts = j["job"].split("/")
        if rule not in R.RULES or j.get("max_rss_mb") is None:
            continue
        wc = {"run": parts[0]} if parts and rule not in ("build_base", "prepare_data", "gguf_check") else {}
        if rule == "evaluate":
            wc["format"], wc["variant"] = parts[1].split("-", 1)
        elif rule == "onnx_export":
            wc["variant"] = parts[1]
        kind = R.kind_of(rule, cfg, wc, table["kinds"])
        load = R.job_load(rule, cfg, size, wc, table["tokens_per_conversation"])
        if kind not in runs or j["max_rss_mb"] > runs[kind]["mem_mib"]:
            runs[kind] = {"mem_mib": j["max_rss_mb"], "seconds": j["s"], "load": asdict(load)}
    measured = {**table["measured"], "note": note, "date": time.strftime("%Y-%m-%d"),
                "load": asdict(R.Load(params, vocab)), "runs": {**table["measured"]["runs"], **runs}}
    return R.refit({**table, "measured": measured})


def bench_scale(project: Path, work: Path, cores: str, threads: int, size: str = "0.6B") -> dict[str, Any]:
    """The whole DAG on a random-init base of ``SIZES[size]`` (0.6B: Qwen3-0.6B's shape)."""
    import yaml

    from qatforge.spec import config as qcfg

    d = work / f"scale-{size}"
    d.mkdir(parents=True, exist_ok=True)
    setup: dict[str, Any] = {"reused": str(d / "setup.json")}  # a kept --work directory's base is reused
    if not (d / "setup.json").is_file() or not (d / "base" / "model.safetensors").is_file():
        setup = measure(_stage_cmd("setup", d, size=size, data=(project / "data" / "chat.jsonl").resolve(),
                                   threads=threads), log_file=work / "logs" / "scale-setup.log")
    info = read_json(d / "setup.json")
    cfg = yaml.safe_load((project / "config" / "config.yaml").read_text())
    cfg = scale_config(cfg, (d / "base").resolve())
    proj = copy_project(project, work / "scale-project", cfg)
    dry = measure(smk("-n", REPORT), cwd=proj, log_file=work / "logs" / "scale-dry.log")
    r = _smk_run(proj, work / "logs" / "scale.log", REPORT, "--cores", cores, "--keep-going", check=False)
    distilled = [run for run in cfg["runs"] if (qcfg.train_settings(cfg, run) or {}).get("distill")]
    jobs = job_times(proj / "benchmarks")
    rows = scale_rows(jobs, info["params"], distilled)
    peak = max((j.get("max_rss_mb") or 0) for j in jobs) if jobs else None
    slopes = None
    try:  # what `make bench` measures becomes the resource table's slopes (copy it to bench/ to use it)
        from qatforge.spec import resources as R

        vocab = SIZES[size].get("vocab") or 1024
        slopes = scale_slopes(R.load_table(), cfg, jobs, info["params"], vocab,
                              f"bench/perf.py scale section: random-init {size} base, {cores} cores")
    except Exception as e:  # noqa: BLE001 - the measurements stand without the refit
        slopes = {"error": f"{type(e).__name__}: {e}"}
    return {"what": "the whole DAG (scale_config: few steps and prompts) on a random-init base of Qwen3-0.6B's "
                    "shape; per job its benchmark: TSV (wall s, max_rss sampled by Snakemake: a lower bound); "
                    "projected_mb scales the peak above the libraries' footprint by the parameter count (Qwen3 1.7B/4B/8B)",
            "size": size, "params": info["params"], "bf16_mb": round(info["params"] * 2 / MiB, 1), "dims": SIZES[size],
            "setup": setup, "dry_run": dry, "command": f"snakemake --cores {cores} {REPORT}", **r,
            "completed": r["returncode"] == 0, "peak_rss_mb": peak, "within_24gib": peak is not None and peak <= 24 * 1024,
            "rows": rows, "summed_job_s": round(sum(j["s"] for j in jobs), 1), "config": cfg,
            "resource_slopes": slopes}


def unsloth_twin(config: Mapping[str, Any], run: str) -> tuple[str, dict[str, Any]]:
    """The run ``<run>-unsloth``: ``run``'s settings with ``qat.mode: unsloth`` (fq(W) + s·B·A) and,
    as Unsloth trains, the format's own block scales (learned ones train merge-exact only)."""
    spec = copy.deepcopy(dict(config["runs"][run]))
    spec["qat"] = {**(spec.get("qat") or {}), "mode": "unsloth", "block_scales": "format"}
    return f"{run}-unsloth", spec


def bench_qat_modes(proj: Path, work: Path, cores: str) -> dict[str, Any]:
    """The built default plus an Unsloth-mode twin of each merge-exact torchao QAT run (identical
    settings otherwise), built into the same report: ``qat_vs_ptq.csv`` then pairs both designs
    with the same PTQ artifact on the same test set."""
    import yaml

    from qatforge.spec import config as qcfg
    from qatforge.spec.schemes import parse_scheme

    cfg_path = proj / "config" / "config.yaml"
    original = cfg_path.read_text()
    cfg = yaml.safe_load(original)
    twins = {}
    for run in qcfg.qat_runs(cfg):
        q = cfg["runs"][run].get("qat") or {}
        if q.get("mode", "merged") == "merged" and parse_scheme(cfg["runs"][run]["qat_scheme"]).target == "torchao":
            name, spec = unsloth_twin(cfg, run)
            twins[name] = run
            cfg["runs"][name] = spec
    if not twins:
        raise PerfError("the config has no merge-exact torchao QAT run to pair with an Unsloth-mode twin")
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        r = _smk_run(proj, work / "logs" / "qat_modes.log", REPORT, "--cores", cores)
    finally:
        cfg_path.write_text(original)
    import polars as pl

    df = pl.read_csv(proj / "results" / "qat_vs_ptq.csv")
    rows = df.filter(pl.col("qat_run").is_in(list(twins) + list(twins.values()))).to_dicts()
    steps = {}
    for run in [*twins, *twins.values()]:
        t = proj / "results" / "runs" / run / "checkpoints" / "train.json"
        steps[run] = read_json(t).get("seconds_per_step") if t.is_file() else None
    return {"what": "Unsloth-mode twins of the merge-exact QAT runs, same settings, same report",
            "twins": twins, **r, "qat_vs_ptq": rows, "seconds_per_step": steps}


def bench_qat(proj: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from qatforge.spec import config as qcfg

    cfg = yaml.safe_load((proj / "config" / "config.yaml").read_text())
    if not qcfg.baseline_runs(cfg):
        raise PerfError("the QAT check starts from a baseline run's merged model; the config has none")
    base_run = qcfg.baseline_runs(cfg)[0]
    steps = args.qat_steps or cfg["train"]["max_steps"]
    res_file = work / "qat-result.json"
    cmd = [sys.executable, HARNESS, "qat", str(proj / "results" / "runs" / base_run / "merged"),
           str(proj / "results/data/train.parquet"), str(proj / "results/data/test.parquet"), str(work),
           str(res_file), "--steps", str(steps), "--scheme", args.qat_scheme,
           "--lr", str(cfg["train"]["lr"]),
           "--batch-size", str(cfg["train"]["batch_size"]), "--threads", str(args.threads)]
    m = measure(cmd, log_file=work / "logs" / "qat.log")
    return {**read_json(res_file), "process": m, "baseline_run": base_run}


def bench_step_cost(proj: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``step_cost`` of the built project's distilled QAT runs, in its own process."""
    import yaml

    from qatforge.spec import config as qcfg

    cfg = yaml.safe_load((proj / "config" / "config.yaml").read_text())
    arms, against = step_cost_arms(cfg)
    if not against:
        raise PerfError("the config has no distilled QAT run to time against a plain LoRA step")
    base_run = qcfg.baseline_runs(cfg)[0]
    arms_file, res_file = work / "step-arms.json", work / "step-result.json"
    results = {}
    for plain in sorted(set(against.values())):
        group = {plain: arms[plain], **{r: arms[r] for r, p in against.items() if p == plain}}
        write_json(arms_file, group)
        cmd = [sys.executable, HARNESS, "step", str(proj / "results" / "runs" / base_run / "merged"),
               str(proj / "results/data/train.parquet"), str(proj / "results/data/dev.parquet"), str(work / "step"),
               str(arms_file), str(res_file), "--reference", plain, "--threads", str(args.threads),
               "--max-len", str(cfg["data"]["max_tokens"])]
        m = measure(cmd, log_file=work / "logs" / f"step_cost-{plain}.log")
        results[plain] = {**read_json(res_file), "process": m}
    return {"what": "seconds per step, each distilled QAT run vs plain LoRA at its rank, interleaved",
            "baseline_run": base_run, "against": against, "groups": results}



def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stage"]:
        p = argparse.ArgumentParser(prog="python bench/perf.py stage", description="one export-growth stage")
        p.add_argument("stage", choices=("setup", *STAGES))
        p.add_argument("dir", type=Path)
        p.add_argument("--size", choices=tuple(SIZES))
        p.add_argument("--data", type=Path)
        p.add_argument("--threads", type=int, default=2)
        a = p.parse_args(argv[1:])
        run_stage(a.stage, a.dir, size=a.size, data=a.data, threads=a.threads)
        return 0
    if argv[:1] == ["qat"]:
        p = argparse.ArgumentParser(prog="python bench/perf.py qat", description=qat_check.__doc__)
        for name in ("merged", "train", "eval", "work", "result"):
            p.add_argument(name, type=Path)
        p.add_argument("--steps", type=int, required=True)
        p.add_argument("--scheme", default="int2-w128")
        p.add_argument("--n-eval", type=int, help="eval conversations scored (default: all)")
        p.add_argument("--lr", type=float, default=5e-4)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--threads", type=int, default=2)
        a = p.parse_args(argv[1:])
        res = qat_check(a.merged, a.train, a.eval, a.work, steps=a.steps, scheme=a.scheme, n_eval=a.n_eval,
                        lr=a.lr, batch_size=a.batch_size, threads=a.threads)
        write_json(a.result, res)
        return 0
    if argv[:1] == ["step"]:
        p = argparse.ArgumentParser(prog="python bench/perf.py step", description=step_cost.__doc__)
        for name in ("merged", "train", "dev", "work", "arms", "result"):
            p.add_argument(name, type=Path)
        p.add_argument("--reference", required=True)
        p.add_argument("--steps", type=int, default=STEP_COST_STEPS)
        p.add_argument("--rounds", type=int, default=STEP_COST_ROUNDS)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--max-len", type=int, default=2048)
        a = p.parse_args(argv[1:])
        write_json(a.result, step_cost(a.merged, a.train, a.dev, a.work, read_json(a.arms), reference=a.reference,
                                       steps=a.steps, rounds=a.rounds, threads=a.threads, max_len=a.max_len))
        return 0
    p = argparse.ArgumentParser(prog="python bench/perf.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/perf", help="where the JSONs and summary.md go")
    p.add_argument("--quick", action="store_true", help="only dag and growth at 4M/50M (development)")
    p.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--project", default=".", help="the qatforge project directory (has the Snakefile)")
    p.add_argument("--work", help="scratch directory (default <out>/work; removed after a clean run)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    p.add_argument("--cores", default="all", help="cores of the cold/incremental builds and the parallel run")
    p.add_argument("--sizes", help=f"growth sizes, comma-separated, of {','.join(SIZES)}")
    p.add_argument("--threads", type=int, default=2, help="torch/llama.cpp threads of growth and qat stages")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the cheap figures (no-op, dry-run)")
    p.add_argument("--qat-steps", type=int, help="steps of each QAT-check arm (default: train.max_steps)")
    p.add_argument("--qat-scheme", default="int2-w128")
    p.add_argument("--scale-size", default="0.6B", choices=tuple(SIZES), help="the scale section's base shape")
    a = p.parse_args(argv)
    a.argv = argv
    return run(a)


if __name__ == "__main__":
    sys.exit(main())

"""The report plots: quality against the baseline merged model vs size with its Pareto front and
QAT/PTQ links, tokens/s per artifact."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from qatforge.io import atomic_dir
from qatforge.report.compare import baseline_run, find_row, to_baseline
from qatforge.report.load import FORMAT_ORDER, deployed, label
from qatforge.spec.formats import FORMATS, MERGED_ARTIFACT

KLD_FLOOR = 1e-6  # KLDs below this (an fp32 export: ~1e-12) are drawn at it on the log axis
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown")


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


def _declutter(ax: Any, texts: Sequence[Any], step: float = 8.0) -> None:
    """Nudge point labels (offset annotations) upwards in display space until none overlaps another."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for t in sorted(texts, key=lambda t: tuple(ax.transData.transform(t.xy)[::-1])):
        for _ in range(40):
            box = t.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(b) for b in placed):
                break
            x, y = t.get_position()
            t.set_position((x, y + step))
        placed.append(t.get_window_extent(renderer))


def _quality_panel(ax: Any, points: Sequence[tuple[Mapping, float]], colors: Mapping[str, str], ylabel: str,
                   off: Sequence[tuple[str, float]], pairs: Sequence[Mapping], base_run: str | None, log_y: bool) -> None:
    """One quality-vs-size panel: ``points`` (row, loss against the baseline merged model; lower is
    better), the Pareto front over rows passing parity, an arrow from each PTQ file to its QAT twin,
    and ``off`` (label, value) rows noted at the top edge instead of plotted (the base model)."""
    import matplotlib.ticker

    for fmt, c in colors.items():
        for passed, marker in ((True, "o"), (False, "x")):
            pick = [(r, y) for r, y in points if r["format"] == fmt and bool(r["parity_pass"]) == passed]
            if pick:
                ax.scatter([r["size_mb"] for r, _ in pick], [y for _, y in pick], c=c, marker=marker, s=36, zorder=3,
                           label=fmt if passed else f"{fmt} (parity fails)")
    where = {(r["run"], r["format"], r["variant"]): (r["size_mb"], y) for r, y in points}
    for it in pairs:
        a = where.get((it["baseline_run"], it["format"], it["variant"]))
        b = where.get((it["qat_run"], it["format"], it["variant"]))
        if a and b:
            ax.annotate("", xy=b, xytext=a, arrowprops={"arrowstyle": "->", "color": "0.3", "lw": 1.0}, zorder=2)
    passing = [(r, y) for r, y in points if r["parity_pass"]]
    front = pareto_front([(r["size_mb"], -y) for r, y in passing])
    if front:
        ax.plot([passing[i][0]["size_mb"] for i in front], [passing[i][1] for i in front], "k--", lw=0.8,
                label="Pareto front (parity passes)")
    texts = [ax.annotate((r["variant"] if r["run"] == base_run else f"{r['variant']} ({r['run']})")
                         + (" ✗" if r["parity_pass"] is False else ""), (r["size_mb"], y), fontsize=6,
                         xytext=(4, 2), textcoords="offset points") for r, y in points]
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("size on disk (MiB, log)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.margins(y=0.12)  # room for the off-scale note
    if off:
        ax.text(0.01, 0.99, "off scale: " + ", ".join(f"{n} {v:.3g}" for n, v in off), transform=ax.transAxes,
                fontsize=7, va="top", color="0.25")
    _declutter(ax, texts)


def make_plots(rows: Sequence[Mapping], plots_dir: str | Path, pairs: Sequence[Mapping] = ()) -> list[Path]:
    """quality_vs_size.png: every deployment file's NLL added and KLD against the baseline merged model
    (the model the user fine-tuned) by size, Pareto front, an arrow from each PTQ file to the QAT file
    of the same quantizer (``pairs``: ``compare.qat_vs_ptq`` items); the base model is named at the
    top, outside the axes' range. tokens_per_s.png: medians, spread bars (the base in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    colors = {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(FORMATS)}
    base_run = baseline_run(rows)
    base = find_row(rows, base_run, *MERGED_ARTIFACT) if base_run else None
    pairs = [it for it in pairs if it.get("qat") and it.get("ptq")]
    names = ["quality_vs_size.png", "tokens_per_s.png"]
    with atomic_dir(plots_dir) as tmp:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
        sized = [r for r in rows if r["size_mb"] is not None]
        for ax, measure in zip(axes, ("nll", "kld")):
            if measure == "nll":
                ref = base["nll"] if base and base.get("nll") is not None else 0.0
                vals = [(r, r["nll"] - ref) for r in sized if r.get("nll") is not None]
                ylabel = ("NLL added vs the baseline merged model (nats/token)" if base
                          else "NLL (nats/token, lower is better)")
            else:
                vals = [(r, max(v, KLD_FLOOR)) for r in sized if (v := to_baseline(r, "kld_mean")) is not None]
                ylabel = f"KLD to the baseline merged model (log; floor {KLD_FLOOR:g})"
            points = [(r, y) for r, y in vals if deployed(r)]
            off = [("base model (before fine-tuning)", y) for r, y in vals if not deployed(r)]
            _quality_panel(ax, points, colors, ylabel, off, pairs, base_run, log_y=measure == "kld")
        fig.suptitle("Quality vs size per file, against the baseline merged model (lower is better; "
                     "arrows: PTQ file → QAT file of the same quantizer)", fontsize=10)
        legend = {lbl: h for ax in axes for h, lbl in zip(*ax.get_legend_handles_labels())}
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(len(legend), 7), fontsize=8)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.savefig(tmp / names[0], dpi=110)
        plt.close(fig)

        srt = sorted(rows, key=lambda r: (r["run"], FORMAT_ORDER[r["format"]], r["variant"]))
        labels = [label(r) for r in srt]
        fig, axes = plt.subplots(1, 2, figsize=(13, max(3.0, 0.28 * len(srt) + 1.5)), sharey=True)
        for ax, col, title in ((axes[0], "gen_tps", "generated tokens/s"), (axes[1], "prompt_tps", "prompt tokens/s")):
            vals = [_num(r[col]) for r in srt]
            err = [[max(v - _num(r.get(f"{col}_p25"), v), 0.0) for v, r in zip(vals, srt)],
                   [max(_num(r.get(f"{col}_p75"), v) - v, 0.0) for v, r in zip(vals, srt)]]
            ax.barh(range(len(srt)), vals, xerr=err, capsize=2,
                    color=[colors[r["format"]] if deployed(r) else "tab:gray" for r in srt])
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

"""The report plots: quality vs size with its Pareto front, tokens/s per artifact."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from qatforge.io import atomic_dir
from qatforge.report.load import FORMAT_ORDER, deployed, label
from qatforge.spec.formats import FORMATS

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


def make_plots(rows: Sequence[Mapping], plots_dir: str | Path) -> list[Path]:
    """quality_vs_size.png (accuracy and NLL vs size, Pareto front; the base model as a black star, off
    the front) and tokens_per_s.png (medians, spread bars; the base in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(FORMATS)}
    good = [r for r in rows if r["size_mb"] is not None and r["accuracy"] is not None]
    refs = [r for r in good if not deployed(r)]
    good = [r for r in good if deployed(r)]
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

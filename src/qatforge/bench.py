"""Small measurement helpers: peak RSS, artifact size, wall-clock timing (stdlib only)."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from qatforge.io import size_bytes


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``getrusage``)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return kb / (2**20 if sys.platform == "darwin" else 2**10)


def size_mb(path: str | Path) -> float:
    """Size of a file or directory tree on disk, in MiB."""
    return size_bytes(path) / 2**20


class Timer:
    """Context manager measuring elapsed wall time in seconds (``.s``)."""

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        self.s = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self._t0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Call ``fn()`` once; return (result, seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn)[1] for _ in range(repeats))


def throughput(n_tokens: int, seconds: float) -> float:
    """Tokens per second (0 when nothing was timed)."""
    return n_tokens / seconds if seconds > 0 else 0.0

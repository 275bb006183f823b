"""Small measurement helpers of the evaluation: peak RSS and artifact size (stdlib only)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from qatforge.io import size_bytes


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``getrusage``)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return kb / (2**20 if sys.platform == "darwin" else 2**10)


def size_mb(path: str | Path) -> float:
    """Size of a file or directory tree on disk, in MiB."""
    return size_bytes(path) / 2**20

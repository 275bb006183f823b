"""Small measurement helpers of the evaluation: peak RSS and artifact size (stdlib only)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from qatforge.io import size_bytes


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: ``VmHWM`` (Linux, restarted by ``reset_peak_rss``),
    else ``getrusage``, which on Linux also counts the spawning process's memory from before exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return kb / (2**20 if sys.platform == "darwin" else 2**10)


def size_mb(path: str | Path) -> float:
    """Size of a file or directory tree on disk, in MiB."""
    return size_bytes(path) / 2**20


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS mark at its current RSS (Linux ``/proc/self/clear_refs``).

    False where that is unsupported. Read ``peak_rss_mb`` first when the whole-process peak is
    still wanted.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


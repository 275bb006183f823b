"""Running llama.cpp's tools and recording which llama.cpp they came from.

All tools come from one build of the pinned llama.cpp sources (``make install``).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, Mapping, Sequence

from qatforge.export.record import Log
from qatforge.io import package_versions


def tool_info() -> dict[str, Any]:
    """llama.cpp provenance: vendored source versions (commit, ggml) and the bindings' version."""
    from qatforge import llamacpp

    return {"name": "llama.cpp", **llamacpp.source_info(), **package_versions("llama_cpp_python")}


def run_tool(cmd: Sequence[str], log: Log, *, env: Mapping[str, str] | None = None,
             cwd: str | os.PathLike | None = None, what: str) -> str:
    """Run ``cmd``, stream its output into the log, raise with the output tail on failure."""
    log(f"$ {' '.join(str(c) for c in cmd)}" + (f"  (in {cwd})" if cwd else ""))
    proc = subprocess.run([str(c) for c in cmd], env=dict(env) if env is not None else None, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    out = proc.stdout or ""
    for line in out.splitlines():
        log(f"  {line}")
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-30:])
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}):\n{tail}")
    return out

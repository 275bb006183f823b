"""Export records (``export.json`` / ``<file>.json``) and the plain-text log shared by the exporters.

No heavy imports: the GGUF/ONNX/torchao exporters import this in their worker processes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from qatforge.io import MANIFEST, read_json, sha256_path, write_manifest

class Log:
    """Append timestamped lines to a log file (``log`` path), a callable, or stderr when ``None``."""

    def __init__(self, log: str | os.PathLike | Callable[[str], None] | None = None):
        self._target = log
        self.path = Path(log) if isinstance(log, (str, os.PathLike)) else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        if callable(self._target):  # e.g. a logging.Logger's .info, which stamps lines itself
            self._target(msg)
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        else:
            print(line, file=sys.stderr, flush=True)


def as_log(log: Any) -> Log:
    return log if isinstance(log, Log) else Log(log)


def source_record(merged_dir: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """Where an export comes from: merged dir, its sha256 (from its manifest when present), plus ``extra``.

    ``extra`` typically holds ``run`` and ``checkpoint`` (e.g. ``checkpoint-80``).
    """
    merged_dir = Path(merged_dir)
    manifest = merged_dir / MANIFEST
    sha, inherited = None, {}
    if manifest.is_file():
        rec = read_json(manifest)
        sha = rec.get("sha256")
        prov = rec.get("provenance") or {}
        inherited = {k: prov[k] for k in ("run", "checkpoint", "qat_scheme") if prov.get(k) is not None}
    if sha is None:
        sha = sha256_path(merged_dir)
    return {
        "merged_dir": str(merged_dir),
        "merged_sha256": sha,
        **inherited,
        **{k: v for k, v in extra.items() if v is not None},
    }


def write_export_record(
    artifact: str | os.PathLike,
    *,
    source: dict[str, Any],
    tool: dict[str, Any],
    settings: dict[str, Any],
    started: float,
    **extra: Any,
) -> dict[str, Any]:
    """Write the export record beside/inside ``artifact`` (sha256 and size via ``write_manifest``).

    ``started`` is a ``time.perf_counter()`` value; the duration up to now is recorded.
    """
    provenance = {
        "source": source,
        "tool": tool,
        "settings": settings,
        "duration_s": round(time.perf_counter() - started, 3),
        "python": sys.version.split()[0],
        **extra,
    }
    return write_manifest(artifact, provenance)



def hf_tied_embeddings(model_dir: str | os.PathLike) -> bool:
    """Whether an HF checkpoint ties its LM head to the input embedding: ``save_pretrained`` then
    stores no separate ``lm_head.weight`` (read from the safetensors headers, not the config,
    whose omitted defaults differ by family)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights")
    for f in files:
        with safe_open(str(f), framework="numpy") as sf:
            if any(k.endswith("lm_head.weight") for k in sf.keys()):
                return False
    return True

"""Evaluation of HF artifacts (merged checkpoint, TorchAO directories) with transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatforge.hf_runtime import HFRuntime


def open_runtime(artifact_path: str | Path, ref: Any, *, format: str, threads: int,
                 max_new_tokens: int, trust_remote_code: bool = False) -> tuple[HFRuntime, dict[str, Any]]:
    """An HF (``format='hf'``, fp32 compute) or TorchAO (``'torchao'``, stored dtype) directory."""
    import torch

    torch.set_num_threads(threads)
    rt = HFRuntime(
        artifact_path, compute_dtype="float32" if format == "hf" else "auto", trust_remote_code=trust_remote_code
    )
    return rt, {"runtime": "transformers", "compute_dtype": rt.compute_dtype}

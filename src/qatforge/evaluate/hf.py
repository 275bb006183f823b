"""Evaluation of HF artifacts (merged checkpoint, TorchAO directories) with transformers.

The merged model computes in float32, the reference format, in both passes; a TorchAO directory
runs in its stored dtype with torchao's quantized tensor subclasses (their kernels), never upcast.
"""

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


def open_speed_runtime(artifact_path: str | Path, ref: Any, *, format: str, threads: int,
                       max_new_tokens: int, trust_remote_code: bool = False) -> tuple[HFRuntime, dict[str, Any]]:
    """A second instance as deployed: same dtype rule, ``use_cache=True`` decoding, ``threads`` torch threads."""
    import torch

    rt, about = open_runtime(artifact_path, ref, format=format, threads=threads, max_new_tokens=max_new_tokens,
                             trust_remote_code=trust_remote_code)
    weights = sorted({type(m.weight).__name__ for m in rt.model.modules() if isinstance(m, torch.nn.Linear)})
    return rt, {**about, "use_cache": True, "torch_threads": torch.get_num_threads(), "linear_weight_types": weights,
                "timing": "wall clock (time.perf_counter)"}

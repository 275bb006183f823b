"""The artifact formats: their names, per-format job resources and the GGUF header check.

The one place these facts live; imported at Snakefile parse time, so no heavy imports at module level.
"""

from __future__ import annotations

import struct
from pathlib import Path

# Every artifact the report lists is one of these formats (results/eval/<run>/<format>/<variant>.json).
FORMATS = ("hf", "torchao", "gguf", "onnx")
# Memory (MiB) of one evaluation job per format, used by the evaluate rule's resources.
EVAL_MEM_MB = {"hf": 4000, "torchao": 4000, "gguf": 2000, "onnx": 3000}
# The base model (results/base), evaluated as a row of the first baseline run to show the fine-tuning gain.
BASE_ARTIFACT = ("hf", "base")
# (format, variant) rows that are evaluated but are no export of the run's merged model, with the
# reason: parity does not apply to them (no verdict, no gate, never recommended).
REFERENCE_ONLY = {BASE_ARTIFACT: "the base is not an export of the merged model"}


def is_deployment_artifact(fmt: str, variant: str) -> bool:
    """Whether (format, variant) is an export of the run's merged model, so that parity applies."""
    return (fmt, variant) not in REFERENCE_ONLY

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)


class ArtifactError(ValueError):
    """A file that is truncated, foreign or of an unsupported version."""


def check_gguf(path: str | Path) -> int:
    """Validate a GGUF header (magic, version, counts) and return the version."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: GGUF file does not exist")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        raise ArtifactError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(head) < 24:
        raise ArtifactError(f"{path}: truncated GGUF file ({len(head)} bytes, header needs 24)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in GGUF_VERSIONS:
        raise ArtifactError(f"{path}: unsupported GGUF version {version} (supported: {GGUF_VERSIONS})")
    if n_tensors == 0 or n_kv == 0:
        raise ArtifactError(f"{path}: GGUF file has {n_tensors} tensors and {n_kv} metadata keys")
    return version


"""Facts about files on disk that parse time needs (standard library only): the provenance
manifest's name, the learned block scales' file name and a safetensors file's header."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

MANIFEST = "export.json"  # the provenance manifest beside every artifact (qatforge.io writes it)
# beside a merged checkpoint whose run learned its block scales (qatforge.learned_scales); not a model shard
SCALES_FILE = "qat_block_scales.safetensors"


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header (tensor name -> dtype, shape, offsets) and the byte offset
    where its data starts; no tensor is read."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n

"""``MatMulNBits`` int4 weights of an ONNX Runtime GenAI folder rewritten, in place, under the block
scales a QAT run learned (``qatforge.learned_scales.SCALES_FILE`` beside its merged checkpoint).

The builder quantizes each weight with MLAS's own scales (the block's signed extreme over -8). For
each ``MatMulNBits`` node whose weights learned their scales, this writes the node's ``scales``
initializer (float32 ``[N, K/32]``) with the learned ones and its ``B`` initializer (uint8
``[N, K/32, 16]``: element ``2j`` of a block in the low nibble of byte ``j``, ``2j + 1`` in the high)
with the merged weight's levels under them, as MLAS rounds given a scale
(:func:`qatforge.onnx_fake_quant.levels_with_scales`, the training forward's rounding). Only the
bytes of those initializers in the external data file change.

Node → weights: the builder names a node's weight ``<prefix>.MatMul.weight_Q4``, with ``attn`` for
the HF ``self_attn`` and q, k and v fused into ``qkv_proj`` (stacked along N in that order).
Before any byte is written, the scales the builder stored must equal the format's own scales of
those merged weights bit for bit: a node read wrongly, or a folder built from another checkpoint,
is refused.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 32
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def hf_weights(prefix: str) -> list[str]:
    """The HF weight names a builder weight prefix holds, in stacking order."""
    parts = prefix.split(".")
    parts = ["self_attn" if p == "attn" else p for p in parts]
    head, last = ".".join(parts[:-1]), parts[-1]
    names = _FUSED.get(last, (last,))
    return [f"{head}.{n}.weight" if head else f"{n}.weight" for n in names]


def _external(init: Any) -> tuple[str, int, int]:
    """Where an initializer's bytes are: its external data file, offset and length."""
    info = {e.key: e.value for e in init.external_data}
    if "location" not in info or "length" not in info:
        raise ValueError(f"{init.name} is stored inside model.onnx, not in external data; the rewrite needs "
                         "the builder's external data layout")
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def _read(folder: Path, init: Any, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    location, offset, length = _external(init)
    with open(folder / location, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def pack(levels: np.ndarray) -> np.ndarray:
    """MatMulNBits' 4-bit blob of levels ``[N, K]`` (0..15): uint8 ``[N, K/32, 16]``."""
    n, k = levels.shape
    pairs = levels.astype(np.uint8).reshape(n, k // BLOCK, BLOCK // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def write_learned_scales(folder: str | os.PathLike, merged_dir: str | os.PathLike,
                         scales_file: str | os.PathLike) -> dict[str, Any]:
    """Rewrite the ``MatMulNBits`` weights of ``folder`` whose merged weights (``merged_dir``)
    learned scales in ``scales_file``; every learned weight must be written. Returns what was written."""
    import onnx
    import torch

    from qatforge.learned_scales import merged_weights, ratio_record, read_scales
    from qatforge.onnx_fake_quant import levels_with_scales

    folder = Path(folder)
    names_learned, saved = read_scales(scales_file, "MatMulNBits int4")
    learned = set(names_learned)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    jobs = []
    for node in graph.node:
        if node.op_type != "MatMulNBits" or not node.input[1].endswith(".MatMul.weight_Q4"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        names = hf_weights(node.input[1][: -len(".MatMul.weight_Q4")])
        if not set(names) & learned:
            continue
        if set(names) - learned:
            raise KeyError(f"{node.name}: learned block scales for some of {names} but not all")
        if (attrs.get("bits"), attrs.get("block_size")) != (4, BLOCK):
            raise ValueError(f"{node.name}: MatMulNBits bits {attrs.get('bits')} block {attrs.get('block_size')}, "
                             f"not int4 in blocks of {BLOCK}")
        n, k = int(attrs["N"]), int(attrs["K"])
        b_init, s_init = inits[node.input[1]], inits[node.input[2]]
        own = torch.cat([saved[f"{h}.d_format"] for h in names])
        stored = torch.from_numpy(_read(folder, s_init, np.float32, (n, k // BLOCK)).copy())
        if own.shape != stored.shape or not torch.equal(own.view(torch.int32), stored.view(torch.int32)):
            raise ValueError(f"{folder}: {node.name}'s scales are not the builder's own scales of {names} as "
                             "merged; it was built from another checkpoint, or the node is read wrongly")
        jobs.append((names, b_init, s_init, own))
    missing = learned - {h for job in jobs for h in job[0]}
    if missing:
        raise KeyError(f"{folder}: no MatMulNBits node for the learned weights {sorted(missing)[:5]}")
    read = merged_weights(merged_dir)
    files: dict[str, Any] = {}
    pairs = []  # (learned, the builder's own) scales, for the record
    with contextlib.ExitStack() as stack:
        for names, b_init, s_init, own in jobs:
            d = torch.cat([saved[f"{h}.d"] for h in names])
            levels = levels_with_scales(torch.cat([read(h) for h in names]), d, 4, BLOCK).numpy()
            pairs.append((d, own))
            for init, data in ((b_init, pack(levels)), (s_init, d.numpy())):
                location, offset, length = _external(init)
                raw = np.ascontiguousarray(data).tobytes()
                if len(raw) != length:
                    raise ValueError(f"{init.name}: {len(raw)} bytes to write into {length}")
                if location not in files:
                    files[location] = stack.enter_context(open(folder / location, "r+b"))
                files[location].seek(offset)
                files[location].write(raw)
    return ratio_record(pairs, "nodes", len(jobs))

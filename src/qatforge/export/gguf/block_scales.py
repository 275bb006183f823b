"""Q4_0 tensors of a GGUF rewritten, in place, under block scales chosen by the caller.

``llama-quantize`` picks every Q4_0 block's scale itself (``d = max / -8``). A QAT run that learns
its block scales needs the file written with those scales instead; everything else in the file
(the other tensors' types, metadata, alignment) stays what ``llama-quantize`` wrote, so the
rewrite only replaces the bytes of each named Q4_0 tensor.

Given ``d``, a block is rounded as llama.cpp's ``quantize_row_q4_0_ref`` rounds it:
``id = 1/d`` in float32, ``q = trunc(x·id + 8.5)``, stored as ``fp16(d)`` and 16 bytes of nibbles
(element ``j`` in the low nibble of byte ``j``, element ``j + 16`` in its high nibble). ``q`` is
also clamped at 0: with its own ``d`` llama.cpp never goes below, but a learned ``d`` smaller than
``|max| / 8`` does. With ``d = max / -8`` the output is ``llama-quantize``'s byte for byte, and
the values it dequantizes to are :func:`qatforge.gguf_fake_quant.dequantized_with_scales`'.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

BLOCK_SIZE = 32
BLOCK_BYTES = 2 + BLOCK_SIZE // 2  # fp16 scale + 16 bytes of nibbles


def q4_0_blocks(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The Q4_0 bytes of float32 ``x [rows, k·32]`` under float32 scales ``d [rows, k]``: uint8 ``[rows, k·18]``
    (levels from :func:`qatforge.gguf_fake_quant.levels_with_scales`)."""
    import torch

    from qatforge.gguf_fake_quant import levels_with_scales

    x, d = np.asarray(x, np.float32), np.asarray(d, np.float32)
    if not np.isfinite(d).all():
        raise ValueError("block scales must be finite")
    q = levels_with_scales(torch.from_numpy(x), torch.from_numpy(d)).numpy().astype(np.uint8).reshape(-1, BLOCK_SIZE)
    out = np.empty((q.shape[0], BLOCK_BYTES), np.uint8)
    out[:, :2] = d.reshape(-1, 1).astype(np.float16).view(np.uint8)
    out[:, 2:] = q[:, : BLOCK_SIZE // 2] | (q[:, BLOCK_SIZE // 2:] << 4)
    return out.reshape(x.shape[0], -1)


def _values(tensor: Any) -> np.ndarray:
    """A float tensor of a GGUF as float32 ``[rows, row length]`` (F32, F16 or BF16: exact)."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in ("F32", "F16", "BF16"):
        raise ValueError(f"{tensor.name}: source tensor is {kind}; the rewrite reads F32, F16 or BF16")
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32).reshape(shape)


def rewrite_q4_0(quantized: str | os.PathLike, source: str | os.PathLike,
                 scales: Mapping[str, np.ndarray]) -> list[str]:
    """Rewrite the Q4_0 tensors of ``quantized`` named in ``scales`` (GGUF tensor names, each
    ``[rows, row length / 32]``), in place, from the values of the same tensors in ``source`` (the
    16/32-bit GGUF ``llama-quantize`` read). Every name is checked before any byte is written.
    Returns the names rewritten."""
    from gguf import GGUFReader

    src = {t.name: t for t in GGUFReader(str(source)).tensors}
    reader = GGUFReader(str(quantized), "r+")
    dst = {t.name: t for t in reader.tensors}
    jobs = []
    for name, d in scales.items():
        if name not in dst or name not in src:
            where = quantized if name not in dst else source
            raise KeyError(f"{where}: no tensor {name!r} to write block scales into")
        t = dst[name]
        if t.tensor_type.name != "Q4_0":
            raise ValueError(f"{quantized}: {name} is {t.tensor_type.name}, not Q4_0")
        rows, length = (int(n) for n in reversed(src[name].shape))
        if np.shape(d) != (rows, length // BLOCK_SIZE):
            raise ValueError(f"{name}: scales of shape {np.shape(d)}, expected {(rows, length // BLOCK_SIZE)}")
        jobs.append((name, t, d))
    for name, t, d in jobs:
        t.data[...] = q4_0_blocks(_values(src[name]), d).reshape(t.data.shape)
    reader.data.flush()
    return [name for name, _, _ in jobs]


def write_learned_scales(quantized: str | os.PathLike, source: str | os.PathLike,
                         scales_file: str | os.PathLike) -> dict[str, Any]:
    """Write the block scales a QAT run learned (``qatforge.learned_scales.SCALES_FILE`` of its merged
    checkpoint, by HF weight name) into the Q4_0 tensors of ``quantized``, in place.

    HF names map to GGUF names with gguf-py's tensor name map for the source's architecture. Each
    tensor must be the one the scales were learned on: llama.cpp's own scales of the source's
    values must equal the ``d_format`` saved beside ``d``, bit for bit (a converter that reorders
    rows, or another checkpoint, fails here, before anything is written). Returns what was written."""
    import gguf
    import torch

    from qatforge.gguf_fake_quant import block_scales
    from qatforge.learned_scales import ratio_record, read_scales

    names, saved = read_scales(scales_file, "Q4_0")
    reader = gguf.GGUFReader(str(source))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_blocks = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_id is None:
        raise ValueError(f"{source}: architecture {arch!r} is not in gguf-py's tensor name maps")
    tmap = gguf.get_tensor_name_map(arch_id, n_blocks)
    tensors = {t.name: t for t in reader.tensors}
    scales: dict[str, np.ndarray] = {}
    pairs = []  # (learned, llama.cpp's own) scales, for the record
    for hf in names:
        gname = tmap.get_name(hf, try_suffixes=(".weight",))
        if gname is None or gname not in tensors:
            raise KeyError(f"{scales_file}: no GGUF tensor in {source} for {hf} ({arch})")
        values = torch.from_numpy(_values(tensors[gname]))
        own = block_scales(values.reshape(-1, BLOCK_SIZE)).reshape(values.shape[0], -1)
        want = saved[f"{hf}.d_format"]
        if own.shape != want.shape or not torch.equal(own.view(torch.int32), want.view(torch.int32)):
            raise ValueError(f"{source}: {gname} is not {hf} as the scales were learned on (llama.cpp's own "
                             f"block scales differ); the converter reordered it, or it is another checkpoint")
        scales[gname] = saved[f"{hf}.d"].numpy()
        pairs.append((saved[f"{hf}.d"], want))
    del reader, tensors
    written = rewrite_q4_0(quantized, source, scales)
    return ratio_record(pairs, "tensors", len(written))

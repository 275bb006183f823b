"""Weight fake-quantizers that reproduce llama.cpp's GGUF block quantizers bit for bit (Q4_0, Q8_0).

Groundwork for GGUF-targeted QAT: :func:`fake_quantize` returns what llama.cpp would store for a
weight *after* dequantization, with a straight-through estimator (identity gradient).

A GGUF row is the last dimension of the tensor (the input dimension of an ``nn.Linear`` weight
``[out, in]``); it is split into blocks of 32 consecutive values. Rules, as in
``vendor/llama.cpp/ggml/src/ggml-quants.c`` (what ``llama-quantize`` runs without an importance
matrix: ``quantize_q4_0`` -> ``quantize_row_q4_0_ref``, ``quantize_q8_0`` -> ``quantize_row_q8_0_ref``;
dequantization ``dequantize_row_q4_0`` / ``dequantize_row_q8_0``):

* ``Q4_0``: ``max`` = the signed value of the *first* element with the largest magnitude
  (strict ``amax < fabsf(v)`` scan starting from ``amax = max = +0.0``, so an all-zero block gives
  ``max = +0.0`` whatever the zeros' signs); ``d = max / -8`` in float32; the inverse scale uses the
  **float32** ``d``: ``id = d ? 1/d : 0``; ``q = min(15, (int8)(x*id + 8.5f))`` (truncation toward
  zero, float32 multiply and add rounded separately); stored scale ``fp16(d)`` (round to nearest
  even); dequantized ``(q - 8) * float(fp16(d))``.
* ``Q8_0``: ``amax = max |x|``; ``d = amax / 127`` in float32; ``id = d ? 1/d : 0`` (float32 ``d``);
  ``q = roundf(x*id)`` (round half away from zero); dequantized ``q * float(fp16(d))``.

The quantized values go through an integer (as C's ``int8_t``/``uint8_t`` stores do), so a
``roundf`` result of ``-0.0`` dequantizes to ``0 * d``, whose sign is the sign of ``d``.
The products in the dequantization are exact in float32 (a 4- or 8-bit integer times an fp16
value), so the only roundings are the ones above.

Bit identity is defined for **float32** inputs equal to the values the GGUF converter writes
(for an F32 GGUF the checkpoint's float32 values; for a BF16 GGUF llama-quantize upcasts the
converter's bf16 values to float32 first, so pass ``w.to(torch.bfloat16).float()``). Other input
dtypes (bfloat16, float16) are upcast to float32 exactly, quantized in float32, and the result is
cast back to the input dtype (Q4_0/Q8_0 values fit bfloat16 only approximately: the return cast
rounds, so compare in float32 if identity matters).

``torch`` is imported inside the functions so the module can be imported at DAG-parse time.
"""

from __future__ import annotations

import functools
from typing import Any

from qatforge.quant_ops import reciprocal, roundf, straight_through

BLOCK_SIZE = 32
QTYPES = ("Q4_0", "Q8_0")


def _check(w: Any, qtype: str) -> None:
    if qtype not in QTYPES:
        raise ValueError(f"unsupported GGUF fake-quant type {qtype!r}; supported: {', '.join(QTYPES)}")
    if w.dim() == 0 or w.shape[-1] % BLOCK_SIZE:
        shape = tuple(w.shape)
        raise ValueError(f"{qtype} quantizes blocks of {BLOCK_SIZE} along the last dimension; "
                         f"tensor of shape {shape} has a last dimension not divisible by {BLOCK_SIZE}")
    if not w.is_floating_point():
        raise ValueError(f"{qtype} fake quantization needs a floating-point tensor, got {w.dtype}")


def dequantized(w, qtype: str):
    """The llama.cpp round trip ``dequantize(quantize(w))`` in float32 (no gradient), same shape as ``w``."""
    import torch

    _check(w, qtype)
    x = w.detach().to(torch.float32).reshape(-1, BLOCK_SIZE)
    if qtype == "Q4_0":
        out = _q4_0(x, block_scales(x))
    else:  # Q8_0
        amax = x.abs().amax(dim=-1, keepdim=True)
        d = amax / 127.0
        # Through an integer, as the int8 store does: roundf(-0.3) = -0.0 becomes the integer 0.
        q = roundf(x * reciprocal(d)).to(torch.int32)
        out = q.to(torch.float32) * d.to(torch.float16).to(torch.float32)
    return out.reshape(w.shape)


def block_scales(x):
    """llama.cpp's Q4_0 scale of each block (row) of float32 ``x [n, 32]``: ``max / -8``, ``[n, 1]``,
    ``max`` the first element of largest magnitude (the C scan's ``<``; +0.0 for a zero block)."""
    import torch

    ax = x.abs()
    mx = torch.gather(x, -1, ax.argmax(dim=-1, keepdim=True))
    mx = torch.where(ax.amax(dim=-1, keepdim=True) == 0, torch.zeros_like(mx), mx)  # the scan's +0.0 start
    return mx / -8.0


def _levels(x, d):
    """Stored Q4_0 levels (int32, 0..15) of blocks ``x [n, 32]`` under float32 scales ``d [n, 1]``.
    The clamp at 0 never binds for llama.cpp's own ``d``; it does for a smaller (learned) one."""
    import torch

    return torch.trunc(x * reciprocal(d) + 8.5).clamp_(0, 15).to(torch.int32)


def _q4_0(x, d):
    """Blocks ``x [n, 32]`` rounded under float32 scales ``d [n, 1]`` and dequantized (float32)."""
    import torch

    return (_levels(x, d) - 8).to(torch.float32) * d.to(torch.float16).to(torch.float32)


def _given(w, d):
    """``w`` and ``d`` as float32 blocks ``[n, 32]`` and scales ``[n, 1]``, shapes checked."""
    import torch

    _check(w, "Q4_0")
    if tuple(d.shape) != (*w.shape[:-1], w.shape[-1] // BLOCK_SIZE):
        raise ValueError(f"block scales of shape {tuple(d.shape)} for a weight of shape {tuple(w.shape)}")
    return w.detach().to(torch.float32).reshape(-1, BLOCK_SIZE), d.detach().to(torch.float32).reshape(-1, 1)


def levels_with_scales(w, d):
    """The Q4_0 levels (int32, 0..15, the shape of ``w``) of ``w [..., k·32]`` under float32 block
    scales ``d [..., k]``: what :mod:`qatforge.export.gguf.block_scales` writes."""
    x, d = _given(w, d)
    return _levels(x, d).reshape(w.shape)


def dequantized_with_scales(w, d):
    """Q4_0 of ``w [..., k·32]`` under the given float32 block scales ``d [..., k]``, dequantized, in
    float32 (no gradient): the values of what :func:`levels_with_scales` and ``fp16(d)`` store."""
    x, d = _given(w, d)
    return _q4_0(x, d).reshape(w.shape)


def fake_quantize(w, qtype: str):
    """``w`` fake-quantized to GGUF ``qtype`` ("Q4_0" or "Q8_0") along its last dimension.

    Forward: llama.cpp's dequantized values (computed in float32, returned in ``w.dtype``);
    backward: straight-through (the gradient reaches ``w`` unchanged).
    """
    _check(w, qtype)
    return straight_through(functools.partial(dequantized, qtype=qtype), w)

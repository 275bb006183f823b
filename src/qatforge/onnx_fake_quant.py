"""Fake quantizers that reproduce ONNX Runtime's ``MatMulNBits`` weights bit for bit, as the ONNX
Runtime GenAI model builder writes them (its default quantizer: ``MatMulNBitsQuantizer`` with
``DefaultWeightOnlyQuantConfig`` → MLAS ``quantize_matmul_{4,8}bits``), symmetric, blocks along K.

A ``MatMul`` weight is ``[K, N]``, the transpose of an ``nn.Linear`` weight ``[out=N, in=K]``; each
of its N columns is cut into blocks of ``block_size`` consecutive values along K, i.e. blocks along
the *last* dimension of the ``nn.Linear`` weight, as here. Fused projections (the builder's
``qkv_proj``: q, k and v stacked along N) quantize each output row alone, so each linear can be
fake-quantized on its own. Rules of MLAS's symmetric blockwise quantizer for ``bits`` (mid
``2^(bits-1)``, max ``2^bits - 1``), established against ``quantize_matmul_4bits`` and the
builder's own output (``tests/test_onnx_fake_quant.py``):

* ``m`` = the block's maximum if ``|max| > |min|`` else its minimum (ties go to the minimum);
* ``scale = m / -mid`` in float32, stored as float32 (the weights' dtype);
* ``q = clamp(roundf(x * (1/scale) + mid), 0, max)`` with float32 products (``1/scale`` 0 for an
  all-zero block) and ``roundf`` rounding half away from zero; dequantized ``(q - mid) * scale``.

Input: the float32 values the builder quantizes (a 16-bit checkpoint's values upcast exactly).
:func:`fake_quantize_activations` simulates ``accuracy_level`` 4 (MLAS's int8 compute: the
activations quantized to int8 per block of ``block_size`` along K, scale ``amax / 127``, round half
to even as its SIMD conversion does); it is a model of that kernel, not checked bit for bit.
``torch`` is imported inside the functions (parse-time import safe).
"""

from __future__ import annotations

import functools
from typing import Any

from qatforge.quant_ops import reciprocal, roundf, straight_through

BITS = (4, 8)


def _check(w: Any, bits: int, block_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"MatMulNBits fake quantization supports bits {BITS}, got {bits}")
    if w.dim() == 0 or w.shape[-1] % block_size:
        raise ValueError(f"MatMulNBits blocks of {block_size} along the input dimension; tensor of shape "
                         f"{tuple(w.shape)} has a last dimension not divisible by {block_size}")
    if not w.is_floating_point():
        raise ValueError(f"MatMulNBits fake quantization needs a floating-point tensor, got {w.dtype}")


def quantize(w: Any, bits: int = 4, block_size: int = 32) -> tuple[Any, Any]:
    """MLAS's symmetric blockwise quantization of ``w`` (``[..., K]``, blocks along the last dim):
    ``(q, scale)``, ``q`` int32 in ``[0, 2^bits - 1]`` shaped ``[-1, block_size]``, ``scale`` float32 ``[-1, 1]``."""
    import torch

    _check(w, bits, block_size)
    x = w.detach().to(torch.float32).reshape(-1, block_size)
    scale = block_scales(x, bits)
    return _levels(x, scale, bits), scale


def block_scales(x: Any, bits: int = 4) -> Any:
    """MLAS's scale of each block (row) of float32 ``x [n, block]``: the signed extreme (the minimum on
    a tie of magnitudes) over ``-2^(bits-1)``, ``[n, 1]``."""
    import torch

    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    return torch.where(hi.abs() > lo.abs(), hi, lo) / -float(1 << (bits - 1))


def _levels(x: Any, scale: Any, bits: int) -> Any:
    import torch

    mid, top = 1 << (bits - 1), (1 << bits) - 1
    return roundf(x * reciprocal(scale) + float(mid)).clamp_(0, top).to(torch.int32)


def dequantized_with_scales(w: Any, d: Any, bits: int = 4, block_size: int = 32) -> Any:
    """MatMulNBits of ``w [..., k·block]`` under the given float32 block scales ``d [..., k]``,
    dequantized, in float32 (no gradient): rounded as MLAS rounds given a scale."""
    import torch

    q = levels_with_scales(w, d, bits, block_size).reshape(-1, block_size)
    d = d.detach().to(torch.float32).reshape(-1, 1)
    return ((q - (1 << (bits - 1))).to(torch.float32) * d).reshape(w.shape)


def levels_with_scales(w: Any, d: Any, bits: int = 4, block_size: int = 32) -> Any:
    """The stored levels (int32 in ``[0, 2^bits - 1]``, the shape of ``w``) of ``w [..., k·block]``
    under the given float32 block scales ``d [..., k]``, as MLAS rounds them."""
    import torch

    _check(w, bits, block_size)
    if tuple(d.shape) != (*w.shape[:-1], w.shape[-1] // block_size):
        raise ValueError(f"block scales of shape {tuple(d.shape)} for a weight of shape {tuple(w.shape)}")
    x = w.detach().to(torch.float32).reshape(-1, block_size)
    return _levels(x, d.detach().to(torch.float32).reshape(-1, 1), bits).reshape(w.shape)


def dequantized(w: Any, bits: int = 4, block_size: int = 32) -> Any:
    """``dequantize(quantize(w))`` in float32 (no gradient), the shape of ``w``."""
    import torch

    q, scale = quantize(w, bits, block_size)
    return ((q - (1 << (bits - 1))).to(torch.float32) * scale).reshape(w.shape)


def fake_quantize(w: Any, bits: int = 4, block_size: int = 32) -> Any:
    """``w`` through MatMulNBits: forward the dequantized values (in ``w.dtype``), backward straight through."""
    _check(w, bits, block_size)
    return straight_through(functools.partial(dequantized, bits=bits, block_size=block_size), w)


def _activations(x: Any, block_size: int) -> Any:
    import torch

    v = x.to(torch.float32).reshape(-1, block_size)
    scale = v.abs().amax(dim=-1, keepdim=True) / 127.0
    return (torch.round(v * reciprocal(scale)).clamp_(-127, 127) * scale).reshape(x.shape)


def fake_quantize_activations(x: Any, block_size: int = 32) -> Any:
    """Activations as MatMulNBits' ``accuracy_level`` 4 computes with them (see the module docstring)."""
    if x.shape[-1] % block_size:
        raise ValueError(f"activations of width {x.shape[-1]} are not blocks of {block_size}")
    return straight_through(functools.partial(_activations, block_size=block_size), x)

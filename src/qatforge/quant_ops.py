"""What the bit-exact fake quantizers (:mod:`qatforge.gguf_fake_quant`, :mod:`qatforge.onnx_fake_quant`)
share: C's ``roundf``, the zero-safe reciprocal of a block scale, and the straight-through
estimator (the forward returns a function's values exactly, the backward passes the gradient
through unchanged). ``torch`` is imported inside the functions.

``w + (f(w) - w).detach()`` is not used because its forward is not bit-exact: ``w + (f(w) - w)``
rounds twice, and ``+0.0`` terms turn a quantizer's ``-0.0`` outputs into ``+0.0``.
"""

from __future__ import annotations

from typing import Any, Callable

_FN = None


def roundf(x: Any) -> Any:
    """C ``roundf``: round half away from zero, exact for every float32 (no ``+0.5`` rounding trap)."""
    import torch

    t = torch.trunc(x)
    return torch.where((x - t).abs() >= 0.5, t + torch.sign(x), t)


def reciprocal(d: Any) -> Any:
    """``1/d``, and 0 where ``d`` is 0 (a zero block's scale), as the C quantizers compute it."""
    import torch

    zero = d == 0
    return torch.where(zero, torch.zeros_like(d), 1.0 / torch.where(zero, torch.ones_like(d), d))


def straight_through(fn: Callable[[Any], Any], w: Any) -> Any:
    """``fn(w)`` cast to ``w.dtype`` in the forward; identity gradient to ``w`` in the backward.
    Without a gradient to carry, ``fn(w)`` is computed directly."""
    if not w.requires_grad:
        return fn(w).to(w.dtype)
    global _FN
    if _FN is None:
        import torch

        class StraightThrough(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, f):
                return f(x).to(x.dtype)

            @staticmethod
            def backward(ctx, grad):
                return grad, None

        _FN = StraightThrough
    return _FN.apply(w, fn)

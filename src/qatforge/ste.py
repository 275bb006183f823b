"""The straight-through estimator shared by the bit-exact fake quantizers (:mod:`qatforge.gguf_fake_quant`,
:mod:`qatforge.onnx_fake_quant`): the forward returns a function's values exactly, the backward
passes the gradient through unchanged.

``w + (f(w) - w).detach()`` is not used because its forward is not bit-exact: ``w + (f(w) - w)``
rounds twice, and ``+0.0`` terms turn a quantizer's ``-0.0`` outputs into ``+0.0``.
"""

from __future__ import annotations

from typing import Any, Callable

_FN = None


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

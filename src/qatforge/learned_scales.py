"""Learned per-block weight scales for merge-exact QAT at GGUF Q4_0 (``qat.block_scales: learned``).

Q4_0 stores one fp16 scale per block of 32 weights; ``llama-quantize`` sets it to ``max / -8``.
A run that learns its scales trains, per block, ``θ`` with ``d = d_format(Ŵ) · exp(GAIN · θ)``
(``Ŵ = round(W + s·B·A)``, the weight merge writes), so ``θ = 0`` is llama.cpp's own quantizer.
The forward rounds each block as llama.cpp does given ``d``
(:func:`qatforge.gguf_fake_quant.dequantized_with_scales`, which the file writer
:mod:`qatforge.export.gguf.block_scales` reproduces bit for bit); the backward is LSQ's
(Esser et al., 2020): the weight gets the gradient where the block's grid holds it and none where
it clamps, and ``d`` gets ``q − w/d`` inside the grid and the clamped ``q`` outside.

``θ`` lives on each LoRA linear as ``lora_qat_scale[adapter]``: PEFT saves every ``lora_``
parameter with the adapter and strips or restores the adapter name, so checkpoints, resume and
merge carry it with ``lora_A``/``lora_B``. Merge turns it into ``d`` beside the merged checkpoint
(:data:`SCALES_FILE`, HF tensor names), and the GGUF Q4_0 file is written with those scales.
``torch`` is imported inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PARAM = "lora_qat_scale"
GAIN = 20.0  # θ's step size in log-scale: Adam's per-step change of ~lr moves d by ~GAIN·lr
SCALES_FILE = "qat_block_scales.safetensors"  # beside the merged checkpoint; not a model shard
BLOCK = 32

_FN = None


def _lsq():
    global _FN
    if _FN is None:
        import torch

        from qatforge.gguf_fake_quant import dequantized_with_scales
        from qatforge.quant_ops import reciprocal

        class LearnedQ4_0(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, theta):  # x [n, 32] float32, theta [n, 1] float32
                d = format_scales(x) * torch.exp(GAIN * theta)
                ctx.save_for_backward(x, d)
                return dequantized_with_scales(x, d)

            @staticmethod
            def backward(ctx, g):
                x, d = ctx.saved_tensors
                u = x * reciprocal(d)
                q = torch.trunc(u + 8.5).clamp_(0, 15) - 8
                inside = (u >= -8.5) & (u < 7.5)
                grad_x = torch.where(inside, g, torch.zeros_like(g))
                grad_d = (g * torch.where(inside, q - u, q)).sum(dim=-1, keepdim=True)
                return grad_x, grad_d * d * GAIN

        _FN = LearnedQ4_0
    return _FN


def format_scales(x: Any) -> Any:
    """llama.cpp's Q4_0 scale of each row of ``x [n, 32]`` (float32): ``max / -8``, ``max`` the first
    element of largest magnitude (+0.0 for a zero block). No gradient."""
    import torch

    with torch.no_grad():
        ax = x.abs()
        mx = torch.gather(x, -1, ax.argmax(dim=-1, keepdim=True))
        mx = torch.where(ax.amax(dim=-1, keepdim=True) == 0, torch.zeros_like(mx), mx)
        return mx / -8.0


def learned_q4_0(w: Any, theta: Any) -> Any:
    """``w [out, in]`` fake-quantized to Q4_0 under ``d_format(w) · exp(GAIN · theta)``
    (``theta [out, in/32]``), in ``w.dtype``; differentiable in ``w`` and ``theta`` (LSQ)."""
    import torch

    x = w.to(torch.float32).reshape(-1, BLOCK)
    out = _lsq().apply(x, theta.to(torch.float32).reshape(-1, 1))
    return out.reshape(w.shape).to(w.dtype)


def scales(w: Any, theta: Any) -> Any:
    """The block scales ``d [out, in/32]`` (float32) that ``theta`` gives weight ``w``."""
    import torch

    with torch.no_grad():
        x = w.to(torch.float32).reshape(-1, BLOCK)
        return (format_scales(x) * torch.exp(GAIN * theta.to(torch.float32).reshape(-1, 1))).reshape(theta.shape)


def active_theta(layer: Any) -> Any | None:
    """``θ`` of the layer's one active adapter, or None (not learning scales, or no θ for it)."""
    table = getattr(layer, PARAM, None)
    if table is None or layer.disable_adapters:
        return None
    names = [n for n in layer.active_adapters if n in table]
    return table[names[0]] if len(names) == 1 else None


_MODULE = None


def _fake_quantizer(layer: Any, fallback: Any) -> Any:
    """The weight fake quantizer of a LoRA linear that learns its Q4_0 scales: its active
    adapter's ``θ``, or ``fallback`` (llama.cpp's own scales) when there is none, e.g. adapters off."""
    global _MODULE
    if _MODULE is None:
        import torch

        class LearnedScaleFakeQuantizer(torch.nn.Module):
            def __init__(self, layer, fallback):
                super().__init__()
                self._layer, self.fallback = [layer], fallback  # a list: the layer is not a submodule

            def forward(self, w):
                theta = active_theta(self._layer[0])
                return self.fallback(w) if theta is None else learned_q4_0(w, theta)

            def extra_repr(self) -> str:
                return "Q4_0, learned block scales"

        _MODULE = LearnedScaleFakeQuantizer
    return _MODULE(layer, fallback)


def attach(layer: Any, adapter: str) -> Any:
    """Give a LoRA linear a trainable ``θ`` (zeros) for ``adapter`` and the learned-scale weight
    fake quantizer in place of its Q4_0 one; returns ``θ``."""
    import torch

    weight = layer.get_base_layer().weight
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"learned Q4_0 scales need in_features divisible by {BLOCK}, got {tuple(weight.shape)}")
    if getattr(layer, PARAM, None) is None:
        setattr(layer, PARAM, torch.nn.ParameterDict())
    theta = torch.nn.Parameter(torch.zeros(weight.shape[0], weight.shape[1] // BLOCK, device=weight.device))
    getattr(layer, PARAM)[adapter] = theta
    if _MODULE is None or not isinstance(layer._qat_weight_fq, _MODULE):
        layer._qat_weight_fq = _fake_quantizer(layer, layer._qat_weight_fq)
    return theta


def saved_thetas(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """``{module name in the PEFT model: θ}`` from an adapter checkpoint (empty: none learned)."""
    from safetensors.torch import load_file

    suffix = "." + PARAM
    return {k[: -len(suffix)]: v for k, v in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items()
            if k.endswith(suffix)}


def load_thetas(model: Any, adapter_dir: str | os.PathLike, adapter: str) -> int:
    """Set ``θ`` of ``adapter`` on every layer of a PEFT ``model`` that learns scales, from the
    checkpoint (PEFT loads ``lora_`` tensors only into parameters that already exist, so an adapter
    loaded under a new name needs this); returns how many. A layer without a saved ``θ`` is an error."""
    import torch

    saved = saved_thetas(adapter_dir)
    n = 0
    for name, module in model.named_modules():
        if getattr(module, PARAM, None) is None:
            continue
        if name not in saved:
            raise KeyError(f"{adapter_dir}: no learned block scales for {name}")
        getattr(module, PARAM)[adapter] = torch.nn.Parameter(saved[name].to(torch.float32), requires_grad=False)
        n += 1
    return n


def hf_weight_name(peft_module_name: str) -> str:
    """The merged checkpoint's weight name of a PEFT module: ``base_model.model.X`` → ``X.weight``."""
    prefix = "base_model.model."
    return (peft_module_name[len(prefix):] if peft_module_name.startswith(prefix) else peft_module_name) + ".weight"


def write_merged_scales(adapter_dir: str | os.PathLike, merged_state: dict[str, Any], out_dir: str | os.PathLike) -> int:
    """Write :data:`SCALES_FILE` in ``out_dir``: for each learned ``θ`` of the adapter, ``d`` of the
    merged weight (``merged_state``: the merged model's state dict, 16-bit) and llama.cpp's own
    ``d_format`` of it (so a writer can check it reads the same tensor), float32, keyed
    ``<weight name>.d`` / ``.d_format``. Returns the number of weights (0: nothing learned, no file)."""
    import torch
    from safetensors.torch import save_file

    thetas = saved_thetas(adapter_dir)
    out = {}
    for module, theta in thetas.items():
        name = hf_weight_name(module)
        if name not in merged_state:
            raise KeyError(f"{adapter_dir}: learned block scales for {name}, which the merged model does not have")
        w = merged_state[name]
        if tuple(theta.shape) != (w.shape[0], w.shape[1] // BLOCK):
            raise ValueError(f"{name}: θ of shape {tuple(theta.shape)} for a weight of shape {tuple(w.shape)}")
        x = w.to(torch.float32).reshape(-1, BLOCK)
        out[f"{name}.d_format"] = format_scales(x).reshape(theta.shape).contiguous()
        out[f"{name}.d"] = scales(w, theta).contiguous()
    if out:
        save_file(out, str(Path(out_dir) / SCALES_FILE), metadata={"format": "Q4_0", "gain": str(GAIN)})
    return len(thetas)

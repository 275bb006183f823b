"""Learned per-block weight scales for merge-exact QAT (``qat.block_scales: learned``), for the
4-bit formats whose file stores a scale per block of 32: GGUF Q4_0 (an fp16 per block, which
``llama-quantize`` sets to ``max / -8``), ONNX ``MatMulNBits`` int4 (a float32 scales
initializer, which the builder sets to the signed extreme over -8) and TorchAO's int4 weights of
int8-int4 (a float32 scale per group, which torchao sets to ``amax / 7.5``).

A run that learns its scales trains, per block, ``θ`` with ``d = d_format(Ŵ) · exp(GAIN · θ)``
(``Ŵ = round(W + s·B·A)``, the weight merge writes), so ``θ = 0`` is the format's own quantizer.
The forward rounds each block as the format does given ``d`` (:class:`Grid`: the functions the
file writers reproduce bit for bit); the backward is LSQ's (Esser et al., 2020): the weight gets
the gradient where the block's grid holds it and none where it clamps, and ``d`` gets ``q − w/d``
inside the grid and the clamped ``q`` outside.

``θ`` lives on each LoRA linear as ``lora_qat_scale[adapter]``: PEFT saves every ``lora_``
parameter with the adapter and strips or restores the adapter name, so checkpoints, resume and
merge carry it with ``lora_A``/``lora_B``. Merge turns it into ``d`` beside the merged checkpoint
(:data:`SCALES_FILE`, HF tensor names), and the run's file is written with those scales
(:mod:`qatforge.export.gguf.block_scales`, :mod:`qatforge.export.onnx_block_scales`,
:mod:`qatforge.export.torchao_block_scales`).
``torch`` is imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from qatforge.spec.checkpoint import SCALES_FILE

PARAM = "lora_qat_scale"
GAIN = 20.0  # θ's step size in log-scale: Adam's per-step change of ~lr moves d by ~GAIN·lr
BLOCK = 32


@dataclasses.dataclass(frozen=True)
class Grid:
    """A 4-bit block format whose file stores one scale per block of 32: how the format picks its
    own scale (``own``), how it rounds given any scale (``given``: dequantized float32, bit for bit
    with its writer), and the clamped integer level (minus the midpoint) LSQ's backward needs."""

    name: str
    own: Callable[[Any], Any]  # x [n, 32] float32 -> d [n, 1]
    given: Callable[[Any, Any], Any]  # (x [n, 32], d [n, 1]) -> dequantized [n, 32]
    level: Callable[[Any], Any]  # u = x/d -> clamped level - midpoint


def _q4_0_own(x):
    from qatforge.gguf_fake_quant import block_scales

    return block_scales(x)


def _q4_0_given(x, d):
    from qatforge.gguf_fake_quant import dequantized_with_scales

    return dequantized_with_scales(x, d)


def _q4_0_level(u):
    import torch

    return torch.trunc(u + 8.5).clamp_(0, 15) - 8


def _nbits_own(x):
    from qatforge.onnx_fake_quant import block_scales

    return block_scales(x, 4)


def _nbits_given(x, d):
    from qatforge.onnx_fake_quant import dequantized_with_scales

    return dequantized_with_scales(x, d, 4, BLOCK)


def _nbits_level(u):
    from qatforge.quant_ops import roundf

    return roundf(u + 8.0).clamp_(0, 15) - 8


def _torchao_args(d):
    import torch

    return [1, BLOCK], d, torch.zeros_like(d, dtype=torch.int8), torch.int8, -8, 7


def _torchao_own(x):
    import torch
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

    scale, _ = choose_qparams_affine(x, MappingType.SYMMETRIC, [1, BLOCK], target_dtype=torch.int8, quant_min=-8,
                                     quant_max=7, zero_point_dtype=torch.int8, keepdim=True)
    return scale


def _torchao_given(x, d):
    import torch
    from torchao.quantization.quant_primitives import dequantize_affine, quantize_affine

    q = quantize_affine(x, *_torchao_args(d))
    return dequantize_affine(q, *_torchao_args(d), output_dtype=torch.float32)


def _torchao_level(u):
    import torch

    return torch.round(u).clamp_(-8, 7)


GRIDS = {
    "Q4_0": Grid("Q4_0", _q4_0_own, _q4_0_given, _q4_0_level),  # llama.cpp; its file stores fp16(d)
    "MatMulNBits int4": Grid("MatMulNBits int4", _nbits_own, _nbits_given, _nbits_level),  # MLAS; float32 d
    # torchao's symmetric int4 per group of 32 (IntxUnpackedToInt8Tensor: int8 qdata, float32 scale)
    "torchao int4": Grid("torchao int4", _torchao_own, _torchao_given, _torchao_level),
}


def grid_of(scheme: Any, weight_type: str | None = None) -> Grid | None:
    """The grid of :meth:`qatforge.spec.schemes.Scheme.scale_grid`, or None."""
    name = scheme.scale_grid(weight_type)
    return GRIDS[name] if name else None


_FN = None


def _lsq():
    global _FN
    if _FN is None:
        import torch

        from qatforge.quant_ops import reciprocal

        class LearnedScales(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, theta, grid):  # x [n, 32] float32, theta [n, 1] float32
                with torch.no_grad():
                    d = grid.own(x) * torch.exp(GAIN * theta)
                ctx.save_for_backward(x, d)
                ctx.grid = grid
                return grid.given(x, d)

            @staticmethod
            def backward(ctx, g):
                x, d = ctx.saved_tensors
                u = x * reciprocal(d)
                q = ctx.grid.level(u)
                inside = (u >= -8.5) & (u < 7.5)
                grad_x = torch.where(inside, g, torch.zeros_like(g))
                grad_d = (g * torch.where(inside, q - u, q)).sum(dim=-1, keepdim=True)
                return grad_x, grad_d * d * GAIN, None

        _FN = LearnedScales
    return _FN


def learned(w: Any, theta: Any, grid: Grid) -> Any:
    """``w [out, in]`` fake-quantized on ``grid`` under ``d_own(w) · exp(GAIN · theta)``
    (``theta [out, in/32]``), in ``w.dtype``; differentiable in ``w`` and ``theta`` (LSQ)."""
    import torch

    x = w.to(torch.float32).reshape(-1, BLOCK)
    out = _lsq().apply(x, theta.to(torch.float32).reshape(-1, 1), grid)
    return out.reshape(w.shape).to(w.dtype)


def scales(w: Any, theta: Any, grid: Grid) -> Any:
    """The block scales ``d [out, in/32]`` (float32) that ``theta`` gives weight ``w`` on ``grid``."""
    import torch

    with torch.no_grad():
        x = w.to(torch.float32).reshape(-1, BLOCK)
        return (grid.own(x) * torch.exp(GAIN * theta.to(torch.float32).reshape(-1, 1))).reshape(theta.shape)


def active_theta(layer: Any) -> Any | None:
    """``θ`` of the layer's one active adapter, or None (not learning scales, or no θ for it)."""
    table = getattr(layer, PARAM, None)
    if table is None or layer.disable_adapters:
        return None
    names = [n for n in layer.active_adapters if n in table]
    return table[names[0]] if len(names) == 1 else None


_MODULE = None


def _fake_quantizer(layer: Any, fallback: Any, grid: Grid) -> Any:
    """The weight fake quantizer of a LoRA linear that learns its block scales on ``grid``: its
    active adapter's ``θ``, or ``fallback`` (the format's own scales) when there is none, e.g.
    adapters off."""
    global _MODULE
    if _MODULE is None:
        import torch

        class LearnedScaleFakeQuantizer(torch.nn.Module):
            def __init__(self, layer, fallback, grid):
                super().__init__()
                self._layer, self.fallback, self.grid = [layer], fallback, grid  # the layer is not a submodule

            def forward(self, w):
                theta = active_theta(self._layer[0])
                return self.fallback(w) if theta is None else learned(w, theta, self.grid)

            def extra_repr(self) -> str:
                return f"{self.grid.name}, learned block scales"

        _MODULE = LearnedScaleFakeQuantizer
    return _MODULE(layer, fallback, grid)


def attach(layer: Any, adapter: str, grid: Grid) -> Any:
    """Give a LoRA linear a trainable ``θ`` (zeros) for ``adapter`` and a learned-scale weight
    fake quantizer on ``grid`` in place of its own; returns ``θ``."""
    import torch

    weight = layer.get_base_layer().weight
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"learned block scales need in_features divisible by {BLOCK}, got {tuple(weight.shape)}")
    if getattr(layer, PARAM, None) is None:
        setattr(layer, PARAM, torch.nn.ParameterDict())
    theta = torch.nn.Parameter(torch.zeros(weight.shape[0], weight.shape[1] // BLOCK, device=weight.device))
    getattr(layer, PARAM)[adapter] = theta
    if _MODULE is None or not isinstance(layer._qat_weight_fq, _MODULE):
        layer._qat_weight_fq = _fake_quantizer(layer, layer._qat_weight_fq, grid)
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


def write_merged_scales(adapter_dir: str | os.PathLike, merged_state: dict[str, Any], out_dir: str | os.PathLike,
                        grid: Grid) -> int:
    """Write :data:`SCALES_FILE` in ``out_dir``: for each learned ``θ`` of the adapter, ``d`` of the
    merged weight (``merged_state``: the merged model's state dict, 16-bit) on ``grid`` and the
    format's own ``d_format`` of it (so a writer can check it reads the same tensor), float32, keyed
    ``<weight name>.d`` / ``.d_format``; the grid's name in the metadata. Returns the number of
    weights (0: nothing learned, no file)."""
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
        with torch.no_grad():
            out[f"{name}.d_format"] = grid.own(w.to(torch.float32).reshape(-1, BLOCK)).reshape(theta.shape).contiguous()
        out[f"{name}.d"] = scales(w, theta, grid).contiguous()
    if out:
        save_file(out, str(Path(out_dir) / SCALES_FILE), metadata={"format": grid.name, "gain": str(GAIN)})
    return len(thetas)


def merged_scales_file(scales_file: str | os.PathLike) -> Path | None:
    """``scales_file`` (:data:`SCALES_FILE` of a merged checkpoint whose run learned its block scales),
    or None when that checkpoint is the teacher itself: selection kept step 0, so there is no adapter
    and the file takes the format's own scales. Missing beside a merged adapter is an error."""
    from qatforge.io import manifest_path, read_json

    path = Path(scales_file)
    if path.is_file():
        return path
    merged = read_json(manifest_path(path.parent))["provenance"]["merge"]
    if merged["adapter_dir"] is not None:
        raise FileNotFoundError(f"{path}: no learned block scales beside {path.parent}, merged from "
                                f"{merged['adapter_dir']}")
    return None


def read_scales(scales_file: str | os.PathLike, grid: str) -> tuple[list[str], dict[str, Any]]:
    """The weight names of a scales file written for ``grid`` and its tensors (``<name>.d``,
    ``<name>.d_format``); a file written for another grid is an error."""
    from safetensors.torch import load_file

    if saved_grid(scales_file) != grid:
        raise ValueError(f"{scales_file}: block scales learned for {saved_grid(scales_file)!r}, not {grid}")
    saved = load_file(str(scales_file))
    return sorted(k[: -len(".d")] for k in saved if k.endswith(".d")), saved


def merged_weights(merged_dir: str | os.PathLike) -> Callable[[str], Any]:
    """A reader of one weight of a merged checkpoint at a time, in float32, from whichever shard holds it."""
    import torch
    from safetensors import safe_open

    where = {}
    for shard in sorted(Path(merged_dir).glob("model*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            where.update({key: shard for key in f.keys()})

    def read(name: str) -> Any:
        with safe_open(str(where[name]), framework="pt") as f:
            return f.get_tensor(name).to(torch.float32)

    return read


def ratio_record(pairs: list[tuple[Any, Any]], what: str, count: int) -> dict[str, Any]:
    """What a writer records: ``{what: count}`` (its tensors or nodes), the blocks, and the quartiles
    of learned / own scale over the ``(d, d_own)`` tensor pairs it wrote (an own scale of 0 counts as 1)."""
    import numpy as np

    ratio = np.concatenate([(d / np.where(own == 0, 1, own)).ravel() for d, own in
                            ((d.numpy(), own.numpy()) for d, own in pairs)]) if pairs else np.zeros(0)
    return {what: count, "blocks": int(ratio.size),
            "scale_ratio_quartiles": [float(q) for q in np.quantile(ratio, [0.25, 0.5, 0.75])] if ratio.size else None}


def saved_grid(scales_file: str | os.PathLike) -> str:
    """The grid name a scales file was written for."""
    from safetensors import safe_open

    with safe_open(str(scales_file), framework="numpy") as f:
        return (f.metadata() or {}).get("format", "")

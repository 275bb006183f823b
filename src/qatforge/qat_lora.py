"""Merge-exact LoRA QAT (``qat.mode: merged``): train against the weight that ships.

Unsloth-style QAT (``qat.mode: unsloth``, :func:`qatforge.qat.prepare_qat`) fake-quantizes only
the frozen base weight and runs the LoRA branch in full precision, ``fq(x)·fq(W)ᵀ + s·B·A·x``;
the exporter then quantizes ``W + s·B·A`` on a grid the adapter never saw. Here every
LoRA-targeted linear computes

    y = fq_act(x) · fq_w(round(W + s·B·A))ᵀ + bias

where ``s·B·A`` is peft's own ``get_delta_weight`` (what ``merge_and_unload`` adds), ``round`` is
the cast to the dtype the merged checkpoint stores (``merge.STORAGE_DTYPE``), and ``fq_w`` /
``fq_act`` are torchao's fake quantizers built from the same torchao config the export quantizes
with (``torchao.quantization.qat.fake_quantize_config._infer_fake_quantize_configs``, which
``QATConfig(step="prepare")`` uses). Gradients reach A and B through the identity straight-through
estimator (the classic STE: through the rounding, the scale and the dtype cast alike; torchao's own
autograd would also differentiate the absmax scale), computed without forming the ``[out, in]``
weight gradient (``_merged_fn``); layers with several active adapters take plain autograd.
Frozen weights that the scheme quantizes outside the adapters (LM head, embedding) are rounded to
the storage dtype in place, so their torchao fake quantizers see the merged checkpoint's values too.

The forward is patched on peft's ``lora.Linear`` instances (parameter names, and so saved
adapters, are unchanged); ``merge_and_unload`` drops the patch with the wrapper. With learned
block scales (:mod:`qatforge.learned_scales`) each GGUF Q4_0 linear also trains a ``θ`` per
block, saved with the adapter; so do those trained at ONNX MatMulNBits int4 and TorchAO int4.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator

from qatforge.learned_scales import active_theta, attach, grid_of
from qatforge.spec.schemes import Scheme, SchemeLike, parse_scheme

MODES = ("merged", "unsloth")


def _round_ste(dtype: Any) -> Callable[[Any], Any]:
    """Cast to ``dtype`` and back in the forward, identity gradient in the backward."""
    import torch

    class RoundToStorage(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w.to(dtype).to(w.dtype)

        @staticmethod
        def backward(ctx, grad):
            return grad

    return RoundToStorage.apply


def _gguf_fake_quant(qtype: str) -> Any:
    """A module applying ``gguf_fake_quant.fake_quantize(x, qtype)`` along the last dimension."""
    import torch

    from qatforge.gguf_fake_quant import fake_quantize

    class GGUFFakeQuantizer(torch.nn.Module):
        def forward(self, x):
            return fake_quantize(x, qtype)

        def extra_repr(self) -> str:
            return qtype

    return GGUFFakeQuantizer()


def _onnx_fake_quant(recipe: Any, activations: bool = False) -> Any:
    """A module applying MatMulNBits' weight (or, ``activations``, its int8 compute's activation)
    fake quantization of ``recipe`` along the last dimension (``qatforge.onnx_fake_quant``)."""
    import torch

    from qatforge.onnx_fake_quant import fake_quantize, fake_quantize_activations

    class MatMulNBitsFakeQuantizer(torch.nn.Module):
        def forward(self, x):
            if activations:
                return fake_quantize_activations(x, recipe.block_size)
            return fake_quantize(x, recipe.bits, recipe.block_size)

        def extra_repr(self) -> str:
            return f"{'activations int8' if activations else f'int{recipe.bits}'}, block {recipe.block_size}"

    return MatMulNBitsFakeQuantizer()


def fake_quantizers(scheme: Scheme, weight_type: str | None = None) -> tuple[Any | None, Any]:
    """``(activation_fq | None, weight_fq)`` modules of ``scheme``'s linears: torchao's own, as its QAT
    builds them from the scheme's config; for a GGUF scheme llama.cpp's weight type (the recipe's
    projection type, or ``weight_type``) with the recipe's activations (Q8_0: what ggml's CPU
    ``vec_dot`` quantizes the activations to for Q4_0 and Q8_0 weights); for an ONNX scheme
    MatMulNBits' weights with its int8 compute's activations."""
    if scheme.gguf:
        return _gguf_fake_quant(scheme.gguf.activations), _gguf_fake_quant(weight_type or scheme.gguf.weights)
    if scheme.onnx:
        return _onnx_fake_quant(scheme.onnx, activations=True), _onnx_fake_quant(scheme.onnx)

    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    from qatforge.qat import torchao_configs

    cfg, _ = torchao_configs(scheme)
    act_cfg, w_cfg = _infer_fake_quantize_configs(cfg)
    act = FakeQuantizerBase.from_config(act_cfg) if act_cfg is not None else None
    return act, FakeQuantizerBase.from_config(w_cfg)


def merged_weight(layer: Any, round_fn: Callable[[Any], Any]) -> Any:
    """``round(W + Σ s·B·A)`` of a peft ``lora.Linear`` over its active adapters (differentiable in A, B)."""
    w = layer.get_base_layer().weight
    if not layer.disable_adapters:
        for name in layer.active_adapters:
            if name in layer.lora_A:
                w = w + layer.get_delta_weight(name)
    return round_fn(w)


def _weight_key(layer: Any) -> tuple:
    """Identity and in-place version of everything the fake-quantized merged weight depends on."""
    parts = [layer.disable_adapters, tuple(layer.active_adapters)]
    for name in layer.active_adapters:
        if name in layer.lora_A:
            for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                parts += [id(p), p._version]
    theta = active_theta(layer)
    if theta is not None:
        parts += [id(theta), theta._version]
    w = layer.get_base_layer().weight
    return (*parts, id(w), w._version)


_FN = None


def _merged_fn():
    """``y = x̂·Ŵᵀ`` with the straight-through gradients of ``Ŵ = fq(round(W + s·B·A))`` sent to A
    and B directly (built lazily: torch is not imported at module level).

    Autograd through the merged weight would form ``dL/dŴ = gyᵀ·x̂``, a full ``[out, in]`` matmul
    per layer (the weight gradient of full fine-tuning). With the identity STE the same gradients
    are ``dB = s·gyᵀ·(x̂·Aᵀ)`` and ``dA = s·(gy·B)ᵀ·x̂``, which never build it.

    ``weight`` is ``Ŵ`` itself (kept for backward: one ``[out, in]`` tensor per layer until the
    backward reaches it) or a callable that recomputes it: the forward and the backward then each
    build it and drop it, so the whole model's fake-quantized weights are never alive at once.
    The recomputation is bit-identical (A, B and W do not change between forward and backward).
    """
    global _FN
    if _FN is None:
        import torch

        class MergedQATLinear(torch.autograd.Function):
            @staticmethod
            def forward(ctx, xq, lora_a, lora_b, weight, scale):
                wq = weight() if callable(weight) else weight
                if callable(weight):
                    ctx.save_for_backward(xq, lora_a, lora_b)
                    ctx.recompute = weight
                else:
                    ctx.save_for_backward(xq, lora_a, lora_b, wq)
                    ctx.recompute = None
                ctx.scale = scale
                return torch.nn.functional.linear(xq, wq)

            @staticmethod
            def backward(ctx, gy):
                if ctx.recompute is not None:
                    xq, lora_a, lora_b = ctx.saved_tensors
                    wq = ctx.recompute()
                else:
                    xq, lora_a, lora_b, wq = ctx.saved_tensors
                s = ctx.scale
                gx = gy @ wq
                del wq
                g2, x2 = gy.reshape(-1, gy.shape[-1]), xq.reshape(-1, xq.shape[-1])
                grad_b = (g2.t() @ (x2 @ lora_a.t())) * s
                grad_a = ((g2 @ lora_b).t() @ x2) * s
                return gx, grad_a, grad_b, None, None

        _FN = MergedQATLinear
    return _FN


def _single_adapter(layer: Any) -> str | None:
    """The one active adapter the fast training path handles, else None (the generic path runs,
    e.g. for learned block scales, whose gradient needs the weight gradient the fast path avoids)."""
    names = [n for n in layer.active_adapters if n in layer.lora_A]
    if layer.disable_adapters or len(names) != 1 or getattr(layer, "fan_in_fan_out", False):
        return None
    if active_theta(layer) is not None:
        return None
    a, b = layer.lora_A[names[0]].weight, layer.lora_B[names[0]].weight
    frozen = not layer.get_base_layer().weight.requires_grad
    return names[0] if frozen and a.requires_grad and b.requires_grad else None


def _forward(self, x, *args, **kwargs):
    import torch
    import torch.nn.functional as F

    base = self.get_base_layer()
    name = _single_adapter(self) if torch.is_grad_enabled() else None
    if name is not None:
        self._qat_cache = None

        def weight():
            with torch.no_grad():
                return self._qat_weight_fq(merged_weight(self, self._qat_round))

        if self._qat_act_fq is not None:
            x = self._qat_act_fq(x)
        # recompute in backward unless told to keep it (gradient checkpointing already drops it)
        w = weight if getattr(self, "_qat_recompute", True) else weight()
        y = _merged_fn().apply(x.to(base.weight.dtype), self.lora_A[name].weight, self.lora_B[name].weight, w,
                               float(self.scaling[name]))
        return y if base.bias is None else y + base.bias
    if torch.is_grad_enabled():
        self._qat_cache = None
        w = self._qat_weight_fq(merged_weight(self, self._qat_round))
    elif self.training or not getattr(self, "_qat_keep_cache", True):
        # batched scoring, or a no-grad forward in training (a reentrant checkpoint, e.g. Unsloth's):
        # rebuilt per forward, never kept
        self._qat_cache = None
        w = self._qat_weight_fq(merged_weight(self, self._qat_round))
    else:  # inference (selection, generation): quantize the merged weight once per adapter state
        key = _weight_key(self)
        cached = getattr(self, "_qat_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self._qat_weight_fq(merged_weight(self, self._qat_round)))
            self._qat_cache = cached
        w = cached[1]
    if self._qat_act_fq is not None:
        x = self._qat_act_fq(x)
    return F.linear(x.to(w.dtype), w, base.bias)


@contextlib.contextmanager
def weight_cache(model: Any, on: bool) -> Iterator[None]:
    """Inside, the merged layers' inference forward keeps (``on``) or does not keep its quantized
    weight between calls. Kept, it costs the linears' size again (worth it for token-by-token
    generation); off, each forward rebuilds it (a few % of a batched forward) and the cache is dropped."""
    layers = list(lora_linears(model).values())
    before = [getattr(m, "_qat_keep_cache", True) for m in layers]
    for m in layers:
        m._qat_keep_cache = on
        if not on:
            m._qat_cache = None
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._qat_keep_cache = b


def lora_linears(model: Any) -> dict[str, Any]:
    """``{fqn: peft lora.Linear}`` of a PEFT model."""
    from peft.tuners.lora import Linear as LoraLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def prepare_merged_qat(
    model: Any, scheme: SchemeLike, *, storage_dtype: str, learned_scales: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Make ``model`` (PEFT-wrapped) train merge-exact under ``scheme``; returns what was prepared.

    LoRA-targeted linears get the merged forward (their ``in_features`` must be a multiple of the
    scheme's group size); the scheme's other modules (LM head, embedding) get torchao's usual
    fake quantization over weights rounded to ``storage_dtype``. For a GGUF scheme every tensor
    trains under the type its recipe writes it in (:func:`prepare_gguf_outside_adapters`). LoRA
    dropout must be 0 (there is no dropout inside a merged weight). ``learned_scales``: the linears
    trained at Q4_0, MatMulNBits int4 or TorchAO int4 learn their block scales
    (:mod:`qatforge.learned_scales`).
    """
    import torch

    from qatforge.qat import QATError, count_fake_quantized, hf_model, prepare_qat

    s = parse_scheme(scheme)
    dtype = getattr(torch, storage_dtype)
    round_fn = _round_ste(dtype)
    layers = lora_linears(model)
    if not layers:
        raise QATError("qat.mode merged: the model has no LoRA linear layers")
    group = s.group_size or 1
    bad = [n for n, m in layers.items() if m.get_base_layer().in_features % group]
    if bad:
        raise QATError(f"qat.mode merged: in_features of {bad[:5]} is not a multiple of the {s.name} group size {group}")
    if learned_scales and grid_of(s) is None:
        raise QATError(f"qat.block_scales learned is for GGUF Q4_0, ONNX int4 (block 32) and TorchAO int8-int4 "
                       f"schemes; {s.name} is none of them")
    head = hf_model(model).get_output_embeddings()
    learned: list[str] = []
    for name, m in layers.items():
        drop = [d for d in m.lora_dropout.values() if not isinstance(d, torch.nn.Identity)]
        if drop:
            raise QATError(f"qat.mode merged needs train.lora.dropout 0 ({name} has LoRA dropout)")
        # a LoRA-adapted LM head is written as the recipe's output type, not the projections'
        weight_type = s.gguf.output if s.gguf and m is head else None
        act, wfq = fake_quantizers(s, weight_type)
        m._qat_act_fq, m._qat_weight_fq, m._qat_round = act, wfq, round_fn
        m.forward = types.MethodType(_forward, m)
        grid = grid_of(s, weight_type) if learned_scales else None
        if grid is not None:
            for adapter in m.active_adapters:
                attach(m, adapter, grid)
            learned.append(name)
    lora_bases = {f"{n}.base_layer" for n in layers}
    lora_weights = {id(m.get_base_layer().weight) for m in layers.values()}
    # The adapters' own tensors are not frozen weights of the base, even when loaded frozen
    # (is_trainable=False, as selection loads checkpoints): merge adds them in float32.
    lora_weights |= {id(p) for m in layers.values() for n, p in m.named_parameters() if "lora_" in n}
    # Every other frozen parameter is rounded now to what merge stores (it never changes); the
    # LoRA base weights stay as they are, since merge rounds W + s·B·A once.
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and id(p) not in lora_weights and p.is_floating_point():
                p.data = p.data.to(dtype).to(p.dtype)
    if s.gguf or s.onnx:
        prepare = prepare_gguf_outside_adapters if s.gguf else prepare_onnx_outside_adapters
        outside = prepare(model, s.gguf or s.onnx, adapted=layers.values())
        others = len(outside)
    else:
        outside = {}
        before = count_fake_quantized(model)
        prepare_qat(model, s, log=None, skip=lambda fqn: fqn in lora_bases, require=False)
        others = count_fake_quantized(model) - before
    info = {"mode": "merged", "scheme": s.name, "storage_dtype": storage_dtype,
            "merged_linears": sorted(layers), "fake_quantized_other": others}
    if outside:
        info[f"{s.target}_outside_adapters"] = outside
    if learned_scales:
        info["learned_block_scales"] = learned
    if log:
        other = (", ".join(f"{k} {v}" for k, v in outside.items()) if outside
                 else f"{others} other modules fake-quantized by torchao")
        log(f"QAT {s.name} (merged): {len(layers)} LoRA linears fake-quantize round(W + s·B·A) to {storage_dtype}; "
            + other + (f"; {len(learned)} of them learn their {grid_of(s).name} block scales" if learned else ""))
    return info


def prepare_gguf_outside_adapters(model: Any, recipe: Any, adapted: Any = ()) -> dict[str, str]:
    """Train the frozen tensors a GGUF recipe writes outside the adapters under their own types:
    the input embedding is replaced by its llama.cpp round trip in the type ``token_embd`` is written
    in (the output's type when tied, as llama-quantize does), an untied LM head by its round trip in
    the output type, and the LM head's input is fake-quantized to the recipe's activation type (the
    output matmul quantizes it as every other does). Returns ``{what: type}``."""
    import torch

    from qatforge.gguf_fake_quant import dequantized, fake_quantize
    from qatforge.qat import hf_model

    hf = hf_model(model)
    emb, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    done = {}
    with torch.no_grad():
        emb.weight.data = dequantized(emb.weight.data, recipe.embedding_type(tied)).to(emb.weight.dtype)
        done["token_embd"] = recipe.embedding_type(tied)
        if head is not None and not tied and not any(head is m for m in adapted):
            head.weight.data = dequantized(head.weight.data, recipe.output).to(head.weight.dtype)
            done["output"] = recipe.output
    if head is not None and not any(head is m for m in adapted):
        act = recipe.activations
        head.register_forward_pre_hook(lambda _m, args: (fake_quantize(args[0], act), *args[1:]))
        done["output input"] = act
    return done


def prepare_onnx_outside_adapters(model: Any, recipe: Any, adapted: Any = ()) -> dict[str, str]:
    """Train the frozen LM head as the builder writes it: its weight replaced by its MatMulNBits round
    trip and its input fake-quantized as the int8 compute does. A tied embedding shares that matrix,
    as in the builder's file (``shared_embeddings``: a ``GatherBlockQuantized`` over the LM head's
    int4 blocks); an untied one stays a float ``Gather``. Returns ``{what: type}``."""
    import torch

    from qatforge.onnx_fake_quant import dequantized, fake_quantize_activations
    from qatforge.qat import hf_model

    hf = hf_model(model)
    emb, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    if head is None or any(head is m for m in adapted):
        return {}
    with torch.no_grad():
        head.weight.data = dequantized(head.weight.data, recipe.bits, recipe.block_size).to(head.weight.dtype)
    head.register_forward_pre_hook(lambda _m, args: (fake_quantize_activations(args[0], recipe.block_size), *args[1:]))
    kind = f"int{recipe.bits} block {recipe.block_size}"
    return {"lm_head": kind, **({"embed_tokens (tied)": kind} if head.weight is emb.weight else {}),
            "lm_head input": "int8 (accuracy_level 4)"}

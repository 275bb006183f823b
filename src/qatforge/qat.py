"""Quantization-aware training with torchao and Unsloth's scheme mapping.

Schemes live in :mod:`qatforge.spec.schemes` (torch-free); this module builds the torchao config
each names (:func:`torchao_configs`) and the filters of the modules it applies to
(:func:`scheme_config`, which deploy-time quantization in :mod:`qatforge.export.torchao` applies
too), and fake-quantizes with them. torch/torchao/transformers
are imported lazily.

``quantize_(model, QATConfig(cfg, step="prepare"), filter)`` swaps the selected
``nn.Linear``/``nn.Embedding`` for fake-quantized twins that *share the same weight Parameter*;
``QATConfig(step="convert")`` without a base config swaps them back (:func:`strip_fake_quant`),
which leaves every weight bit-identical (the fake quantizers of these schemes hold no learned
state), so the adapter can be merged into the plain base weights.
"""

from __future__ import annotations

from typing import Any, Callable

from qatforge.spec.schemes import Scheme, SchemeLike, parse_scheme


class QATError(RuntimeError):
    """QAT preparation or conversion did not do what it must (e.g. zero modules quantized)."""


def _is_lora_fqn(fqn: str) -> bool:
    return any(part.startswith("lora_") for part in fqn.split("."))


def _torchao_builders() -> dict[str, Callable[[Scheme], Any]]:
    """``{torchao config class: build it from a scheme's bits and group}`` (``Scheme.torchao``)."""
    import torch
    from torchao import quantization as q
    from torchao.quantization.granularity import PerAxis, PerGroup

    def dtype(s: Scheme) -> Any:
        return getattr(torch, f"int{s.weight_bits}")

    return {
        "Int4WeightOnlyConfig": lambda s: q.Int4WeightOnlyConfig(group_size=s.group_size),
        "Int8DynamicActivationIntxWeightConfig": lambda s: q.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=dtype(s), weight_granularity=PerGroup(s.group_size)),
        "Float8DynamicActivationInt4WeightConfig": lambda s: q.Float8DynamicActivationInt4WeightConfig(),
        "Float8DynamicActivationFloat8WeightConfig": lambda s: q.Float8DynamicActivationFloat8WeightConfig(
            granularity=q.PerRow()),
        "IntxWeightOnlyConfig": lambda s: q.IntxWeightOnlyConfig(
            weight_dtype=dtype(s), granularity=PerGroup(s.group_size) if s.group_size else PerAxis(0)),
    }


def torchao_configs(scheme: SchemeLike) -> tuple[Any, Any | None]:
    """``(linear_config, embedding_config | None)`` of a scheme, as Unsloth maps it: the torchao config
    it names, and the ``int8`` scheme's (int8 per row) for an input embedding it quantizes."""
    s = parse_scheme(scheme)
    if s.torchao is None:
        raise QATError(f"scheme {s.name!r} is {s.target.upper()}-targeted: it trains with qat.mode merged only "
                       f"(qatforge.qat_lora) and ships as the run's {s.target.upper()} file, not through torchao")
    build = _torchao_builders()
    emb = parse_scheme("int8")
    return build[s.torchao](s), (build[emb.torchao](emb) if s.embedding else None)


def scheme_config(scheme: SchemeLike) -> tuple[Any, Any | None, Callable[[Any, str], bool]]:
    """``(linear_config, embedding_config | None, linear_filter)`` of a scheme (:func:`torchao_configs`).

    ``linear_filter(module, fqn)`` selects plain ``nn.Linear`` modules whose ``in_features`` is a
    multiple of the weight group size, never a LoRA module (any ``lora_*`` path component) and
    never an already fake-quantized or quantized one. The embedding config applies to
    ``nn.Embedding`` modules (input embedding) only.
    """
    import torch

    s = parse_scheme(scheme)
    cfg, emb_cfg = torchao_configs(s)
    group = s.group_size or 1

    def linear_filter(module: Any, fqn: str) -> bool:
        return (
            type(module) is torch.nn.Linear  # not a fake-quantized subclass, not a LoRA wrapper
            and not _is_lora_fqn(fqn)
            and type(module.weight) in (torch.nn.Parameter, torch.Tensor)  # not already quantized
            and module.in_features % group == 0
        )

    return cfg, emb_cfg, linear_filter


def embedding_filter(module: Any, fqn: str) -> bool:
    """The ``nn.Embedding`` modules a scheme's embedding config quantizes (never a LoRA one)."""
    import torch

    return type(module) is torch.nn.Embedding and not _is_lora_fqn(fqn)


def hf_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def untie_embeddings(model: Any) -> bool:
    """Give the LM head its own copy of a tied input-embedding weight; True when it was tied."""
    import torch

    hf = hf_model(model)
    inp, out = hf.get_input_embeddings(), hf.get_output_embeddings()
    if inp is None or out is None or out.weight is not inp.weight:
        _set_untied(hf)
        return False
    out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
    _set_untied(hf)
    return True


def _set_untied(hf: Any) -> None:
    hf.config.tie_word_embeddings = False
    text = hf.config.get_text_config(decoder=True) if hasattr(hf.config, "get_text_config") else None
    if text is not None:
        text.tie_word_embeddings = False


def count_fake_quantized(model: Any) -> int:
    """Number of torchao fake-quantized modules (Linear or Embedding) in ``model``."""
    return sum(1 for m in model.modules() if "FakeQuantized" in type(m).__name__)


def prepare_qat(
    model: Any,
    scheme: SchemeLike,
    *,
    log: Callable[[str], None] | None = None,
    skip: Callable[[str], bool] | None = None,
    require: bool = True,
) -> int:
    """Fake-quantize the frozen base of a (PEFT-wrapped) model with ``scheme``; LoRA modules untouched.

    Unsloth's order: untie embedding/LM head for schemes that quantize the embedding, then
    ``quantize_(model, QATConfig(cfg, step="prepare"), filter)`` for the embedding and the linears.
    Modules whose fqn ``skip`` accepts are left alone. Returns the number of fake-quantized
    modules; zero raises :class:`QATError` unless ``require`` is false.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    s = parse_scheme(scheme)
    cfg, emb_cfg, linear_filter = scheme_config(s)
    chosen = linear_filter if skip is None else (lambda m, fqn: linear_filter(m, fqn) and not skip(fqn))
    before = count_fake_quantized(model)
    if emb_cfg is not None:
        untie_embeddings(model)
        quantize_(model, QATConfig(emb_cfg, step="prepare"), filter_fn=embedding_filter)
    quantize_(model, QATConfig(cfg, step="prepare"), filter_fn=chosen)
    n = count_fake_quantized(model) - before
    if n <= 0 and require:
        raise QATError(
            f"qat scheme {s.name!r} fake-quantized 0 modules: no nn.Linear with in_features divisible by "
            f"{s.group_size or 1} outside the LoRA adapters"
        )
    if log:
        log(f"QAT {s.name}: {n} modules fake-quantized (LoRA modules left in full precision)")
    return n


def strip_fake_quant(model: Any) -> int:
    """Swap fake-quantized modules back to plain ones (``QATConfig(step="convert")``, no base config).

    The filter covers embeddings too: torchao's default filter only visits Linear modules, so a
    bare ``quantize_(model, QATConfig(step="convert"))`` would leave a FakeQuantizedEmbedding.
    Returns how many modules were stripped.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    n = count_fake_quantized(model)
    if n:
        quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, fqn: "FakeQuantized" in type(m).__name__)
    left = count_fake_quantized(model)
    if left:
        raise QATError(f"{left} fake-quantized modules left after QATConfig(step='convert')")
    return n

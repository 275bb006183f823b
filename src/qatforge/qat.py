"""Quantization-aware training with torchao, Unsloth's scheme mapping, and real (deploy) quantization.

Scheme names and parsing live in :mod:`qatforge.qat_schemes` (pure, torch-free); this module
builds the torchao configs and applies them. torch/torchao/transformers are imported lazily.

Two different torchao calls are involved, on purpose:

* training: ``quantize_(model, QATConfig(cfg, step="prepare"), filter)`` swaps the selected
  ``nn.Linear``/``nn.Embedding`` for fake-quantized twins that *share the same weight Parameter*;
  ``QATConfig(step="convert")`` without a base config swaps them back (:func:`strip_fake_quant`),
  which leaves every weight bit-identical (the fake quantizers of these schemes hold no learned
  state), so the adapter can be merged into the plain base weights.
* deployment: :func:`quantize_for_deploy` calls ``quantize_(model, cfg, filter)`` on the merged
  model. ``QATConfig(cfg, step="convert")`` would be a silent no-op there, because its handler
  ignores every module that is not fake-quantized, and a merged checkpoint has none; on a
  fake-quantized module it does exactly ``to_linear()`` followed by ``cfg``'s handler, which is
  what the direct call does (a test checks the two give identical logits).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

from qatforge.qat_schemes import (  # noqa: F401  (re-exported)
    ALIASES,
    GGUF_SCHEMES,
    SCHEMES,
    UNSLOTH_SCHEMES,
    Scheme,
    canonical,
    detect_cuda_capability,
    device_support,
    parse_scheme,
    problems,
)

class QATError(RuntimeError):
    """QAT preparation or conversion did not do what it must (e.g. zero modules quantized)."""


def _is_lora_fqn(fqn: str) -> bool:
    return any(part.startswith("lora_") for part in fqn.split("."))


def scheme_config(scheme: str | Mapping[str, Any]) -> tuple[Any, Any | None, Callable[[Any, str], bool]]:
    """``(linear_config, embedding_config | None, linear_filter)`` of a scheme, as Unsloth maps it.

    ``linear_filter(module, fqn)`` selects plain ``nn.Linear`` modules whose ``in_features`` is a
    multiple of the weight group size, never a LoRA module (any ``lora_*`` path component) and
    never an already fake-quantized or quantized one. The embedding config applies to
    ``nn.Embedding`` modules (input embedding) only.
    """
    import torch
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8DynamicActivationInt4WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        PerRow,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup

    s = parse_scheme(scheme)
    if s.name in GGUF_SCHEMES:
        raise QATError(f"scheme {s.name!r} is GGUF-targeted: it trains with qat.mode merged only "
                       "(qatforge.qat_lora) and ships as the run's GGUF, not through torchao")
    emb_cfg = None
    if s.name == "int4":
        cfg = Int4WeightOnlyConfig(group_size=128)
    elif s.name == "int8-int4":
        cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
        emb_cfg = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    elif s.name == "fp8-int4":
        cfg = Float8DynamicActivationInt4WeightConfig()
    elif s.name == "fp8-fp8":
        cfg = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    elif s.name == "int8":
        cfg = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    else:  # explicit weight-only spec
        cfg = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{s.weight_bits}"), granularity=PerGroup(s.group_size))
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
    scheme: str | Mapping[str, Any],
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
    cfg, emb_cfg, linear_filter = scheme_config(s.name)
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


def _is_quantized_weight(w: Any) -> bool:
    import torch

    return isinstance(w, torch.Tensor) and type(w) not in (torch.Tensor, torch.nn.Parameter)


def quantized_modules(model: Any) -> dict[str, str]:
    """``{fqn: tensor class}`` of every module whose weight is a torchao quantized tensor."""
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if _is_quantized_weight(w):
            out[name] = type(w).__name__
    return out


def quantize_for_deploy(model: Any, scheme: str | Mapping[str, Any]) -> dict[str, Any]:
    """Really quantize a plain (merged, non-PEFT, no fake-quant) model in place with ``scheme``.

    Applies ``quantize_(model, cfg, filter)`` (see the module docstring for why not
    ``QATConfig(cfg, step="convert")``), untying the embedding first when the scheme quantizes
    it or a tied LM head. Returns ``{"scheme", "untied", "modules": {fqn: tensor class}}``; zero modules raises.
    """
    from torchao.quantization import quantize_

    from qatforge.model import release_freed_memory

    s = parse_scheme(scheme)
    ok, reason = device_support(s.name, detect_cuda_capability())
    if not ok:
        raise QATError(reason)
    if count_fake_quantized(model):
        strip_fake_quant(model)
    cfg, emb_cfg, linear_filter = scheme_config(s.name)
    hf = hf_model(model)
    head, emb = hf.get_output_embeddings(), hf.get_input_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    untied = False
    # A tied LM head the scheme quantizes gets its own weight first, recorded in the config
    # (tie_word_embeddings false): transformers would otherwise re-tie it to the float embedding
    # when the checkpoint is loaded.
    if emb_cfg is not None or (tied and linear_filter(head, "lm_head")):
        untied = untie_embeddings(model)
    if emb_cfg is not None:
        quantize_(model, emb_cfg, filter_fn=embedding_filter)
    quantize_(model, cfg, filter_fn=linear_filter)
    mods = quantized_modules(model)
    if not mods:
        raise QATError(f"scheme {s.name!r} quantized 0 modules of {type(model).__name__}")
    release_freed_memory()  # the float weights quantize_ replaced
    return {"scheme": s.name, "untied": untied, "modules": mods}


def _fqn_config(model: Any, scheme: str | Mapping[str, Any]) -> Any:
    """A ``ModuleFqnToConfig`` naming exactly the modules :func:`quantize_for_deploy` quantized."""
    import torch
    from torchao.quantization import ModuleFqnToConfig

    cfg, emb_cfg, _ = scheme_config(scheme)
    mapping = {}
    for name, m in model.named_modules():
        if _is_quantized_weight(getattr(m, "weight", None)):
            mapping[name] = emb_cfg if isinstance(m, torch.nn.Embedding) else cfg
    return ModuleFqnToConfig(mapping)


def save_torchao(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    scheme: str | Mapping[str, Any],
    *,
    provenance: Mapping[str, Any] | None = None,
    check_prompt: str = "Hello",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Save a model quantized by :func:`quantize_for_deploy` as a transformers TorchAO checkpoint.

    The checkpoint's ``config.json`` carries ``TorchAoConfig(ModuleFqnToConfig(...))`` so
    ``from_pretrained`` rebuilds the tensor subclasses; weights go to ``pytorch_model.bin``
    (``safe_serialization=False``: the only form transformers 4.57.6 saves for these configs, loaded
    back with ``torch.load(weights_only=True)``). The directory is written atomically, then
    reloaded: the check compares the reloaded logits with the in-memory model on a rendered chat
    prompt and runs a short greedy ``generate``. Writes ``export.json`` (sha256, provenance).
    """
    import torch
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from qatforge.io import atomic_dir, package_versions, write_manifest

    s = parse_scheme(scheme)
    mods = quantized_modules(model)
    if not mods:
        raise QATError("save_torchao: the model has no quantized modules (call quantize_for_deploy first)")
    has_emb = any(isinstance(m, torch.nn.Embedding) and _is_quantized_weight(m.weight) for m in model.modules())
    model.config.quantization_config = TorchAoConfig(
        _fqn_config(model, s.name), include_input_output_embeddings=has_emb, untie_embedding_weights=has_emb
    )
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    ids = _check_ids(tokenizer, check_prompt)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=False)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=False)
        reloaded.eval()
        re_mods = quantized_modules(reloaded)
        if set(re_mods) != set(mods):
            raise QATError(
                f"reloaded {tmp} has quantized modules {sorted(set(re_mods) ^ set(mods))} differing from the saved model"
            )
        with torch.no_grad():
            got = reloaded(input_ids=ids).logits.float()
            gen = reloaded.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
        diff = float((got - ref).abs().max())
        if not torch.isfinite(got).all():
            raise QATError(f"reloaded {out_dir} produces non-finite logits")
        if diff > 1e-3:
            raise QATError(f"reloaded {out_dir} logits differ from the in-memory model by {diff:.3g}")
        info = {
            "scheme": s.name,
            "quantized_modules": len(mods),
            "module_types": sorted(set(mods.values())),
            "reload_max_abs_logit_diff": diff,
            "generate_check": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=False),
            "save_seconds": round(time.perf_counter() - t0, 2),
            "serialization": "pytorch_model.bin (torch.save; safe_serialization=False)",
        }
        del reloaded
    record = write_manifest(out_dir, {
        **(provenance or {}), "torchao": info,
        "versions": package_versions("torch", "torchao", "transformers"),
    })
    info["sha256"] = record["sha256"]
    if log:
        log(f"saved TorchAO {s.name} checkpoint {out_dir} ({len(mods)} quantized modules, reload diff {diff:.2e})")
    return info


def _check_ids(tokenizer: Any, prompt: str) -> Any:
    """Token ids of a one-turn chat prompt (generation prompt appended) for reload checks."""
    import torch

    from qatforge.chat import prompt_ids

    return torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": prompt}])], dtype=torch.long)


def qat_convert(
    merged_dir: str | Path,
    out_dir: str | Path,
    scheme: str | Mapping[str, Any],
    *,
    provenance: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
    threads: int | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Really quantize a merged 16-bit checkpoint with ``scheme`` and save it as a TorchAO checkpoint.

    The merged weights are loaded in float32 (torchao's CPU kernels and the QAT fake quantization
    ran in fp32 here), quantized with the scheme's torchao config (the same config whose fake
    quantization the run trained under), saved through ``TorchAoConfig`` and reloaded in a check.
    """
    import torch

    from qatforge.model import load_tokenizer, load_upcast

    if threads:
        torch.set_num_threads(threads)
    s = parse_scheme(scheme)
    t0 = time.perf_counter()
    tok = load_tokenizer(merged_dir, trust_remote_code=trust_remote_code)
    model = load_upcast(merged_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    q = quantize_for_deploy(model, s.name)
    prov = {"merged_dir": str(merged_dir), "scheme": s.name, "step": "qat_convert", **(provenance or {})}
    info = save_torchao(model, tok, out_dir, s.name, provenance=prov, log=log)
    info.update({"untied_embeddings": q["untied"], "seconds": round(time.perf_counter() - t0, 2)})
    return info

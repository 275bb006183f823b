"""Deploy-time TorchAO: really quantize a merged checkpoint with a scheme's torchao config and save a
reloadable transformers TorchAO checkpoint (:func:`quantize_checkpoint`).

Both torchao artifacts go through it, with their own export records: :func:`ptq` quantizes a
baseline run's merged model with a PTQ scheme (``torchao/<scheme>``), :func:`qat_convert` a QAT
run's with the scheme it trained under (``qat_converted``). The configs and filters are those
:mod:`qatforge.qat` fake-quantizes with during training (``scheme_config``).

:func:`quantize_for_deploy` calls ``quantize_(model, cfg, filter)``. ``QATConfig(cfg, step="convert")``
would be a silent no-op on a merged model, because its handler ignores every module that is not
fake-quantized, and a merged checkpoint has none; on a fake-quantized module it does exactly
``to_linear()`` followed by ``cfg``'s handler, which is what the direct call does (a test checks
the two give identical logits). torch/torchao/transformers are imported lazily.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from qatforge.export.record import as_log, source_record
from qatforge.io import (MANIFEST, atomic_dir, check_free_space, drop_mapped_pages, mmap_large_allocations,
                         package_versions, read_json, size_bytes, write_json, write_manifest)
from qatforge.qat import (QATError, count_fake_quantized, embedding_filter, hf_model, scheme_config, strip_fake_quant,
                          untie_embeddings)
from qatforge.spec.schemes import Scheme, SchemeLike, detect_cuda_capability, device_support, parse_scheme


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


def _upcasting(select: Callable[[Any, str], bool], dtype: Any) -> Callable[[Any, str], bool]:
    """``select``, which also casts the weight of each module it accepts to ``dtype`` just before
    ``quantize_`` quantizes it (``quantize_`` calls the filter, then the handler, module by module),
    and drops the pages of the checkpoint file the weights read so far (:func:`drop_mapped_pages`)."""
    def f(module: Any, fqn: str) -> bool:
        ok = select(module, fqn)
        if ok and module.weight.dtype != dtype:
            module.weight.data = module.weight.data.to(dtype)
            drop_mapped_pages()
        return ok

    return f


def quantize_for_deploy(model: Any, scheme: SchemeLike, *, upcast: Any = None) -> dict[str, Any]:
    """Really quantize a plain (merged, non-PEFT) model in place with ``scheme`` (fake quantizers are
    stripped first), untying the embedding first when the scheme quantizes it or a tied LM head.
    Returns ``{"scheme", "untied", "modules": {fqn: tensor class}}``; zero modules raises.

    ``upcast`` (a dtype) quantizes a model loaded in 16 bits as if it had been cast to ``upcast``
    first, holding one upcast weight at a time: each weight is cast just before its module is
    quantized, the parameters left in floating point after, and ``config.dtype`` set to it. A
    16-bit to float32 cast is exact, so the result is bit-identical to quantizing the upcast model."""
    from torchao.quantization import quantize_

    from qatforge.model import release_freed_memory

    s = parse_scheme(scheme)
    ok, reason = device_support(s, detect_cuda_capability())
    if not ok:
        raise QATError(reason)
    if count_fake_quantized(model):
        strip_fake_quant(model)
    cfg, emb_cfg, linear_filter = scheme_config(s)
    hf = hf_model(model)
    head, emb = hf.get_output_embeddings(), hf.get_input_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    untied = False
    # A tied LM head the scheme quantizes gets its own weight first, recorded in the config
    # (tie_word_embeddings false): transformers would otherwise re-tie it to the float embedding
    # when the checkpoint is loaded.
    if emb_cfg is not None or (tied and linear_filter(head, "lm_head")):
        untied = untie_embeddings(model)
    emb_filter = embedding_filter
    if upcast is not None:
        emb_filter, linear_filter = _upcasting(embedding_filter, upcast), _upcasting(linear_filter, upcast)
    if emb_cfg is not None:
        quantize_(model, emb_cfg, filter_fn=emb_filter)
    quantize_(model, cfg, filter_fn=linear_filter)
    mods = quantized_modules(model)
    if not mods:
        raise QATError(f"scheme {s.name!r} quantized 0 modules of {type(model).__name__}")
    if upcast is not None:  # what stays in floating point (norms, unquantized embedding or head)
        for p in hf.parameters():
            if not _is_quantized_weight(p) and p.is_floating_point() and p.dtype != upcast:
                p.data = p.data.to(upcast)
        hf.config.dtype = upcast
        drop_mapped_pages()
    release_freed_memory()  # the float weights quantize_ replaced
    return {"scheme": s.name, "untied": untied, "modules": mods}


def _fqn_config(model: Any, scheme: Scheme) -> Any:
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
    scheme: SchemeLike,
    *,
    provenance: Mapping[str, Any] | None = None,
    check_prompt: str = "Hello",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Save a model quantized by :func:`quantize_for_deploy` as a transformers TorchAO checkpoint.

    The checkpoint's ``config.json`` carries ``TorchAoConfig(ModuleFqnToConfig(...))`` so
    ``from_pretrained`` rebuilds the tensor subclasses. Weights go to ``model.safetensors``:
    transformers 5 saves only safetensors, and a model carrying its ``TorchAoHfQuantizer``
    (attached here, as ``from_pretrained`` would) flattens the torchao tensor subclasses into plain
    tensors plus torchao metadata in the safetensors header. The directory is written atomically, then
    reloaded: the check compares the reloaded logits with the in-memory model on a rendered chat
    prompt and runs a short greedy ``generate``. Writes ``export.json`` (sha256, provenance).
    """
    return _save_torchao([model], tokenizer, out_dir, scheme, provenance=provenance, check_prompt=check_prompt,
                         log=log)


def _save_torchao(
    held: list[Any],
    tokenizer: Any,
    out_dir: str | Path,
    scheme: SchemeLike,
    *,
    provenance: Mapping[str, Any] | None = None,
    check_prompt: str = "Hello",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """:func:`save_torchao` of ``held[0]``, which it takes out of ``held``: once the checkpoint is
    written the model is released before the reload (freed when the caller holds no other reference)."""
    import torch
    from transformers import AutoModelForCausalLM, TorchAoConfig
    from transformers.quantizers import AutoHfQuantizer

    from qatforge.model import release_freed_memory

    model = held.pop()
    s = parse_scheme(scheme)
    mods = quantized_modules(model)
    if not mods:
        raise QATError("save_torchao: the model has no quantized modules (call quantize_for_deploy first)")
    has_emb = any(isinstance(m, torch.nn.Embedding) and _is_quantized_weight(m.weight) for m in model.modules())
    model.config.quantization_config = TorchAoConfig(
        _fqn_config(model, s), include_input_output_embeddings=has_emb, untie_embedding_weights=has_emb
    )
    # save_pretrained serializes quantized weights through the model's quantizer (transformers 5):
    # without one, torchao's tensor subclasses reach safetensors unflattened and the save fails.
    model.hf_quantizer = AutoHfQuantizer.from_config(model.config.quantization_config, pre_quantized=True)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    ids = _check_ids(tokenizer, check_prompt)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        del model  # its logits are ``ref``
        release_freed_memory()
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
            "serialization": "model.safetensors (torchao flattened tensor subclasses)",
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


def load_for_quantize(path: str | os.PathLike, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """``(model, upcast)`` to pass to :func:`quantize_for_deploy`: a checkpoint stored in 16-bit float
    whose buffers load in float32 comes in its stored dtype with ``upcast`` float32 (what
    :func:`qatforge.model.load_upcast` would give, cast later weight by weight); any other is
    ``load_upcast`` to float32 at once, with ``upcast`` None."""
    import torch

    from qatforge.model import load_causal_lm, load_upcast, stored_dtype

    stored = stored_dtype(path)
    if stored in (torch.bfloat16, torch.float16):
        model = load_causal_lm(path, dtype=stored, trust_remote_code=trust_remote_code)
        if all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point()):
            return model, torch.float32
        del model  # a buffer computed at init in the stored dtype: only a full-precision load is exact
    return load_upcast(path, dtype=torch.float32, trust_remote_code=trust_remote_code), None


def quantize_checkpoint(
    merged_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    scheme: SchemeLike,
    *,
    provenance: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    threads: int | None = None,
    trust_remote_code: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Quantize a merged 16-bit checkpoint as loaded in float32 (torchao's CPU kernels and the QAT fake
    quantization run in fp32 here) with ``scheme`` (:func:`quantize_for_deploy`) and :func:`save_torchao`
    it, with ``provenance(quantize_for_deploy's result)`` in its record. Returns the save check plus
    ``untied_embeddings`` and ``seconds``.

    The model is loaded in its stored dtype and upcast one weight at a time as it is quantized
    (:func:`load_for_quantize`), so no float32 copy of the whole model is ever held; the pages of the
    mapped checkpoint are dropped as weights are consumed, freed weights go back to the OS at once
    (:func:`qatforge.io.mmap_large_allocations`), and the quantized model is released before the
    reload check. The output is bit-identical to quantizing a float32 load (measured at 500M
    parameters: peak RSS 3.4x the bf16 size before, 1.74x after)."""
    import torch

    from qatforge.model import load_tokenizer

    log = as_log(log)
    merged_dir = Path(merged_dir)
    if not (merged_dir / "config.json").is_file():
        raise FileNotFoundError(f"{merged_dir} is not an HF checkpoint (no config.json)")
    s = parse_scheme(scheme)  # unknown scheme -> ValueError listing the valid ones
    if threads:
        torch.set_num_threads(threads)
    check_free_space(out_dir, size_bytes(merged_dir))
    t0 = time.perf_counter()
    mmap_large_allocations()  # freed float weights leave the process as the quantized ones arrive
    tok = load_tokenizer(merged_dir, trust_remote_code=trust_remote_code)
    model, upcast = load_for_quantize(merged_dir, trust_remote_code=trust_remote_code)
    q = quantize_for_deploy(model, s, upcast=upcast)
    log(f"{s.name}: {len(q['modules'])} modules quantized (untied embeddings: {q['untied']})")
    held = [model]
    del model  # released by _save_torchao before it reloads the checkpoint
    info = _save_torchao(held, tok, out_dir, s, provenance=provenance(q), log=log)
    return info | {"untied_embeddings": q["untied"], "seconds": round(time.perf_counter() - t0, 2)}


def ptq(
    merged_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    scheme: SchemeLike,
    *,
    threads: int | None = None,
    trust_remote_code: bool = False,
    source: Mapping[str, Any] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Post-training quantization of a baseline run's merged model: :func:`quantize_checkpoint`, its
    record holding source, tool versions, settings and the total duration; returns its provenance."""
    def record(q: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "source": source_record(merged_dir, **(source or {})),
            "tool": {"name": "torchao", **package_versions("torchao", "torch", "transformers")},
            "settings": {"scheme": q["scheme"], "method": "ptq", "load_dtype": "float32",
                         "serialization": "safetensors"},
            "untied_embeddings": q["untied"],
        }

    started = time.perf_counter()
    check = quantize_checkpoint(merged_dir, out_dir, scheme, provenance=record, threads=threads,
                                trust_remote_code=trust_remote_code, log=log)
    # Record the total duration without re-hashing the checkpoint.
    manifest = Path(out_dir) / MANIFEST
    written = read_json(manifest)
    written["provenance"]["duration_s"] = round(time.perf_counter() - started, 3)
    write_json(manifest, written)
    as_log(log)(f"wrote {out_dir} ({written['size_bytes'] / 2**20:.1f} MiB) in {written['provenance']['duration_s']} s")
    return written["provenance"] | {"size_bytes": written["size_bytes"], "sha256": written["sha256"], "check": check}


def qat_convert(
    merged_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    scheme: SchemeLike,
    *,
    provenance: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
    threads: int | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """A QAT run's merged model quantized with the scheme it trained under: :func:`quantize_checkpoint`,
    its record holding ``merged_dir``, ``scheme``, ``step`` and ``provenance``; returns the check."""
    def record(q: Mapping[str, Any]) -> dict[str, Any]:
        return {"merged_dir": str(merged_dir), "scheme": q["scheme"], "step": "qat_convert", **(provenance or {})}

    return quantize_checkpoint(merged_dir, out_dir, scheme, provenance=record, threads=threads,
                               trust_remote_code=trust_remote_code, log=log)

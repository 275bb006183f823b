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
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from qatforge.export.record import as_log, source_record
from qatforge.io import (MANIFEST, atomic_dir, check_free_space, drop_mapped_pages, mmap_large_allocations,
                         package_versions, read_json, size_bytes, write_json, write_manifest)
from qatforge.learned_scales import SCALES_FILE, saved_grid
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


# A weight whose float32 copy is larger than this is quantized in row blocks of about this size.
ROW_BLOCK_BYTES = 64 * 2**20


def _over_block(weight: Any, block_bytes: int) -> bool:
    """A 2-D weight larger than ``block_bytes`` in float32: one :func:`_row_blocks` splits."""
    return weight.dim() == 2 and weight.shape[0] * weight.shape[1] * 4 > block_bytes


def _row_blocks(weight: Any, block_bytes: int) -> Iterator[tuple[int, Any]]:
    """``(first row, weight[rows])`` of a 2-D weight (float or quantized), about ``block_bytes`` of
    float32 each."""
    rows, cols = weight.shape
    step = max(1, block_bytes // (cols * 4))
    for start in range(0, rows, step):
        yield start, weight[start:start + step]


def quantize_rows(module: Any, config: Any, *, upcast: Any = None, block_bytes: int | None = None) -> bool:
    """Quantize the 2-D weight of a bias-free ``nn.Linear`` or ``nn.Embedding`` with ``config`` one row
    block at a time (each block upcast to ``upcast`` first, if given), and put the blocks' quantized
    tensors together as one; returns False, changing nothing, for a weight of at most ``block_bytes``
    in float32 (default :data:`ROW_BLOCK_BYTES`), a module with a bias, or a quantized tensor whose
    data is not row-aligned.

    ``quantize_`` on the whole weight holds several float32 temporaries of it: at a 151,936-token
    vocabulary each is 594 MiB for a hidden size of 1,024. The schemes' weight quantizers choose
    their scales per row or per group of a row, so the blocks give the same bytes (tested for the
    schemes that run on CPU: int8-int4, int8, int4-w32, int2-w128)."""
    import torch
    from torchao.quantization import quantize_

    w = module.weight
    block_bytes = ROW_BLOCK_BYTES if block_bytes is None else block_bytes
    if (getattr(module, "bias", None) is not None or type(module) not in (torch.nn.Linear, torch.nn.Embedding)
            or not _over_block(w, block_bytes)):
        return False
    cols = w.shape[1]
    pieces = []
    for _, block in _row_blocks(w.detach(), block_bytes):
        if upcast is not None and block.dtype != upcast:
            block = block.to(upcast)
        if type(module) is torch.nn.Linear:
            shell = torch.nn.Linear(cols, len(block), bias=False, device="meta")
            shell.weight = torch.nn.Parameter(block, requires_grad=False)
        else:
            shell = torch.nn.Embedding(len(block), cols, _weight=block, _freeze=True)
        quantize_(shell, config, filter_fn=lambda m, fqn: m is shell)
        piece = shell.weight
        names = getattr(type(piece), "tensor_data_names", None)
        if (not names or getattr(type(piece), "optional_tensor_data_names", None)
                or getattr(piece, "block_size", (1,))[0] != 1
                or any(getattr(piece, n).dim() == 0 or getattr(piece, n).shape[0] != len(block) for n in names)):
            return False  # not row-aligned data: quantize_ on the whole weight instead
        pieces.append(piece)
    cls = type(pieces[0])
    data = [torch.cat([getattr(p, n) for p in pieces]) for n in cls.tensor_data_names]
    attrs = [getattr(pieces[0], n) for n in cls.tensor_attribute_names]
    module.weight = torch.nn.Parameter(cls(*data, *attrs), requires_grad=False)
    return True


def _blocked_linear(self: Any, x: Any) -> Any:
    import torch

    return torch.cat([torch.nn.functional.linear(x, w) for _, w in _row_blocks(self.weight, ROW_BLOCK_BYTES)], -1)


def _blocked_embedding(self: Any, ids: Any) -> Any:
    import torch

    out = None
    for start, w in _row_blocks(self.weight, ROW_BLOCK_BYTES):
        hit = (ids >= start) & (ids < start + len(w))
        if hit.any():
            rows = torch.nn.functional.embedding(ids[hit] - start, w)
            if out is None:
                out = rows.new_zeros((*ids.shape, rows.shape[-1]))
            out[hit] = rows
    return out


@contextmanager
def blocked_dequantization(model: Any) -> Iterator[int]:
    """Within, each bias-free quantized ``nn.Linear`` and each quantized ``nn.Embedding`` of ``model``
    whose weight exceeds :data:`ROW_BLOCK_BYTES` in float32 (a large vocabulary's head and input
    embedding) computes from row blocks of its weight; yields how many modules it changed.

    torchao's CPU tensors dequantize the whole weight to float32 on every call (594 MiB at a
    151,936-token vocabulary and hidden size 1,024, and as much again in temporaries); a block's
    dequantized rows are the same values, so a lookup is identical and a logit is the same dot
    product."""
    import torch

    changed = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not _is_quantized_weight(w) or not _over_block(w, ROW_BLOCK_BYTES):
            continue
        if type(m) is torch.nn.Linear and m.bias is None:
            m.forward = types.MethodType(_blocked_linear, m)
        elif type(m) is torch.nn.Embedding:
            m.forward = types.MethodType(_blocked_embedding, m)
        else:
            continue
        changed.append(m)
    try:
        yield len(changed)
    finally:
        for m in changed:
            del m.forward


def _streamed(select: Callable[[Any, str], bool], dtype: Any, config: Any) -> Callable[[Any, str], bool]:
    """``select``, which also casts the weight of each module it accepts to ``dtype`` (unless None) just before
    ``quantize_`` quantizes it (``quantize_`` calls the filter, then the handler, module by module),
    and drops the pages of the checkpoint file the weights read so far (:func:`drop_mapped_pages`).
    A large weight is quantized with ``config`` here, in row blocks (:func:`quantize_rows`), and
    left out of ``quantize_``."""
    def f(module: Any, fqn: str) -> bool:
        ok = select(module, fqn)
        if ok and quantize_rows(module, config, upcast=dtype):
            drop_mapped_pages()
            return False
        if ok and dtype is not None and module.weight.dtype != dtype:
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
    emb_filter, linear_filter = _streamed(embedding_filter, upcast, emb_cfg), _streamed(linear_filter, upcast, cfg)
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
    with torch.no_grad(), blocked_dequantization(model):
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
        with torch.no_grad(), blocked_dequantization(reloaded):
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
    reload check. A weight over :data:`ROW_BLOCK_BYTES` in float32 is quantized in row blocks
    (:func:`quantize_rows`), and the checks compute it from row blocks (:func:`blocked_dequantization`).
    The output is bit-identical to quantizing a float32 load (peak RSS / bf16 size: 3.4x before, 1.74x
    after at 500M parameters; 3.43x before the row blocks, 1.82x after, at Qwen3-0.6B's shape)."""
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
    scales = merged_dir / SCALES_FILE
    if scales.is_file() and s.scale_grid() and saved_grid(scales) == s.scale_grid():
        from qatforge.export.torchao_block_scales import write_learned_scales

        q["learned_block_scales"] = learned = write_learned_scales(model, merged_dir, scales)
        log(f"wrote the learned block scales of {learned['tensors']} weights ({learned['blocks']} blocks; learned / "
            f"torchao's own scale, quartiles {learned['scale_ratio_quartiles']})")
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
        return {"merged_dir": str(merged_dir), "scheme": q["scheme"], "step": "qat_convert", **(provenance or {}),
                **({"learned_block_scales": q["learned_block_scales"]} if "learned_block_scales" in q else {})}

    return quantize_checkpoint(merged_dir, out_dir, scheme, provenance=record, threads=threads,
                               trust_remote_code=trust_remote_code, log=log)

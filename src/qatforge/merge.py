"""Merge the chosen LoRA adapter into the base: the run's 16-bit source-of-truth HF checkpoint.

QAT runs need no fake quantization here. ``QATConfig(..., step="prepare")`` only wraps modules
around the *same* weight Parameters, and ``QATConfig(step="convert")`` without a base config
unwraps them (Unsloth's strip before merging), so prepare-then-strip is the identity on every
weight (``tests/test_qat.py`` checks this bit for bit). The adapter file holds only LoRA
tensors, so loading it onto the plain base and merging gives exactly what Unsloth's
strip-then-``merge_and_unload`` gives. :func:`merge` still strips any fake-quantized module it
finds (none after a plain load) and records the count.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

DTYPES = ("bfloat16", "float16", "float32")
STORAGE_DTYPE = "bfloat16"  # what the merged checkpoint stores (merge-exact QAT rounds to it)
CHECK_PROMPTS = (
    "Reverse: a b c",
    "Sort the digits: 3 1 2",
    "Uppercase: merge check",
)


class MergeError(RuntimeError):
    """The merged checkpoint failed a check (adapter load, template, token ids, reload parity)."""


def check_inputs(tok: Any, prompts: tuple[str, ...]) -> Any:
    """Right-padded ids + mask of a few rendered one-turn chat prompts (for logits parity)."""
    from qatforge.chat import collate, prompt_ids

    rows = [{"input_ids": prompt_ids(tok, [{"role": "user", "content": p}])} for p in prompts]
    b = collate(rows, tok.pad_token_id)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def masked_max_diff(a: Any, b: Any, mask: Any) -> float:
    """Largest absolute difference of two logits tensors over the positions ``mask`` keeps."""
    m = mask.bool().unsqueeze(-1)
    return float(((a.float() - b.float()).abs() * m).max())


def token_checks(base_tok: Any, merged_tok: Any, merged_config: Any, merged_gen: Any) -> dict[str, Any]:
    """Chat template identity, special-token ids, and the double-BOS check of a rendered prompt."""
    from qatforge.chat import bos_policy, prompt_ids

    msgs = [{"role": "user", "content": CHECK_PROMPTS[0]}]
    ids = prompt_ids(merged_tok, msgs)
    bos = merged_tok.bos_token_id
    policy, base_policy = bos_policy(merged_tok), bos_policy(base_tok)
    leading_bos = 0
    while bos is not None and leading_bos < len(ids) and ids[leading_bos] == bos:
        leading_bos += 1
    gen_eos = getattr(merged_gen, "eos_token_id", None)
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    checks = {
        "chat_template_identical": merged_tok.chat_template == base_tok.chat_template,
        "eos_token_id": merged_tok.eos_token_id,
        "bos_token_id": bos,
        "pad_token_id": merged_tok.pad_token_id,
        "base_eos_bos_pad": [base_tok.eos_token_id, base_tok.bos_token_id, base_tok.pad_token_id],
        "special_ids_match_base": (merged_tok.eos_token_id, bos, merged_tok.pad_token_id)
        == (base_tok.eos_token_id, base_tok.bos_token_id, base_tok.pad_token_id),
        "config_eos_token_id": merged_config.eos_token_id,
        "generation_eos_token_id": gen_eos,
        "eos_in_generation_config": merged_tok.eos_token_id in gen_eos,
        "leading_bos_tokens": leading_bos,
        "no_double_bos": leading_bos <= 1,
        "bos_policy": {k: v for k, v in policy.items() if k != "bos_token"},
        "bos_policy_matches_base": policy["add_bos"] == base_policy["add_bos"] and leading_bos == int(policy["add_bos"]),
    }
    return checks


def merge(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    qat_scheme: str | None = None,
    dtype: str = STORAGE_DTYPE,
    trust_remote_code: bool = False,
    provenance: Mapping[str, Any] | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Merge ``adapter_dir`` into ``base_dir`` and save a ``dtype`` safetensors checkpoint atomically.

    ``adapter_dir`` None (a distilled QAT run that selected step 0) saves the base itself, cast to
    ``dtype``, through the same checks.

    Each merged weight is ``W + delta`` computed in float32 and rounded to ``dtype`` once (bf16 by
    default: the range of fp32, what GGUF ``bf16`` and most deployments use). A base stored in
    ``dtype`` is loaded as it is and merged in place (peft adds the float32 LoRA delta, and torch
    computes a 16-bit ``+=`` in float32 before rounding): one 16-bit copy of the weights instead of
    a float32 one. Any other base is upcast to float32, merged, and cast once. Saved with tokenizer
    files, chat template and generation_config; then checked (template, token ids, double BOS) and
    reloaded to compare logits with the in-memory merged model (an exact match is expected). The
    in-memory model is freed before the reload, so at most about two bf16-sized copies of the
    weights are held.
    Writes ``export.json`` (sha256, provenance) and returns the record.
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from qatforge.chat import bos_policy
    from qatforge.io import atomic_dir, check_free_space, package_versions, size_bytes, write_manifest
    from qatforge.model import (
        cast_parameters, load_causal_lm, load_tokenizer, load_upcast, release_freed_memory, save_tokenizer,
        stored_dtype,
    )
    from qatforge.learned_scales import PARAM as SCALE_PARAM
    from qatforge.learned_scales import grid_of, write_merged_scales
    from qatforge.qat import count_fake_quantized, strip_fake_quant
    from qatforge.spec.schemes import parse_scheme

    if dtype not in DTYPES:
        raise MergeError(f"merge dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
    adapter_file = adapter_dir / "adapter_model.safetensors" if adapter_dir else None
    if adapter_file is not None and not adapter_file.is_file():
        raise MergeError(f"{adapter_dir}: no adapter_model.safetensors (not a LoRA checkpoint)")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    target = getattr(torch, dtype)

    base_tok = load_tokenizer(base_dir, trust_remote_code=trust_remote_code)
    in_place = stored_dtype(base_dir) == target
    if in_place:
        model = load_causal_lm(base_dir, dtype=target, trust_remote_code=trust_remote_code)
    else:
        model = load_upcast(base_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if adapter_dir is None:
        merged, n_lora, stripped, thetas, grid = model, 0, 0, 0, None
    else:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        # Every adapter tensor must have landed in the model (no silently ignored keys).
        # Learned block scales (θ) are not LoRA weights: merge turns them into scales beside the
        # checkpoint, on the grid of the run's scheme.
        keys = list(load_file(str(adapter_file)))
        saved = [k for k in keys if not k.endswith("." + SCALE_PARAM)]
        thetas = len(keys) - len(saved)
        grid = grid_of(parse_scheme(qat_scheme)) if thetas and qat_scheme else None
        if thetas and grid is None:
            raise MergeError(f"{adapter_file}: {thetas} learned block scales, but qat_scheme {qat_scheme!r} "
                             "has no grid they belong to (merge needs the run's scheme)")
        n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
        if n_lora != len(saved):
            raise MergeError(f"{adapter_file}: {len(saved)} adapter tensors, but {n_lora} LoRA parameters in the model")
        stripped = strip_fake_quant(model) if count_fake_quantized(model) else 0
        merged = model.merge_and_unload()
    merged.eval()
    if count_fake_quantized(merged) or any("lora_" in n for n, _ in merged.named_parameters()):
        raise MergeError("merged model still has LoRA or fake-quantized modules")

    enc = check_inputs(base_tok, CHECK_PROMPTS)
    # merged in place: nothing was cast (float32), or there is no float32 model to compare with
    cast_diff = 0.0 if target == torch.float32 else None
    if not in_place:
        with torch.no_grad():
            logits_fp32 = merged(**enc).logits
        cast_parameters(merged, target)
    with torch.no_grad():
        logits_mem = merged(**enc).logits.float()
    if not in_place:
        cast_diff = masked_max_diff(logits_fp32, logits_mem, enc["attention_mask"])
        del logits_fp32
    n_params = sum(p.numel() for p in merged.parameters())
    check_free_space(out_dir, n_params * merged.dtype.itemsize)

    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, max_shard_size="5GB")  # transformers 5 writes safetensors only
        n_scaled = write_merged_scales(adapter_dir, merged.state_dict(), tmp, grid) if thetas else 0
        save_tokenizer(base_tok, tmp)  # with the BOS rule as add_bos_token
        del merged, model
        release_freed_memory()
        re_model = load_causal_lm(tmp, dtype=target, trust_remote_code=False)
        re_tok = load_tokenizer(tmp, trust_remote_code=False)
        with torch.no_grad():
            logits_re = re_model(**enc).logits.float()
        reload_diff = masked_max_diff(logits_mem, logits_re, enc["attention_mask"])
        checks = token_checks(base_tok, re_tok, re_model.config, re_model.generation_config)
        checks["reload_max_abs_logit_diff"] = reload_diff
        checks["fp32_to_16bit_max_abs_logit_diff"] = cast_diff
        checks["safetensors"] = any(Path(tmp).glob("*.safetensors")) and not any(Path(tmp).glob("*.bin"))
        problems = []
        if not checks["chat_template_identical"]:
            problems.append("chat template differs from the base's")
        if not checks["special_ids_match_base"]:
            problems.append(f"eos/bos/pad ids {checks['eos_token_id'], checks['bos_token_id'], checks['pad_token_id']} "
                            f"differ from the base's {checks['base_eos_bos_pad']}")
        if not checks["no_double_bos"] or not checks["bos_policy_matches_base"]:
            problems.append(f"rendered prompt starts with {checks['leading_bos_tokens']} BOS tokens "
                            f"(BOS rule {checks['bos_policy']}, the base's add_bos {bos_policy(base_tok)['add_bos']})")
        if not checks["eos_in_generation_config"]:
            problems.append("generation_config eos_token_id does not include the tokenizer's eos")
        if reload_diff > 0.0:
            problems.append(f"reloaded logits differ from the in-memory merged model by {reload_diff:.3g}")
        if problems:
            raise MergeError(f"merged checkpoint {out_dir} failed checks: " + "; ".join(problems))
        del re_model

    info = {
        "base_dir": str(base_dir),
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "qat_scheme": qat_scheme,
        "dtype": dtype,
        "merged_in": dtype if in_place else "float32",
        "parameters": n_params,
        "lora_tensors": n_lora,
        "fake_quantized_stripped": stripped,
        "learned_block_scales": n_scaled,
        "checks": checks,
        "seconds": round(time.perf_counter() - t0, 2),
        "size_bytes": size_bytes(out_dir),
    }
    record = write_manifest(out_dir, {
        **(provenance or {}), "merge": info,
        "versions": package_versions("torch", "transformers", "peft", "torchao"),
    })
    info["sha256"] = record["sha256"]
    cast = "merged in place" if cast_diff is None else f"16-bit cast diff {cast_diff:.3g}"
    log(f"merged {adapter_dir} into {base_dir} → {out_dir} ({dtype}, reload diff {reload_diff:.2e}, {cast})")
    return info

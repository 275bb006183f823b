"""The run's base model: the builtin tiny Qwen3 (built and warmed up locally) or a real checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from qatforge.capabilities.torchao import check_torchao_schemes
from qatforge.io import atomic_dir, read_json, write_manifest
from qatforge.spec.builtin import BUILTIN_PREFIX


def builtin_recipe(builtin: dict[str, Any], seed: int, max_tokens: int) -> dict[str, Any]:
    """Everything that decides the builtin base's weights (with the code and library versions,
    which ``base_cache.recipe_key`` adds). The outliers are planted after the cache, so they are not
    part of it."""
    warmup = {k: v for k, v in builtin.items() if k != "outliers"}
    return {"model": "tiny-qwen3", "seed": seed, "max_tokens": max_tokens, **warmup}


def build(
    base: str,
    out_dir: str | Path,
    *,
    builtin: dict[str, Any],
    seed: int,
    max_tokens: int,
    trust_remote_code: bool = False,
    threads: int = 1,
    torchao_schemes: Sequence[tuple[str, str]] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the base checkpoint to ``out_dir`` (safetensors, tokenizer, chat template).

    The builtin base is trained on its own warm-up corpus (``datagen.base_corpus``), never on the
    dataset, and taken from the machine cache when the same recipe was built before
    (``base_cache``); then ``builtin["outliers"]`` are planted (``outliers.plant``). Each
    (config key, scheme) of ``torchao_schemes`` must find modules to quantize
    (``capabilities.torchao.check_torchao_schemes``, before a local base's weights are loaded);
    the counts go into the manifest.
    """
    import torch

    torch.set_num_threads(threads)
    if base.startswith(BUILTIN_PREFIX):
        from qatforge import base_cache, datagen, outliers, tiny

        recipe = builtin_recipe(builtin, seed, max_tokens)
        key = base_cache.recipe_key(recipe)
        if base_cache.fetch(key, out_dir, log=log):
            info = read_json(Path(out_dir) / "warmup.json")["metrics"] | {"cache": "hit"}
        else:
            info = tiny.build_base(
                [r["messages"] for r in datagen.base_corpus(builtin["corpus_seed"], builtin["corpus_size"])],
                out_dir,
                steps=builtin["steps"],
                batch_size=builtin["batch_size"],
                lr=builtin["lr"],
                seed=seed,
                vocab_size=builtin["vocab_size"],
                max_len=max_tokens,
                threads=threads,
            ) | {"cache": "miss"}
            base_cache.store(key, out_dir, log=log)
        info["recipe_key"] = key
        planted = builtin.get("outliers") or {}
        info["outliers"] = outliers.plant(out_dir, channels=planted.get("channels", 0),
                                          scale=planted.get("scale", 1), seed=seed)
        if info["outliers"]["channels"]:
            log(f"planted outlier channels {info['outliers']['channels']} (x{info['outliers']['scale']})")
        counts = check_torchao_schemes(out_dir, torchao_schemes)
    else:
        from qatforge.model import check_chat_tokenizer, load_causal_lm, load_tokenizer

        counts = check_torchao_schemes(base, torchao_schemes, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
        check_chat_tokenizer(tokenizer, base)
        model = load_causal_lm(base, trust_remote_code=trust_remote_code)
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        info = {"source": base, "parameters": sum(p.numel() for p in model.parameters())}
        log(f"copied base {base} into {out_dir}")
    if counts:
        log(f"torchao modules to quantize per scheme: {counts}")
    write_manifest(out_dir, {"stage": "base", "source": base, "seed": seed, "info": info, "torchao_modules": counts})
    return info

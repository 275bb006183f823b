"""The run's base model: the builtin tiny Qwen3 (built and warmed up locally) or a real checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from qatforge.config import BUILTIN_PREFIX
from qatforge.io import atomic_dir, write_manifest


def build(
    base: str,
    train_parquet: str | Path,
    out_dir: str | Path,
    *,
    builtin: dict[str, Any],
    seed: int,
    max_tokens: int,
    trust_remote_code: bool = False,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the base checkpoint to ``out_dir`` (safetensors, tokenizer, chat template)."""
    import torch

    torch.set_num_threads(threads)
    if base.startswith(BUILTIN_PREFIX):
        from qatforge import tiny

        info = tiny.build_base(
            train_parquet,
            out_dir,
            steps=builtin["steps"],
            batch_size=builtin["batch_size"],
            lr=builtin["lr"],
            seed=seed,
            vocab_size=builtin.get("vocab_size", 1024),
            max_len=max_tokens,
            threads=threads,
        )
    else:
        from qatforge.model import check_chat_tokenizer, load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
        check_chat_tokenizer(tokenizer, base)
        model = load_causal_lm(base, trust_remote_code=trust_remote_code)
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        info = {"source": base, "parameters": sum(p.numel() for p in model.parameters())}
        log(f"copied base {base} into {out_dir}")
    write_manifest(out_dir, {"stage": "base", "source": base, "seed": seed, **{"info": info}})
    return info

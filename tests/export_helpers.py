"""A tiny merged-style HF checkpoint (real project tokenizer + random Qwen3) shared by the export tests.

Built once per pytest session under the session temp dir; each export test module requests it
through its own fixture calling ``tiny_checkpoint(tmp_path_factory)``.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

PARITY_EXTRA = [
    "",
    " ",
    "\n\n",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nmixed",
    "numbers 1234567 3.14159 1,000,000",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🚀🦙",
    "don't won't I'll we've they're he'd",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
]


def synthetic_conversations(n: int = 240, seed: int = 0) -> list[list[dict]]:
    """Deterministic arithmetic / copy chats, like the project's data (system/user/assistant)."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "green", "swift", "ember", "delta", "maple", "quartz"]
    convs = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if i % 3 == 0:
            q, ans = f"What is {a} + {b}?", str(a + b)
        elif i % 3 == 1:
            q, ans = f"What is {a} times {b}?", str(a * b)
        else:
            w = rng.sample(words, 3)
            q, ans = f"Repeat the words: {' '.join(w)}.", " ".join(w)
        conv = [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
        if i % 4 == 0:
            conv.insert(0, {"role": "system", "content": "You are a careful assistant."})
        convs.append(conv)
    return convs


def tiny_checkpoint(tmp_path_factory) -> Path:
    """Path of the session's tiny merged checkpoint (safetensors + tokenizer + chat template)."""
    root = tmp_path_factory.getbasetemp() / "tiny-merged"
    if (root / "config.json").is_file():
        return root
    import torch

    from qatforge.io import atomic_dir
    from qatforge.tiny import build_model, build_tokenizer

    torch.set_num_threads(2)
    convs = synthetic_conversations()
    tok = build_tokenizer((t for c in convs for m in c for t in (m["role"] + "\n", m["content"])), vocab_size=512)
    model = build_model(tok, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, head_dim=64, seed=0)
    with torch.no_grad():  # larger-than-init weights so quantization errors are visible but finite
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    with atomic_dir(root) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return root


def parity_corpus(tokenizer, n: int = 60) -> list[str]:
    """Rendered chats (with and without generation prompt) plus edge-case strings."""
    convs = synthetic_conversations(n, seed=1)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    texts += [tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in convs[:10]]
    return texts + PARITY_EXTRA


REVERSE_SYSTEM = {"role": "system", "content": "Reply with the answer only."}
REVERSE_WORDS = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"]


def reverse_task_checkpoint(root: Path, n_conv: int = 60, perturbed: bool = False) -> dict:
    """A random tiny Qwen3 + tokenizer (qatforge.tiny) saved as ``root/merged``, with a test split
    ``root/test.parquet`` of a word-reversal task; ``perturbed`` also saves a noisy copy as ``root/perturbed``."""
    import numpy as np
    import polars as pl
    import torch

    from qatforge import tiny

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    convs = []
    for _ in range(n_conv):
        ws = [REVERSE_WORDS[j] for j in rng.integers(0, len(REVERSE_WORDS), 3)]
        q, a = f"Reverse: {' '.join(ws)}", " ".join(reversed(ws))
        convs.append([REVERSE_SYSTEM, {"role": "user", "content": q}, {"role": "assistant", "content": a}])
    tok = tiny.build_tokenizer((t for c in convs for m in c for t in (m["role"] + "\n", m["content"])), vocab_size=320)
    model = tiny.build_model(tok, hidden=256, intermediate=256, layers=1, heads=4, kv_heads=2, head_dim=64, seed=0)
    out = {"root": root, "merged": root / "merged", "parquet": root / "test.parquet", "model": model,
           "tokenizer": tok}
    model.save_pretrained(out["merged"], safe_serialization=True)
    tok.save_pretrained(out["merged"])
    if perturbed:  # same tokenizer, noisy weights
        noisy = copy.deepcopy(model)
        with torch.no_grad():
            for p in noisy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out["perturbed"] = root / "perturbed"
        noisy.save_pretrained(out["perturbed"], safe_serialization=True)
        tok.save_pretrained(out["perturbed"])
    dtype = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
    pl.DataFrame({"messages": convs, "task": ["reverse"] * n_conv},
                 schema={"messages": dtype, "task": pl.String}).write_parquet(out["parquet"])
    return out

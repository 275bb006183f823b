"""The builtin ``builtin:tiny-qwen3`` base: a byte-level BPE tokenizer trained on its own warm-up
corpus, a small real ``Qwen3ForCausalLM`` and its full-parameter warm-up on that corpus."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from qatforge.spec.builtin import TINY_QWEN3_SHAPE

# The Qwen2 pre-tokenizer regex (as in Qwen2/Qwen3 tokenizer.json), so llama.cpp's ``qwen2``
# pre-tokenizer splits text the same way.
LOG = logging.getLogger(__name__)

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML, Qwen style (no default system prompt, no thinking blocks).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE (Qwen2 split regex + ByteLevel) on ``texts``; ChatML fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_input_names=["input_ids", "attention_mask"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_max_length=32768,
        add_bos_token=False,
        add_eos_token=False,
    )
    return fast


def build_model(
    tokenizer: Any,
    *,
    hidden: int = TINY_QWEN3_SHAPE["hidden"],
    intermediate: int = TINY_QWEN3_SHAPE["intermediate"],
    layers: int = TINY_QWEN3_SHAPE["layers"],
    heads: int = TINY_QWEN3_SHAPE["heads"],
    kv_heads: int = TINY_QWEN3_SHAPE["kv_heads"],
    head_dim: int = TINY_QWEN3_SHAPE["head_dim"],
    seed: int = 0,
    max_positions: int = 2048,
) -> Any:
    """A randomly initialised fp32 ``Qwen3ForCausalLM`` sized for ``tokenizer`` (untied LM head).

    Every 2-D weight has rows of length ``hidden``/``intermediate``/``heads*head_dim``; keep them
    multiples of 256 so llama.cpp K-quants apply to all of them.
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    for name, v in (("hidden", hidden), ("intermediate", intermediate), ("heads*head_dim", heads * head_dim)):
        if v % 256:
            raise ValueError(f"{name}={v} is not a multiple of 256 (llama.cpp K-quants need it)")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError("tokenizer needs eos and pad tokens")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
        use_cache=True,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=pad, bos_token_id=None, do_sample=False, max_new_tokens=64
    )
    return model


def warmup(
    model: Any,
    tokenizer: Any,
    train_conversations: Sequence[Sequence[dict]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_len: int,
    log: Callable[[dict], None] | None = None,
    log_every: int = 25,
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
) -> list[dict]:
    """Full-parameter fp32 training, loss on assistant tokens, AdamW + linear warm-up + cosine.

    Data order is a seeded permutation per epoch; returns the logged records
    (step, loss, lr, grad_norm, tokens_per_s, elapsed_s).
    """
    import torch

    from qatforge.chat import IGNORE_INDEX, collate, encode_for_training

    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    rows = [encode_for_training(tokenizer, c, max_len) for c in train_conversations]
    rows = [r for r in rows if any(x != IGNORE_INDEX for x in r["labels"][1:])]
    if not rows:
        raise ValueError("no training conversation has assistant tokens within max_len")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    n_warm = warmup_steps if warmup_steps is not None else max(1, min(100, steps // 20))

    def lr_at(step: int) -> float:  # step is 0-based
        if step < n_warm:
            return lr * (step + 1) / n_warm
        progress = (step - n_warm) / max(1, steps - n_warm)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    pad_id = tokenizer.pad_token_id
    order: list[int] = []
    records: list[dict] = []
    model.train()
    t0 = time.perf_counter()
    tokens = 0
    run_loss, run_n = 0.0, 0
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(rows), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate([rows[i] for i in idx], pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"warm-up loss is {float(loss)} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int(batch["attention_mask"].sum())
        run_loss += float(loss.detach())
        run_n += 1
        if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - t0
            rec = {
                "step": step + 1,
                "loss": run_loss / run_n,
                "lr": lr_at(step),
                "grad_norm": float(gnorm),
                "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                "elapsed_s": elapsed,
            }
            records.append(rec)
            run_loss, run_n = 0.0, 0
            if log is not None:
                log(rec)
    model.eval()
    return records


def build_base(
    conversations: Sequence[Sequence[dict]],
    out_dir: str | Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    vocab_size: int = 1024,
    log_path: str | Path | None = None,
    max_len: int = 256,
    eval_prompts: Sequence[dict] | None = None,
    max_new_tokens: int = 24,
    threads: int | None = None,
    model_kwargs: dict | None = None,
    eval_every: int = 0,
    dtype: str | None = None,
) -> dict:
    """Train the tokenizer on ``conversations``, build and warm up the tiny model on them, save an
    HF checkpoint atomically.

    Returns metrics (parameters, final loss, wall time, and exact-match accuracy when
    ``eval_prompts`` rows are given); they are also written to ``out_dir/warmup.json``.
    ``model_kwargs`` overrides ``build_model`` dimensions (tests use smaller models).
    ``eval_every`` > 0 also measures exact-match every that many steps (``metrics["curve"]``).
    ``dtype`` (e.g. "bfloat16") is the dtype the weights are stored in (rounded once after the
    fp32 warm-up and evaluation); None stores float32.
    """
    import torch

    from qatforge.chat import hf_exact_match
    from qatforge.io import atomic_dir, package_versions, write_json
    from qatforge.model import save_tokenizer

    if threads:
        torch.set_num_threads(threads)
    convs = [list(c) for c in conversations]
    if not convs:
        raise ValueError("no warm-up conversations")
    t0 = time.perf_counter()
    # Contents plus the role names, so the ChatML headers tokenize compactly.
    tokenizer = build_tokenizer(
        (t for c in convs for m in c for t in (m["role"] + "\n", m["content"])), vocab_size=vocab_size
    )
    model = build_model(tokenizer, seed=seed, **(model_kwargs or {}))
    n_params = sum(p.numel() for p in model.parameters())

    curve: list[dict] = []
    eval_s = 0.0
    log_file = open(log_path, "w") if log_path else None
    try:
        if log_file:
            log_file.write("step,loss,lr,grad_norm,tokens_per_s,elapsed_s\n")

        def _log(rec: dict) -> None:
            nonlocal eval_s
            LOG.info("warm-up step %d loss %.4f lr %.2e grad_norm %.3f", rec["step"], rec["loss"], rec["lr"], rec["grad_norm"])
            if log_file:
                log_file.write(",".join(f"{rec[k]:.6g}" if isinstance(rec[k], float) else str(rec[k])
                                        for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s")) + "\n")
                log_file.flush()
            if eval_every and eval_prompts and rec["step"] % eval_every == 0 and rec["step"] < steps:
                te = time.perf_counter()
                acc, _, _ = hf_exact_match(model, tokenizer, eval_prompts, max_new_tokens)
                eval_s += time.perf_counter() - te
                curve.append({"step": rec["step"], "exact_match": acc})
                LOG.info("warm-up step %d exact-match %.3f", rec["step"], acc)

        records = warmup(model, tokenizer, convs, steps=steps, batch_size=batch_size, lr=lr,
                         seed=seed, max_len=max_len, log=_log,
                         log_every=math.gcd(25, eval_every) if eval_every else 25)
    finally:
        if log_file:
            log_file.close()
    train_s = time.perf_counter() - t0 - eval_s
    metrics: dict[str, Any] = {
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "max_len": max_len,
        "dtype": dtype or "float32",
        "final_loss": records[-1]["loss"],
        "train_seconds": round(train_s, 1),
        "versions": package_versions("torch", "transformers", "tokenizers"),
    }
    if eval_prompts:
        acc, _, _ = hf_exact_match(model, tokenizer, eval_prompts, max_new_tokens)
        metrics["exact_match"] = acc
        metrics["n_eval_prompts"] = len(eval_prompts)
        metrics["curve"] = curve + [{"step": steps, "exact_match": acc}]
    if dtype:
        model.to(getattr(torch, dtype))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only
        save_tokenizer(tokenizer, tmp)  # with the BOS rule as add_bos_token (false: no BOS)
        write_json(Path(tmp) / "warmup.json", {"metrics": metrics, "log": records})
    return metrics

"""Parity metrics against a run's reference outputs, and the pass/fail judgement (numpy only).

All functions take plain numpy arrays so that the GGUF and ONNX evaluation processes never need
torch. Logits are compared on identical token ids (never on re-tokenized text), and only at the
positions the model answers at (``answer_positions``): KLD, top-1 and NLL of every format, of the
reference and of the benchmark's QAT check use that one definition.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from qatforge.spec.formats import lookup

UPPER_BOUNDS = ("kld_mean", "kld_max", "max_abs_diff")
LOWER_BOUNDS = ("top1_agree", "gen_match", "accuracy")
# Checks that must hold for a pass; those in WAIVABLE can be turned off by a threshold set to false.
REQUIRED_CHECKS = ("token_parity", "bos_ok", "eos_ok", "no_double_bos", "chat_template_equal")
WAIVABLE = ("token_parity",)
# Top-1 agreement is counted where the reference has a top-1: a position whose two best tokens are
# within this log-probability margin (a 1 % probability ratio) is a tie, which any rounding may break
# either way (measured: a BF16 GGUF at KLD 3e-7 flipped the one position of 94 at margin 4e-4).
TIE_MARGIN = 0.01


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _check_pair(ref: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, test = np.asarray(ref), np.asarray(test)
    if ref.shape != test.shape:
        raise ValueError(f"logit shapes differ: reference {ref.shape} vs test {test.shape}")
    if ref.ndim != 2:
        raise ValueError(f"expected [tokens, vocab] logits, got shape {ref.shape}")
    if not np.isfinite(test).all():
        raise ValueError("test logits contain NaN or inf")
    return ref, test


def kld(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per-token KL(ref || test) from raw logits ``[tokens, vocab]`` (nats)."""
    ref, test = _check_pair(ref_logits, logits)
    lp, lq = log_softmax(ref), log_softmax(test)
    out = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return np.maximum(out, 0.0)  # rounding can give -1e-17


def answer_positions(mask: np.ndarray) -> np.ndarray:
    """The positions ``t`` that are scored: those whose next token ``t+1`` is an answer token.

    ``mask`` marks a sequence's answer tokens: every assistant turn's content and the end-of-turn
    token that closes it (``chat.encode_for_training``'s labels). Logits at ``t`` predict token
    ``t+1``, so system/user turns, role headers and the last position are never scored.
    """
    return np.flatnonzero(np.asarray(mask, dtype=bool)[1:])


def compare_answers(
    refs: Sequence[np.ndarray], tests: Sequence[np.ndarray], ids: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> dict[str, Any]:
    """Test vs reference logits ``[tokens, vocab]`` at the ``answer_positions`` of each sequence.

    Pooled over the positions of all sequences: ``kld_mean``/``kld_max`` of KL(ref || test),
    ``top1_agree`` (share with the same argmax, over the ``top1_positions`` where the reference's
    two best tokens are more than ``TIE_MARGIN`` apart; ``top1_ties`` are not counted),
    ``max_abs_diff`` and the test's ``nll`` (mean
    -log p of the next token); ``per_seq_nll_sum``/``per_seq_kld_sum``/``per_seq_tokens`` per
    sequence (for bootstrap intervals over conversations).
    """
    if not len(refs) == len(tests) == len(ids) == len(masks):
        raise ValueError(f"{len(refs)} reference, {len(tests)} test, {len(ids)} id and {len(masks)} mask sequences")
    klds, agree, ties, diffs, sums, counts = [], [], [], [], [], []
    for ref, test, i, m in zip(refs, tests, ids, masks):
        ref, test = _check_pair(ref, test)
        total, n = nll_terms(test, i, m)
        pos = answer_positions(m)
        r, t = ref[pos].astype(np.float64), test[pos].astype(np.float64)
        klds.append(kld(r, t))
        best2 = np.sort(log_softmax(r), axis=-1)[:, -2:] if r.shape[-1] > 1 else np.zeros((len(r), 2))
        tie = best2[:, 1] - best2[:, 0] < TIE_MARGIN
        agree.append((r.argmax(-1) == t.argmax(-1))[~tie])
        ties.append(int(tie.sum()))
        diffs.append(np.abs(r - t).max(-1))
        sums.append(total)
        counts.append(n)
    if not sum(counts):
        raise ValueError("no answer positions to compare")
    k, a = np.concatenate(klds), np.concatenate(agree)
    return {
        "kld_mean": float(k.mean()),
        "kld_max": float(k.max()),
        "top1_agree": float(a.mean()) if a.size else 1.0,
        "top1_positions": int(a.size),
        "top1_ties": sum(ties),
        "max_abs_diff": float(np.concatenate(diffs).max()),
        "nll": sum(sums) / sum(counts),
        "per_seq_nll_sum": sums,
        "per_seq_kld_sum": [float(x.sum()) for x in klds],
        "per_seq_tokens": counts,
    }


def token_parity(ref_ids: Sequence[Sequence[int]], ids: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Whether every prompt tokenizes to the reference ids; the share and first mismatches."""
    if len(ref_ids) != len(ids):
        raise ValueError(f"{len(ref_ids)} reference prompts vs {len(ids)} tokenized prompts")
    same = [list(map(int, a)) == list(map(int, b)) for a, b in zip(ref_ids, ids)]
    bad = [i for i, s in enumerate(same) if not s]
    return {
        "token_parity": not bad,
        "token_parity_frac": float(np.mean(same)) if same else 1.0,
        "token_mismatch_prompts": bad[:10],
    }


def gen_match(ref_gen_ids: Sequence[Sequence[int]], gen_ids: Sequence[Sequence[int]]) -> float:
    """Fraction of greedy generations whose token ids are identical to the reference."""
    if len(ref_gen_ids) != len(gen_ids):
        raise ValueError(f"{len(ref_gen_ids)} reference generations vs {len(gen_ids)} generations")
    if not ref_gen_ids:
        raise ValueError("no generations to compare")
    same = [list(map(int, a)) == list(map(int, b)) for a, b in zip(ref_gen_ids, gen_ids)]
    return float(np.mean(same))


def nll_terms(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Summed NLL of ``ids[t+1]`` under ``logits[t]`` over ``answer_positions(mask)``, and their count."""
    logits, ids, mask = np.asarray(logits), np.asarray(ids), np.asarray(mask, dtype=bool)
    if logits.shape[0] != ids.shape[0] or ids.shape != mask.shape:
        raise ValueError(f"shape mismatch: logits {logits.shape}, ids {ids.shape}, mask {mask.shape}")
    pos = answer_positions(mask)
    if not len(pos):
        return 0.0, 0
    lp = log_softmax(logits[pos])
    return float(-lp[np.arange(len(pos)), ids[pos + 1]].sum()), len(pos)


def mean_nll(
    logits: Sequence[np.ndarray], ids: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> float:
    """Token-weighted mean NLL over several sequences (same convention as ``chat.hf_nll``)."""
    total, count = 0.0, 0
    for lg, i, m in zip(logits, ids, masks, strict=True):
        t, n = nll_terms(lg, i, m)
        total, count = total + t, count + n
    if count == 0:
        raise ValueError("no assistant tokens to score")
    return total / count


def thresholds_for(
    format: str, variant: str, table: Mapping[str, Any] | None = None
) -> dict[str, float | bool]:
    """Thresholds of ``format``/``variant``: the format's defaults (``formats.Format.thresholds``)
    with ``table`` merged over them; an unknown format is a ValueError naming it.

    Entries merge per variant (case-insensitive names); a variant absent from both uses the
    merged ``default`` entry. Keys: the bounds, and the booleans of ``WAIVABLE``.
    """
    merged: dict[str, dict[str, float]] = {k.lower(): dict(v) for k, v in lookup(format).thresholds.items()}
    for k, v in ((table or {}).get(format) or {}).items():
        if v is not None and not isinstance(v, Mapping):
            raise TypeError(f"thresholds for {format}/{k} must be a mapping, got {type(v).__name__}")
        merged[str(k).lower()] = {**merged.get(str(k).lower(), {}), **dict(v or {})}
    out = dict(merged.get(str(variant).lower(), merged.get("default", {})))
    unknown = set(out) - set(UPPER_BOUNDS) - set(LOWER_BOUNDS) - set(WAIVABLE)
    if unknown:
        raise KeyError(f"unknown threshold keys for {format}/{variant}: {sorted(unknown)}")
    for key in WAIVABLE:
        if key in out and not isinstance(out[key], bool):
            raise TypeError(f"threshold {format}/{variant}.{key} must be true or false, got {out[key]!r}")
    return out


def judge(metrics: Mapping[str, Any], thresholds: Mapping[str, float | bool]) -> tuple[bool, list[str]]:
    """Compare metrics with thresholds; the required checks must hold unless a threshold waives
    them (``token_parity: false``). Returns (pass, failures)."""
    failures: list[str] = []
    for key in REQUIRED_CHECKS:
        waived = key in WAIVABLE and thresholds.get(key) is False
        if not waived and key in metrics and metrics[key] is not None and not metrics[key]:
            failures.append(f"{key} is false")
    for key, bound in thresholds.items():
        if key in WAIVABLE:
            continue
        value = metrics.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            failures.append(f"{key} missing")
        elif key in UPPER_BOUNDS and value > bound:
            failures.append(f"{key} {value:.4g} > {bound:.4g}")
        elif key in LOWER_BOUNDS and value < bound:
            failures.append(f"{key} {value:.4g} < {bound:.4g}")
    return not failures, failures

"""Parity metrics against a run's reference outputs, and the pass/fail judgement (numpy only).

All functions take plain numpy arrays so that the GGUF and ONNX evaluation processes never need
torch. Logits are compared on identical token ids (never on re-tokenized text), and only at the
positions the model answers at (``answer_positions``): KLD, top-1 and NLL of every format, of the
reference and of the benchmark's QAT check use that one definition.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from qatforge.answer_dists import AnswerDists, compress
from qatforge.answer_dists import kld as dists_kld
from qatforge.answer_dists import log_softmax, logsumexp, max_abs_diff, top1
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
CHUNK_ROWS = 64  # answer positions compared at once (bounds float64 copies of the vocabulary)


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


def exact_dists(logits: np.ndarray, mask: np.ndarray) -> AnswerDists:
    """A full-logits reference ``[tokens, vocab]`` at its ``answer_positions``, kept whole (exact)."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"expected [tokens, vocab] logits, got shape {logits.shape}")
    return compress(logits[answer_positions(mask)], top_k=logits.shape[-1], n_samples=0)


def compare_answers(
    refs: Sequence[AnswerDists | np.ndarray],
    tests: Iterable[np.ndarray],
    ids: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    baseline: Sequence[AnswerDists] | None = None,
) -> dict[str, Any]:
    """Test logits ``[tokens, vocab]`` against the reference at the ``answer_positions`` of each sequence.

    ``refs`` holds per sequence the reference's ``AnswerDists`` at those positions (a
    ``reference.Reference``'s), or full logits (made exact ``AnswerDists`` here). ``tests`` may be a
    generator: each sequence's logits are reduced to its answer positions and dropped, so memory
    holds one sequence at a time.

    Pooled over the positions of all sequences: ``kld_mean``/``kld_max`` of KL(ref || test),
    ``top1_agree`` (share with the same argmax, over the ``top1_positions`` where the reference's
    two best tokens are more than ``TIE_MARGIN`` apart; ``top1_ties`` are not counted),
    ``max_abs_diff`` (raw logits, over the reference's head tokens) and the test's ``nll`` (mean
    -log p of the next token); ``per_seq_nll_sum``/``per_seq_kld_sum``/``per_seq_tokens`` per
    sequence (for bootstrap intervals over conversations). With ``baseline`` (another reference on
    the same sequences) the same test logits also give ``vs_baseline`` metrics, in one pass.
    """
    if not len(refs) == len(ids) == len(masks) or (baseline is not None and len(baseline) != len(refs)):
        raise ValueError(f"{len(refs)} reference, {len(ids)} id, {len(masks)} mask and "
                         f"{len(baseline) if baseline is not None else '-'} baseline sequences")
    main, vs = _Pool(), _Pool()
    j = -1
    for test in tests:  # not enumerate(): its reused result tuple would keep the previous logits alive
        j += 1
        if j >= len(refs):
            raise ValueError(f"more test sequences than the {len(refs)} reference sequences")
        test, i, m = np.asarray(test), np.asarray(ids[j]), np.asarray(masks[j], dtype=bool)
        if test.ndim != 2 or test.shape[0] != len(i):
            raise ValueError(f"sequence {j}: test logits of shape {test.shape} for {len(i)} tokens")
        if not np.isfinite(test).all():
            raise ValueError("test logits contain NaN or inf")
        ref = refs[j] if isinstance(refs[j], AnswerDists) else exact_dists(_same_shape(refs[j], test), m)
        total, n = nll_terms(test, i, m)
        t = test[answer_positions(m)]
        main.add(ref, t, total, n)
        if baseline is not None:
            vs.add(baseline[j], t, total, n)
        del test, t
    if j + 1 != len(refs):
        raise ValueError(f"{len(refs)} reference sequences but {j + 1} test sequences")
    out = main.metrics()
    if baseline is not None:
        out["vs_baseline"] = vs.metrics()
    return out


def _same_shape(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    ref = np.asarray(ref)
    if ref.shape != test.shape:
        raise ValueError(f"logit shapes differ: reference {ref.shape} vs test {test.shape}")
    return ref


class _Pool:
    """Per-sequence answer-position terms, pooled."""

    def __init__(self) -> None:
        self.klds: list[np.ndarray] = []
        self.agree: list[np.ndarray] = []
        self.ties = 0
        self.diff = 0.0
        self.sums: list[float] = []
        self.counts: list[int] = []

    def add(self, ref: AnswerDists, test: np.ndarray, nll_sum: float, n: int) -> None:
        if len(ref) != test.shape[0]:
            raise ValueError(f"{len(ref)} reference answer positions vs {test.shape[0]} test positions")
        klds = []
        for a in range(0, len(ref), CHUNK_ROWS):  # float64 temporaries of CHUNK_ROWS x vocab at most
            r, t = ref.rows(a, a + CHUNK_ROWS), test[a : a + CHUNK_ROWS]
            klds.append(dists_kld(r, t))
            best, tie = top1(r, TIE_MARGIN)
            self.agree.append((best == t.argmax(-1))[~tie])
            self.ties += int(tie.sum())
            self.diff = max(self.diff, float(max_abs_diff(r, t).max()))
        self.klds.append(np.concatenate(klds) if klds else np.zeros(0))
        self.sums.append(nll_sum)
        self.counts.append(n)

    def metrics(self) -> dict[str, Any]:
        if not sum(self.counts):
            raise ValueError("no answer positions to compare")
        k, a = np.concatenate(self.klds), np.concatenate(self.agree)
        return {
            "kld_mean": float(k.mean()),
            "kld_max": float(k.max()),
            "top1_agree": float(a.mean()) if a.size else 1.0,
            "top1_positions": int(a.size),
            "top1_ties": self.ties,
            "max_abs_diff": self.diff,
            "nll": sum(self.sums) / sum(self.counts),
            "per_seq_nll_sum": self.sums,
            "per_seq_kld_sum": [float(x.sum()) for x in self.klds],
            "per_seq_tokens": self.counts,
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
    total = 0.0
    for a in range(0, len(pos), CHUNK_ROWS):
        p = pos[a : a + CHUNK_ROWS]
        x = logits[p].astype(np.float64)
        total += float((logsumexp(x) - x[np.arange(len(p)), ids[p + 1]]).sum())
    return total, len(pos)


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

"""Paired bootstrap statistics: losses against a reference with 95 % intervals, PTQ vs QAT recovery."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

BOOTSTRAP = 2000


def bootstrap_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.nanpercentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def _resample_idx(n: int, b: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def _accuracy_loss(x0: np.ndarray, x: np.ndarray, idx: np.ndarray) -> tuple[float, np.ndarray]:
    """Accuracy lost by per-prompt results ``x`` against ``x0``, and on each resample of ``idx``."""
    return float(x0.mean() - x.mean()), x0[idx].mean(1) - x[idx].mean(1)


def _nll_loss(cnt: np.ndarray, s0: np.ndarray, s: np.ndarray, idx: np.ndarray) -> tuple[float, np.ndarray]:
    """Token-weighted NLL added by per-conversation sums ``s`` over ``s0``, and on each resample."""
    return float((s.sum() - s0.sum()) / cnt.sum()), (s[idx].sum(1) - s0[idx].sum(1)) / cnt[idx].sum(1)


def paired_accuracy_losses(
    base: Sequence[bool], ptq: Sequence[bool], qat: Sequence[bool], *, b: int = BOOTSTRAP, seed: int = 0
) -> dict[str, Any]:
    """Accuracy lost by PTQ and by QAT relative to the baseline, paired bootstrap over prompts."""
    x0, xp, xq = (np.asarray(v, dtype=float) for v in (base, ptq, qat))
    if not (len(x0) == len(xp) == len(xq)) or len(x0) == 0:
        raise ValueError(f"per-prompt results differ in length: {len(x0)}, {len(xp)}, {len(xq)}")
    idx = _resample_idx(len(x0), b, seed)
    (ptq_l, ptq_b), (qat_l, qat_b) = _accuracy_loss(x0, xp, idx), _accuracy_loss(x0, xq, idx)
    return _losses(ptq_l, qat_l, ptq_b, qat_b, len(x0))


def paired_nll_losses(
    base: Mapping[str, Sequence[float]], ptq: Mapping[str, Sequence[float]], qat: Mapping[str, Sequence[float]],
    *, b: int = BOOTSTRAP, seed: int = 0,
) -> dict[str, Any]:
    """NLL added by PTQ and by QAT (token-weighted), paired bootstrap over test conversations."""
    cnt = np.asarray(base["per_seq_tokens"], dtype=float)
    s0, sp, sq = (np.asarray(r["per_seq_nll_sum"], dtype=float) for r in (base, ptq, qat))
    if not (len(s0) == len(sp) == len(sq) == len(cnt)) or len(cnt) == 0:
        raise ValueError("per-conversation NLL lists differ in length")
    idx = _resample_idx(len(cnt), b, seed)
    (ptq_l, ptq_b), (qat_l, qat_b) = _nll_loss(cnt, s0, sp, idx), _nll_loss(cnt, s0, sq, idx)
    return _losses(ptq_l, qat_l, ptq_b, qat_b, len(cnt))


def paired_loss(ref: Mapping, row: Mapping, measure: str, *, b: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any] | None:
    """Loss of evaluation ``row`` against ``ref`` on the same test items, with its paired bootstrap
    95 % interval: ``"accuracy"`` ref − row over prompts, ``"nll"`` row − ref (nats/token) over
    conversations. None when either lacks the per-item results or they do not pair up."""
    if measure == "accuracy":
        x0, x = (np.asarray(r.get("per_prompt_correct") or [], dtype=float) for r in (ref, row))
        if not len(x0) or len(x) != len(x0):
            return None
        n = len(x0)
        loss, boot = _accuracy_loss(x0, x, _resample_idx(n, b, seed))
    elif measure == "nll":
        cnt = np.asarray(ref.get("per_seq_tokens") or [], dtype=float)
        s0, s = (np.asarray(r.get("per_seq_nll_sum") or [], dtype=float) for r in (ref, row))
        same_items = list(row.get("per_seq_tokens") or []) == list(ref.get("per_seq_tokens") or [])
        if not cnt.sum() or not same_items or not len(s0) == len(s) == len(cnt):
            return None
        n = len(cnt)
        loss, boot = _nll_loss(cnt, s0, s, _resample_idx(n, b, seed))
    else:
        raise ValueError(f"unknown measure {measure!r} (accuracy or nll)")
    return {"loss": loss, "ci": bootstrap_ci(boot), "n": n}


def _losses(ptq: float, qat: float, ptq_b: np.ndarray, qat_b: np.ndarray, n: int) -> dict[str, Any]:
    ptq_ci = bootstrap_ci(ptq_b)
    # The PTQ loss is "within noise" when its 95 % CI reaches zero (or it is not a loss at all).
    meaningful = ptq > 0 and ptq_ci[0] > 0
    out = {"n": n, "ptq_loss": float(ptq), "ptq_loss_ci": ptq_ci, "qat_loss": float(qat),
           "qat_loss_ci": bootstrap_ci(qat_b), "gain": float(ptq - qat), "gain_ci": bootstrap_ci(ptq_b - qat_b),
           "meaningful": bool(meaningful), "recovered": None, "recovered_ci": None}
    if meaningful:
        ok = ptq_b > 0
        out["recovered"] = float((ptq - qat) / ptq)
        out["recovered_ci"] = bootstrap_ci((ptq_b[ok] - qat_b[ok]) / ptq_b[ok])
    return out


def paired_kld_losses(ptq: Mapping, qat: Mapping, *, b: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any] | None:
    """KLD to the baseline merged model of a PTQ artifact (its own ``per_seq_kld_sum``: its run is
    the baseline) and of a QAT artifact (``vs_baseline_per_seq_kld_sum``), paired over conversations."""
    cnt = np.asarray(ptq.get("per_seq_tokens") or [], dtype=float)
    sp = np.asarray(ptq.get("per_seq_kld_sum") or [], dtype=float)
    sq = np.asarray(qat.get("vs_baseline_per_seq_kld_sum") or [], dtype=float)
    if not cnt.sum() or not len(sp) == len(sq) == len(cnt) or list(qat.get("per_seq_tokens") or []) != list(cnt):
        return None
    zero = np.zeros_like(cnt)
    idx = _resample_idx(len(cnt), b, seed)
    (ptq_l, ptq_b), (qat_l, qat_b) = _nll_loss(cnt, zero, sp, idx), _nll_loss(cnt, zero, sq, idx)
    return _losses(ptq_l, qat_l, ptq_b, qat_b, len(cnt))

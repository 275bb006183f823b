"""Paired bootstrap statistics: losses against a reference with 95 % intervals, PTQ vs QAT recovery,
the difference of two QAT runs' recoveries."""

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


def _kld_sums(r: Mapping) -> np.ndarray:
    """Per-conversation KLD sums to the baseline merged model: a QAT row's ``vs_baseline_*``, else the
    row's own (its run is the baseline)."""
    return np.asarray(r.get("vs_baseline_per_seq_kld_sum") or r.get("per_seq_kld_sum") or [], dtype=float)


def loss_samples(measure: str, ref: Mapping, rows: Sequence[Mapping], *, b: int = BOOTSTRAP,
                 seed: int = 0) -> tuple[int, list[tuple[float, np.ndarray]]] | None:
    """Each row's loss against ``ref`` on the same test items, and on each of ``b`` resamples shared
    by all rows: ``"accuracy"`` ref − row over prompts, ``"nll"`` row − ref (nats/token) over
    conversations, ``"kld"`` the row's KLD to the baseline merged model (``ref`` gives the token
    counts). Returns (items, [(loss, resampled losses), ...]); None when the per-item results are
    missing or do not pair up."""
    if measure == "accuracy":
        x0 = np.asarray(ref.get("per_prompt_correct") or [], dtype=float)
        xs = [np.asarray(r.get("per_prompt_correct") or [], dtype=float) for r in rows]
        if not len(x0) or any(len(x) != len(x0) for x in xs):
            return None
        idx = _resample_idx(len(x0), b, seed)
        return len(x0), [_accuracy_loss(x0, x, idx) for x in xs]
    if measure not in ("nll", "kld"):
        raise ValueError(f"unknown measure {measure!r} (accuracy, nll or kld)")
    cnt = np.asarray(ref.get("per_seq_tokens") or [], dtype=float)
    if not cnt.sum() or any(list(r.get("per_seq_tokens") or []) != list(cnt) for r in rows):
        return None
    if measure == "nll":
        s0 = np.asarray(ref.get("per_seq_nll_sum") or [], dtype=float)
        ss = [np.asarray(r.get("per_seq_nll_sum") or [], dtype=float) for r in rows]
    else:
        s0, ss = np.zeros_like(cnt), [_kld_sums(r) for r in rows]
    if len(s0) != len(cnt) or any(len(s) != len(cnt) for s in ss):
        return None
    idx = _resample_idx(len(cnt), b, seed)
    return len(cnt), [_nll_loss(cnt, s0, s, idx) for s in ss]


def paired_loss(ref: Mapping, row: Mapping, measure: str, *, b: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any] | None:
    """Loss of evaluation ``row`` against ``ref`` (accuracy or nll, :func:`loss_samples`) with its
    paired bootstrap 95 % interval; None when the per-item results do not pair up."""
    if measure not in ("accuracy", "nll"):
        raise ValueError(f"unknown measure {measure!r} (accuracy or nll)")
    got = loss_samples(measure, ref, (row,), b=b, seed=seed)
    if got is None:
        return None
    n, [(loss, boot)] = got
    return {"loss": loss, "ci": bootstrap_ci(boot), "n": n}


def _meaningful(loss: float, boot: np.ndarray) -> bool:
    """A PTQ loss is "within noise" when its 95 % CI reaches zero (or it is not a loss at all)."""
    return loss > 0 and bootstrap_ci(boot)[0] > 0


def paired_losses(measure: str, base: Mapping, ptq: Mapping, qat: Mapping, *, b: int = BOOTSTRAP,
                  seed: int = 0) -> dict[str, Any] | None:
    """A PTQ and a QAT artifact's losses against the baseline merged model ``base`` in ``measure``,
    the QAT − PTQ gain and the recovered share (PTQ loss − QAT loss) / PTQ loss, each with its paired
    bootstrap 95 % interval (one set of resamples); recovery None when the PTQ loss is within noise."""
    got = loss_samples(measure, base, (ptq, qat), b=b, seed=seed)
    if got is None:
        return None
    n, [(ptq_l, ptq_b), (qat_l, qat_b)] = got
    meaningful = _meaningful(ptq_l, ptq_b)
    out = {"n": n, "ptq_loss": float(ptq_l), "ptq_loss_ci": bootstrap_ci(ptq_b), "qat_loss": float(qat_l),
           "qat_loss_ci": bootstrap_ci(qat_b), "gain": float(ptq_l - qat_l), "gain_ci": bootstrap_ci(ptq_b - qat_b),
           "meaningful": meaningful, "recovered": None, "recovered_ci": None}
    if meaningful:
        ok = ptq_b > 0
        out["recovered"] = float((ptq_l - qat_l) / ptq_l)
        out["recovered_ci"] = bootstrap_ci((ptq_b[ok] - qat_b[ok]) / ptq_b[ok])
    return out


def recovery_difference(measure: str, base: Mapping, ptq: Mapping, qat_a: Mapping, qat_b: Mapping, *,
                        b: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any] | None:
    """Recovery of ``qat_a`` minus recovery of ``qat_b`` against the same PTQ artifact, = (loss_b −
    loss_a) / PTQ loss, with its paired bootstrap 95 % interval (one set of resamples for all three).
    None when the per-item results do not pair up or the PTQ loss is within noise."""
    got = loss_samples(measure, base, (ptq, qat_a, qat_b), b=b, seed=seed)
    if got is None:
        return None
    n, [(p, p_b), (qa, qa_b), (qb, qb_b)] = got
    if not _meaningful(p, p_b):
        return None
    ok = p_b > 0
    return {"difference": float((qb - qa) / p), "ci": bootstrap_ci((qb_b[ok] - qa_b[ok]) / p_b[ok]), "n": n}

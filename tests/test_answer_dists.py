"""The compact reference distributions: exact where they cover the vocabulary, KLD within 1 % of the
exact float64 value where they do not, bytes per position independent of the vocabulary."""

import gc
import weakref

import numpy as np
import pytest

from qatforge import answer_dists, parity

QWEN_VOCAB = 151936


def _lm_like(rng, n: int, vocab: int, sharpness: float) -> np.ndarray:
    """Logits with a Zipf-shaped ranking (sharpness 0: a random-init model's near-uniform output)."""
    zipf = -1.1 * np.log(np.arange(1, vocab + 1))
    return np.stack([rng.permutation(zipf) * sharpness + rng.normal(0, 1, vocab) for _ in range(n)]).astype(np.float32)


@pytest.mark.parametrize("sharpness,noise", [(1.5, 0.3), (1.0, 0.3), (1.0, 0.05), (0.0, 0.3)])
def test_kld_within_one_percent_of_exact_at_qwen_vocabulary(sharpness, noise):
    """At Qwen's vocabulary, from a peaked distribution to a flat one (tail mass 1 % to 93 %), over 200 positions: the
    head + bucket + sampled-tail KLD agrees with the full-vocabulary float64 KLD within 1 %."""
    rng = np.random.default_rng(1)
    ref = _lm_like(rng, 200, QWEN_VOCAB, sharpness)
    test = (ref + rng.normal(0, noise, ref.shape)).astype(np.float32)
    d = answer_dists.compress(ref, top_k=512, n_samples=256, seed=0)
    exact = parity.kld(ref, test)
    got = answer_dists.kld(d, test)
    assert got.mean() == pytest.approx(exact.mean(), rel=0.01)
    # the head and the bucket alone miss the within-tail divergence: the samples carry real weight
    no_samples = answer_dists.kld(answer_dists.compress(ref, top_k=512, n_samples=0), test)
    tail = float(np.exp(d.tail_logp).mean())
    assert 0.005 < tail < 1
    assert no_samples.mean() < exact.mean() * (1 - tail / 3)


def test_kld_within_one_percent_on_a_model_and_its_noisy_copy(tmp_path):
    """Real logits: a tiny Qwen3 and a copy with noisy weights, top-k well below the vocabulary."""
    import torch

    from export_helpers import reverse_task_checkpoint

    t = reverse_task_checkpoint(tmp_path, n_conv=8, perturbed=True)
    from transformers import AutoModelForCausalLM

    noisy = AutoModelForCausalLM.from_pretrained(t["perturbed"])
    ids = torch.tensor([list(range(3, 200))])
    with torch.no_grad():
        ref = t["model"](input_ids=ids).logits[0].float().numpy()
        test = noisy(input_ids=ids).logits[0].float().numpy()
    vocab = ref.shape[-1]
    d = answer_dists.compress(ref, top_k=16, n_samples=32, seed=3)
    assert d.head_ids.shape[1] == 16 < vocab and float(np.exp(d.tail_logp).mean()) > 0.05
    assert answer_dists.kld(d, test).mean() == pytest.approx(parity.kld(ref, test).mean(), rel=0.01)


def test_whole_vocabulary_head_is_exact_and_keeps_top1_and_raw_logits():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (40, 50)).astype(np.float32)
    test = (ref + rng.normal(0, 0.5, ref.shape)).astype(np.float32)
    d = answer_dists.compress(ref, top_k=30, n_samples=20)  # 50 tokens fit 30 + 20: kept whole
    assert d.head_ids.shape == (40, 50) and d.sample_ids.shape == (40, 0) and np.isneginf(d.tail_logp).all()
    np.testing.assert_allclose(answer_dists.kld(d, test), parity.kld(ref, test), rtol=1e-5, atol=1e-9)  # float32 log-probs
    best, tie = answer_dists.top1(d, parity.TIE_MARGIN)
    np.testing.assert_array_equal(best, ref.argmax(-1))
    np.testing.assert_allclose(answer_dists.max_abs_diff(d, test), np.abs(ref - test).max(-1), rtol=1e-5)


def test_bytes_per_position_do_not_grow_with_the_vocabulary():
    """8 bytes per head and tail entry, 16 per position: the target shape (151,936 tokens, 200
    conversations x 300 answer positions) stays under 1 GB whatever the conversation length."""
    rng = np.random.default_rng(0)
    sizes = {v: answer_dists.compress(_lm_like(rng, 4, v, 1.0), top_k=512, n_samples=256).nbytes / 4
             for v in (4096, QWEN_VOCAB)}
    assert sizes[4096] == sizes[QWEN_VOCAB] == 8 * (512 + 256) + 16
    assert 200 * 300 * sizes[QWEN_VOCAB] < 1e9


def test_compare_answers_holds_one_test_sequence_at_a_time():
    """A generator of test logits is consumed lazily, and each sequence's logits are released
    before the next is asked for: evaluation memory does not grow with the number of sequences."""
    rng = np.random.default_rng(0)
    n_seq, length, vocab = 5, 12, 30
    ids = [rng.integers(0, vocab, length) for _ in range(n_seq)]
    masks = [np.r_[np.zeros(4, bool), np.ones(length - 4, bool)] for _ in range(n_seq)]
    full = [rng.normal(0, 2, (length, vocab)).astype(np.float32) for _ in range(n_seq)]
    refs = [answer_dists.compress(f[parity.answer_positions(m)], 8, 16, seed=i) for i, (f, m) in enumerate(zip(full, masks))]
    alive: list[weakref.ref] = []

    def tests():
        for f in full:
            gc.collect()
            assert all(r() is None for r in alive), "a previous sequence's logits are still referenced"
            arr = (f + 0.1).copy()
            alive.append(weakref.ref(arr))
            yield arr
            del arr

    m = parity.compare_answers(refs, tests(), ids, masks)
    assert len(alive) == n_seq and m["per_seq_tokens"] == [length - 4] * n_seq
    # the same numbers as against an exact reference, but for the tail estimate
    exact = parity.compare_answers(full, [f + 0.1 for f in full], ids, masks)
    assert m["nll"] == pytest.approx(exact["nll"], rel=1e-12)
    assert m["top1_agree"] == exact["top1_agree"]


def test_compare_answers_counts_sequences():
    ids, mask = np.array([0, 1, 2]), np.array([False, True, True])
    ref = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="1 reference sequences but 0 test"):
        parity.compare_answers([ref], iter([]), [ids], [mask])
    with pytest.raises(ValueError, match="more test sequences"):
        parity.compare_answers([ref], [ref, ref], [ids], [mask])

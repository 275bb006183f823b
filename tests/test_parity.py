"""Parity math on hand-made arrays: KL divergence, top-1 agreement, NLL, thresholds, judgement."""

import math

import numpy as np
import pytest

from qatforge import parity
from qatforge.spec.formats import lookup


def test_kld_zero_for_identical_and_shift_invariant():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5, 7)).astype(np.float32)
    assert np.allclose(parity.kld(ref, ref), 0.0, atol=1e-12)
    # softmax is invariant to a per-row constant: KL must be too
    assert np.allclose(parity.kld(ref, ref + np.arange(5)[:, None]), 0.0, atol=1e-9)


def test_kld_matches_hand_computation():
    ref = np.array([[0.0, 0.0]])  # p = (0.5, 0.5)
    test = np.log(np.array([[0.9, 0.1]]))  # q = (0.9, 0.1)
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert parity.kld(ref, test)[0] == pytest.approx(want, rel=1e-12)
    # KL is not symmetric: KL(q || p) differs
    back = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert parity.kld(test, ref)[0] == pytest.approx(back, rel=1e-12)


def test_answer_positions_are_those_before_answer_tokens():
    # tokens: user, header, answer, answer, <|im_end|>, header, answer, <|im_end|>
    mask = np.array([False, False, True, True, True, False, True, True])
    assert parity.answer_positions(mask).tolist() == [1, 2, 3, 5, 6]
    assert parity.answer_positions(np.zeros(3, dtype=bool)).tolist() == []


def test_compare_answers_scores_only_answer_positions():
    """KLD, top-1, max |diff| and NLL by hand; the other positions differ wildly and must not count."""
    wild = [100.0, -100.0, 0.0]
    ids1, mask1 = np.array([2, 0, 1]), np.array([False, True, True])  # positions 0, 1
    ref1 = np.zeros((3, 3))  # p uniform
    test1 = np.array([[0.0, 0.0, 0.0], [0.0, math.log(2), 0.0], wild])  # q = (1/4, 1/2, 1/4) at 1
    ids2, mask2 = np.array([0, 1, 1, 2]), np.array([False, False, True, False])  # position 1
    ref2 = np.zeros((4, 3))
    test2 = np.array([wild, [0.0, 0.0, 0.0], wild, wild])
    m = parity.compare_answers([ref1, ref2], [test1, test2], [ids1, ids2], [mask1, mask2])
    k = math.log(32 / 27) / 3  # KL(uniform || (1/4, 1/2, 1/4))
    assert m["kld_mean"] == pytest.approx(k / 3, rel=1e-12) and m["kld_max"] == pytest.approx(k, rel=1e-12)
    # a uniform reference has no top-1: its three positions are ties, none is counted
    assert (m["top1_positions"], m["top1_ties"], m["top1_agree"]) == (0, 3, 1.0)
    assert m["max_abs_diff"] == pytest.approx(math.log(2))
    # test's -log p of ids1[1]=0, ids1[2]=1 and ids2[2]=1
    assert m["per_seq_nll_sum"] == pytest.approx([math.log(3) + math.log(2), math.log(3)])
    assert m["per_seq_tokens"] == [2, 1]
    assert m["nll"] == pytest.approx((2 * math.log(3) + math.log(2)) / 3, rel=1e-12)
    assert m["nll"] == pytest.approx(parity.mean_nll([test1, test2], [ids1, ids2], [mask1, mask2]), rel=1e-12)
    with pytest.raises(ValueError, match="2 reference sequences but 1 test"):
        parity.compare_answers([ref1, ref2], [test1], [ids1, ids2], [mask1, mask2])
    with pytest.raises(ValueError, match="no answer positions"):
        parity.compare_answers([ref1], [test1], [ids1], [np.zeros(3, dtype=bool)])


def test_top1_agreement_counts_only_positions_where_the_reference_has_a_top1():
    """A flip where the reference's two best tokens are within TIE_MARGIN is rounding breaking a tie,
    not a disagreement; a flip at a decisive position counts."""
    tie = parity.TIE_MARGIN / 2
    ref = np.array([[0.0, 0.0, -5.0], [tie, 0.0, -5.0], [2.0, 0.0, -5.0], [2.0, 0.0, -5.0], [0.0, 0.0, 0.0]])
    test = np.array([[0.0, 0.0, -5.0], [0.0, tie, -5.0], [2.0, 0.0, -5.0], [0.0, 2.0, -5.0], [0.0, 0.0, 0.0]])
    ids, mask = np.zeros(5, dtype=int), np.array([False, True, True, True, True])  # positions 0..3 scored
    m = parity.compare_answers([ref], [test], [ids], [mask])
    assert (m["top1_positions"], m["top1_ties"]) == (2, 2)  # positions 0 and 1 are ties
    assert m["top1_agree"] == pytest.approx(1 / 2)  # position 3 flips a decisive top-1
    just_over = ref.copy()
    just_over[1, 0] = 2 * parity.TIE_MARGIN
    m = parity.compare_answers([just_over], [test], [ids], [mask])
    assert (m["top1_positions"], m["top1_agree"]) == (3, pytest.approx(1 / 3))


def test_shape_and_nan_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        parity.kld(np.zeros((2, 3)), np.zeros((2, 4)))
    bad = np.zeros((2, 3))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        parity.kld(np.zeros((2, 3)), bad)


def test_nll_terms_use_shifted_mask():
    # vocab 4, uniform predictions except position 1 which puts all mass on token 3
    logits = np.zeros((4, 4))
    logits[1] = [-50.0, -50.0, -50.0, 50.0]
    ids = np.array([0, 1, 3, 2])
    mask = np.array([False, False, True, True])  # score ids[2] (from logits[1]) and ids[3] (from logits[2])
    total, n = parity.nll_terms(logits, ids, mask)
    assert n == 2
    assert total == pytest.approx(0.0 + math.log(4), abs=1e-9)
    # token-weighted pooling over sequences
    pooled = parity.mean_nll([logits, np.zeros((2, 4))], [ids, np.array([1, 2])], [mask, np.array([False, True])])
    assert pooled == pytest.approx(2 * math.log(4) / 3, abs=1e-9)
    assert parity.nll_terms(logits, ids, np.zeros(4, dtype=bool)) == (0.0, 0)
    with pytest.raises(ValueError, match="no assistant tokens"):
        parity.mean_nll([logits], [ids], [np.zeros(4, dtype=bool)])


def test_token_parity_and_gen_match():
    tp = parity.token_parity([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]])
    assert tp["token_parity"] is False and tp["token_parity_frac"] == 0.5 and tp["token_mismatch_prompts"] == [1]
    assert parity.token_parity([[1], [2]], [np.array([1]), [2]])["token_parity"] is True
    assert parity.gen_match([[1, 2], [3], []], [[1, 2], [3, 4], []]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        parity.gen_match([[1]], [[1], [2]])


def test_thresholds_lookup_and_override():
    q8 = parity.thresholds_for("gguf", "Q8_0")
    assert q8["kld_mean"] >= 0.0014  # never stricter than llama.cpp's published Q8_0 mean KLD
    assert parity.thresholds_for("gguf", "q8_0") == q8  # case-insensitive variant
    assert parity.thresholds_for("gguf", "Q3_K_S") == lookup("gguf").thresholds["default"]
    table = {"gguf": {"Q8_0": {"kld_mean": 0.01}}, "onnx": {"default": {"gen_match": 0.5}}}
    over = parity.thresholds_for("gguf", "Q8_0", table)
    assert over["kld_mean"] == 0.01 and over["top1_agree"] == q8["top1_agree"]
    assert parity.thresholds_for("onnx", "int4_k_quant", table)["gen_match"] == 0.5  # a variant named in config
    # a configured default applies only to variants without an entry of their own
    assert parity.thresholds_for("onnx", "int8", table) == lookup("onnx").thresholds["int8"]
    with pytest.raises(ValueError, match="unknown format 'tflite'; known: hf, torchao, gguf, onnx"):
        parity.thresholds_for("tflite", "x")
    with pytest.raises(KeyError, match="unknown threshold keys"):
        parity.thresholds_for("hf", "merged", {"hf": {"merged": {"kld": 1.0}}})


def test_judge():
    th = {"kld_mean": 0.01, "top1_agree": 0.9, "gen_match": 0.5}
    ok, fails = parity.judge({"kld_mean": 0.001, "top1_agree": 0.95, "gen_match": 0.6, "token_parity": True}, th)
    assert ok and fails == []
    ok, fails = parity.judge(
        {"kld_mean": 0.02, "top1_agree": 0.95, "gen_match": 0.6, "token_parity": False, "chat_template_equal": False}, th
    )
    assert not ok
    assert "token_parity is false" in fails and "chat_template_equal is false" in fails
    assert any(f.startswith("kld_mean 0.02 > 0.01") for f in fails)
    ok, fails = parity.judge({"top1_agree": 0.95, "gen_match": 0.6}, th)
    assert not ok and fails == ["kld_mean missing"]


def test_token_parity_threshold_waives_only_the_prompt_ids_check():
    table = {"gguf": {"Q4_0": {"token_parity": False}}}
    th = parity.thresholds_for("gguf", "Q4_0", table)
    assert th == {**lookup("gguf").thresholds["Q4_0"], "token_parity": False}
    good = {"kld_mean": 0.01, "top1_agree": 0.95, "gen_match": 0.9, "token_parity": False}
    assert parity.judge(good, th) == (True, [])
    assert parity.judge(good, parity.thresholds_for("gguf", "Q4_0")) == (False, ["token_parity is false"])
    # the other tokenizer checks stay required
    assert parity.judge({**good, "eos_ok": False}, th) == (False, ["eos_ok is false"])
    assert parity.judge(good, {**th, "token_parity": True}) == (False, ["token_parity is false"])
    with pytest.raises(TypeError, match="true or false"):
        parity.thresholds_for("gguf", "Q4_0", {"gguf": {"Q4_0": {"token_parity": 0.5}}})

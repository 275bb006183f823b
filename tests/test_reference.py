"""The reference (built once from the merged model): contents, numpy-only loading, atomicity, errors."""

import subprocess
import sys

import numpy as np
import pytest

from qatforge import parity, reference
from qatforge.io import sha256_path

from export_helpers import reverse_task_checkpoint


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    t = reverse_task_checkpoint(root)
    meta = reference.build(t["merged"], t["parquet"], root / "reference",
                           n_prompts=6, n_nll=4, max_new_tokens=8, max_len=64, threads=1)
    return t, root / "reference", meta


def test_reference_contents_match_the_model(tiny_ref):
    import torch

    from qatforge.chat import IGNORE_INDEX, encode_for_training, render
    from qatforge.data import read_conversations

    t, ref_dir, meta = tiny_ref
    tok, model = t["tokenizer"], t["model"]
    assert sorted(p.name for p in ref_dir.iterdir()) == ["reference.json", "reference.npz"]
    ref = reference.load(ref_dir)
    assert len(ref.prompt_ids) == len(ref.gen_ids) == 6 and len(ref.nll_ids) == 4
    assert all(isinstance(a, np.ndarray) for a in ref.prompt_ids + ref.nll_ids)
    # prompt ids: the chat template with the generation prompt, tokenized without extra specials
    text = render(tok, ref.prompts[0], add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert ref.prompt_ids[0].tolist() == tok(text, add_special_tokens=False)["input_ids"]
    # the assistant mask of the test conversations, and the model's distribution at their answer positions
    conv = read_conversations(t["parquet"])[1]
    enc = encode_for_training(tok, conv, 64)
    assert ref.nll_ids[1].tolist() == enc["input_ids"]
    assert ref.nll_mask[1].tolist() == [lab != IGNORE_INDEX for lab in enc["labels"]]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0].numpy()
    pos = parity.answer_positions(ref.nll_mask[1])
    d = ref.nll_dists[1]
    assert len(d) == len(pos) > 0 and d.head_ids.shape[1] == len(tok)  # top-k covers the vocabulary: exact
    assert meta["answer_dists"]["exact"] and meta["answer_dists"]["tail_mass_max"] == 0.0
    lp = want[pos] - np.log(np.exp(want[pos].astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_array_equal(d.head_ids[:, 0], want[pos].argmax(-1))
    np.testing.assert_allclose(np.take_along_axis(lp, d.head_ids.astype(np.int64), -1), d.head_logp, atol=1e-5)
    np.testing.assert_allclose(d.head_logit[:, 0], want[pos].max(-1), atol=1e-5)
    assert parity.compare_answers([d], [want], [ref.nll_ids[1]], [ref.nll_mask[1]])["kld_mean"] < 1e-9
    # greedy generation: argmax continuation, stop token excluded, at most max_new_tokens
    g = ref.gen_ids[0].tolist()
    assert 0 < len(g) <= 8 and tok.eos_token_id not in g
    with torch.no_grad():
        first = model(input_ids=torch.tensor([ref.prompt_ids[0].tolist()])).logits[0, -1].argmax().item()
    assert g[0] == first
    # metadata
    assert meta["eos_token_id"] == tok.eos_token_id and meta["bos_token_id"] is None
    assert meta["stop_token_ids"] == [tok.eos_token_id]
    assert meta["chat_template"] == tok.chat_template
    # prompts: the test conversations up to their last assistant turn, whose content is the answer
    conv = read_conversations(t["parquet"])[0]
    assert meta["prompts"][0] == {"messages": conv[:-1], "answer": conv[-1]["content"], "task": "reverse"}
    assert meta["test_sha256"] == sha256_path(t["parquet"])
    assert meta["merged_sha256"] == sha256_path(t["merged"])
    assert len(meta["tokenizer_sha256"]) == 64 and meta["vocab_size"] == len(tok)
    assert meta["n_nll_tokens"] == sum(len(x) for x in ref.nll_ids)
    assert 0 < meta["nll"] < 20 and len(meta["per_prompt_correct"]) == 6


def test_load_needs_numpy_only(tiny_ref):
    _, ref_dir, _ = tiny_ref
    code = (
        "import sys; from qatforge.reference import load; r = load(sys.argv[1]); "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(len(r.prompt_ids), heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ref_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "6 []"


def test_failed_build_leaves_nothing(tiny_ref, tmp_path):
    t, _, _ = tiny_ref
    with pytest.raises(ValueError, match=r"test split has 60 conversations, but eval\.n_nll asks for 999"):
        reference.build(t["merged"], t["parquet"], tmp_path / "reference",
                        n_prompts=2, n_nll=999, max_new_tokens=4, max_len=64)
    assert not (tmp_path / "reference").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".reference")]


def test_load_errors(tiny_ref, tmp_path):
    _, ref_dir, _ = tiny_ref
    with pytest.raises(FileNotFoundError, match="reference.npz is missing"):
        reference.load(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "reference.json").write_text((ref_dir / "reference.json").read_text())
    (bad / "reference.npz").write_bytes((ref_dir / "reference.npz").read_bytes()[:500])  # truncated
    with pytest.raises(ValueError, match="cannot read reference arrays"):
        reference.load(bad)


def test_check_test_data_detects_a_changed_test_split(tiny_ref, tmp_path):
    import polars as pl

    t, ref_dir, _ = tiny_ref
    ref = reference.load(ref_dir)
    reference.check_test_data(ref, t["parquet"])  # unchanged: fine
    reference.check_test_data(ref, None)
    df = pl.read_parquet(t["parquet"])
    changed = tmp_path / "test.parquet"
    df.with_columns(task=pl.lit("other")).write_parquet(changed)
    with pytest.raises(ValueError, match="differs from the test split the reference was built from"):
        reference.check_test_data(ref, changed)

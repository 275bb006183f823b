"""Checkpoint selection on real checkpoints of a tiny run: every candidate scored, choice recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qatforge import data
from qatforge import select as S

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny random base, a train/dev/test split and a 4-step LoRA run with 2 checkpoints."""
    import torch

    from qatforge import tiny
    from qatforge.train import TrainSettings, train_run

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("select")
    src = root / "chat.jsonl"
    src.write_text("\n".join((ROOT / "data/chat.jsonl").read_text().splitlines()[:160]) + "\n")
    data.prepare(src, *(root / f"{s}.parquet" for s in data.SPLITS), dev_fraction=0.1, test_fraction=0.1,
                 max_tokens=256)
    convs = data.read_conversations(root / "train.parquet")
    tok = tiny.build_tokenizer((t for c in convs for m in c for t in (m["role"] + "\n", m["content"])), vocab_size=300)
    model = tiny.build_model(tok, layers=1, intermediate=256, seed=2)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    settings = TrainSettings(max_steps=4, save_steps=2, batch_size=4, lr=3e-3, lora_r=4, lora_alpha=8, threads=1,
                             max_len=96, eval_rows=0, backend="hf")
    train_run(root / "base", root / "train.parquet", root / "dev.parquet", root / "ckpts", settings,
              log=lambda m: None)
    return root


def _select(run, out, qat_scheme=None, **kw):
    from qatforge.train import TrainSettings

    args = dict(settings=TrainSettings(qat_scheme=qat_scheme, max_len=96, threads=1), n_prompts=6, max_new_tokens=6,
                n_eval=8, log=lambda m: None)
    return S.select_best(run / "base", run / "ckpts", run / "dev.parquet", out, **{**args, **kw})


def test_select_scores_all_and_records(run, tmp_path):
    rec = _select(run, tmp_path / "best.json", metric="eval_loss")
    on_disk = json.loads((tmp_path / "best.json").read_text())
    assert on_disk["selected"] == rec["selected"]
    cands = rec["candidates"]
    assert [c["step"] for c in cands] == [2, 4]
    assert all(set(c) >= {"eval_loss", "accuracy", "per_task", "checkpoint"} for c in cands)
    assert rec["selected"] == min(cands, key=lambda c: c["eval_loss"])["checkpoint"]
    assert rec["n_prompts"] == 6 and rec["n_eval_conversations"] == 8 and rec["pinned"] is None
    # Adapters are really applied: scores differ between checkpoints and from the base.
    assert len({c["eval_loss"] for c in cands} | {rec["base"]["eval_loss"]}) == 3
    assert S.best_checkpoint_dir(tmp_path / "best.json", run / "ckpts") == run / "ckpts" / rec["selected"]


def test_select_pinned_and_qat(run, tmp_path):
    rec = _select(run, tmp_path / "best.json", metric="accuracy", pinned="checkpoint-2", qat_scheme="int8-int4",
                  n_prompts=100)
    assert rec["selected"] == "checkpoint-2" and rec["pinned"] == "checkpoint-2"
    # a dev split smaller than eval.n_prompts: all its conversations are scored, and recorded
    n_dev = len(data.read_conversations(run / "dev.parquet"))
    assert n_dev < 100 and rec["n_prompts"] == n_dev and rec["n_prompts_asked"] == 100
    assert rec["scored_with_fake_quant"] and len(rec["candidates"]) == 2
    with pytest.raises(S.SelectError, match="checkpoint-3 not found.*checkpoint-2, checkpoint-4"):
        _select(run, tmp_path / "x.json", pinned=3)
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(S.SelectError, match="unknown select metric"):
        _select(run, tmp_path / "x.json", metric="bleu")


def test_distilled_scores_from_one_pass_equal_hf_nll(run):
    """A distilled run's dev NLL and teacher KLD come from one forward pass; the NLL is hf_nll's."""
    import torch

    from qatforge.chat import hf_nll
    from qatforge.model import load_causal_lm, load_tokenizer

    tok = load_tokenizer(run / "base")
    model = load_causal_lm(run / "base", dtype=torch.float32).eval()
    convs = data.read_conversations(run / "dev.parquet")[:8]
    own = [logits for logits, _ in S.answer_predictions(model, tok, convs, 96)]
    nll, kld = S._nll_and_teacher_kld(model, tok, convs, 96, own)
    assert nll == pytest.approx(hf_nll(model, tok, convs, 96), rel=1e-6) and nll > 0
    assert abs(kld) < 1e-9
    shifted = [t + torch.linspace(0, 1, t.shape[-1]) for t in own]  # another teacher: a positive KL
    assert S._nll_and_teacher_kld(model, tok, convs, 96, shifted)[1] > 1e-3


def test_choose_ranking_and_ties():
    c = [
        {"step": 2, "checkpoint": "checkpoint-2", "accuracy": 0.5, "eval_loss": 1.0},
        {"step": 4, "checkpoint": "checkpoint-4", "accuracy": 0.5, "eval_loss": 0.9},
        {"step": 6, "checkpoint": "checkpoint-6", "accuracy": 0.5, "eval_loss": 0.9},
        {"step": 8, "checkpoint": "checkpoint-8", "accuracy": 0.4, "eval_loss": float("nan")},
    ]
    assert S.choose(c, "accuracy")["step"] == 6  # accuracy tie → lower loss → later step
    assert S.choose(c, "eval_loss")["step"] == 6
    assert S.choose(c, "accuracy", pinned=8)["step"] == 8
    assert S.parse_pinned("checkpoint-40") == S.parse_pinned("40") == S.parse_pinned(40) == 40
    with pytest.raises(S.SelectError):
        S.parse_pinned("best")


def test_missing_checkpoints_dir(tmp_path):
    with pytest.raises(S.SelectError, match="not found"):
        S.list_checkpoints(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.SelectError, match="no checkpoint-<step>"):
        S.list_checkpoints(tmp_path / "empty")

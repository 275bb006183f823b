"""Loading models and tokenizers through the real from_pretrained path, and its clear errors."""

import json

import pytest

from qatforge import datagen, tiny
from qatforge.model import ModelError, check_chat_tokenizer, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rows = datagen.generate(0, 50)
    tok = tiny.build_tokenizer((m["content"] for r in rows for m in r["messages"]), 400)
    d = tmp_path_factory.mktemp("m")
    tiny.build_model(tok, layers=1).save_pretrained(d)
    tok.save_pretrained(d)
    return d, tok


def test_loads_real_checkpoint(saved):
    d, _ = saved
    m = load_causal_lm(d)
    assert type(m).__name__ == "Qwen3ForCausalLM" and not m.training
    assert load_tokenizer(d).chat_template


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(ModelError, match="no config.json"):
        load_tokenizer(tmp_path)


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a causal language model"):
        load_causal_lm(tmp_path)
    from transformers import DistilBertConfig

    DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=100).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("architectures", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="no causal-LM class"):
        load_causal_lm(tmp_path)


def test_tokenizer_without_chat_template_or_eos(saved, tmp_path):
    d, tok = saved
    tok2 = tiny.build_tokenizer(["a b c"] * 5, 300)
    tok2.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        check_chat_tokenizer(tok2, "x")
    tok2.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    for f in tmp_path.glob("chat_template*"):
        f.unlink()
    with pytest.raises(ModelError, match=f"{tmp_path}.*no chat template"):
        load_tokenizer(tmp_path)
    tok3 = tiny.build_tokenizer(["a b c"] * 5, 300)
    tok3.eos_token = None
    with pytest.raises(ModelError, match="no eos"):
        check_chat_tokenizer(tok3, "y")

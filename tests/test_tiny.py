"""The builtin tiny Qwen3: tokenizer, model shapes, save/reload parity, warm-up and build_base."""

import json

import pytest
import torch

from qatforge import chat, data, datagen, tiny
from qatforge.model import load_causal_lm, load_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def rows():
    return datagen.generate(0, 200)


@pytest.fixture(scope="module")
def tok(rows):
    return tiny.build_tokenizer((t for r in rows for m in r["messages"] for t in (m["role"] + "\n", m["content"])), 512)


def test_tokenizer_round_trips_and_specials(tok):
    for text in ["Reverse: a b c", "Héllo wörld! It's 12.5 km\n\ttabs", "ZEBRA 0 9"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("1234")["input_ids"] == [tok.convert_tokens_to_ids(c) for c in "1234"]  # digits split
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.model_input_names == ["input_ids", "attention_mask"]
    assert "token_type_ids" not in tok("x")
    assert len(tok("<|im_start|>user")["input_ids"]) == 2


def test_model_dims_and_quant_friendly_rows(tok):
    m = tiny.build_model(tok)
    c = m.config
    assert type(m).__name__ == "Qwen3ForCausalLM"
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim) == (256, 768, 4, 4, 2, 64)
    assert c.vocab_size == len(tok) and not c.tie_word_embeddings
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    for name, p in m.named_parameters():
        if p.dim() == 2:
            assert p.shape[1] % 256 == 0, name
    assert m.generation_config.eos_token_id == tok.eos_token_id
    assert m.generation_config.pad_token_id == tok.pad_token_id
    with pytest.raises(ValueError, match="multiple of 256"):
        tiny.build_model(tok, hidden=200)


def test_save_reload_identical_logits(tok, tmp_path):
    m = tiny.build_model(tok, layers=2, seed=3)
    m.save_pretrained(tmp_path)
    save_tokenizer(tok, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    m2, t2 = load_causal_lm(tmp_path), load_tokenizer(tmp_path)
    ids = torch.tensor([tok(chat.render(tok, data.as_prompt(datagen.generate(0, 1)[0]["messages"])["messages"], True))["input_ids"]])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)
    assert t2.chat_template == tok.chat_template and t2.eos_token_id == tok.eos_token_id
    # transformers 5 keeps "no BOS" in tokenizer.json's post-processor and no longer writes
    # add_bos_token; qatforge records its BOS rule there itself (for llama.cpp and ORT GenAI).
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert t2("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]
    assert not chat.bos_policy(t2)["add_bos"]


def test_warmup_reduces_loss_and_is_deterministic(tok, rows):
    convs = [r["messages"] for r in rows]
    kw = dict(steps=8, batch_size=8, lr=3e-3, seed=1, max_len=128, log_every=4)
    m1 = tiny.build_model(tok, layers=1, seed=0)
    log1 = tiny.warmup(m1, tok, convs, **kw)
    assert log1[-1]["loss"] < log1[0]["loss"] - 0.5
    m2 = tiny.build_model(tok, layers=1, seed=0)
    log2 = tiny.warmup(m2, tok, convs, **kw)
    assert [r["loss"] for r in log1] == [r["loss"] for r in log2]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_build_base_writes_loadable_checkpoint(rows, tmp_path):
    prompts = [data.as_prompt(r["messages"], r["task"]) for r in datagen.generate(0, 5)]
    metrics = tiny.build_base([r["messages"] for r in rows], tmp_path / "base", steps=3, batch_size=4, lr=1e-3, seed=0,
                              vocab_size=512, log_path=tmp_path / "warmup.csv", eval_prompts=prompts,
                              max_new_tokens=4, model_kwargs={"layers": 1}, eval_every=2)
    out = tmp_path / "base"
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "warmup.json"):
        assert (out / f).is_file(), f
    assert metrics["steps"] == 3 and 0 <= metrics["exact_match"] <= 1
    assert [c["step"] for c in metrics["curve"]] == [2, 3]
    assert (tmp_path / "warmup.csv").read_text().startswith("step,loss")
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
    model, tok = load_causal_lm(out), load_tokenizer(out)
    assert chat.render(tok, prompts[0]["messages"], True).endswith("<|im_start|>assistant\n")
    assert not list(tmp_path.glob(".base.tmp-*"))


def test_build_base_stores_the_warmup_rounded_once_to_dtype(rows, tmp_path):
    """``dtype="bfloat16"`` stores the fp32 warm-up rounded once, nothing else (the builtin base keeps float32)."""
    from safetensors.torch import load_file

    kw = dict(steps=2, batch_size=4, lr=1e-3, seed=0, vocab_size=512, model_kwargs={"layers": 1})
    convs = [r["messages"] for r in rows[:40]]
    fp32 = tiny.build_base(convs, tmp_path / "fp32", **kw)
    bf16 = tiny.build_base(convs, tmp_path / "bf16", dtype="bfloat16", **kw)
    assert (fp32["dtype"], bf16["dtype"]) == ("float32", "bfloat16") and bf16["max_len"] == 256
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    a, b = load_file(tmp_path / "fp32" / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert a.keys() == b.keys() and all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].bfloat16()) for k in a)
    assert (tmp_path / "bf16" / "tokenizer.json").read_bytes() == (tmp_path / "fp32" / "tokenizer.json").read_bytes()

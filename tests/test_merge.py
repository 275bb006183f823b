"""Merging a LoRA adapter into the base (16-bit source of truth) and the QAT convert of the merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qatforge import merge as M

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny random base, plus adapters with non-zero LoRA weights saved plain and under QAT."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qatforge import tiny
    from qatforge.qat import prepare_qat

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("merge")
    rows = [json.loads(line)["messages"] for line in (ROOT / "data/chat.jsonl").read_text().splitlines()[:200]]
    tok = tiny.build_tokenizer((m["role"] + "\n" + m["content"] for c in rows for m in c), vocab_size=300)
    base = tiny.build_model(tok, layers=1, intermediate=256, seed=4)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for name, scheme in (("adapter", None), ("adapter_qat", "int8-int4")):
        model = get_peft_model(tiny.build_model(tok, layers=1, intermediate=256, seed=4),
                               LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
        if scheme:
            prepare_qat(model, scheme)  # saved while the base is fake-quantized, as during QAT training
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(root / name)
    return root, tok


def _peft_logits(env, adapter, enc):
    import torch
    from peft import PeftModel

    from qatforge.model import load_causal_lm

    root, _ = env
    model = PeftModel.from_pretrained(load_causal_lm(root / "base"), str(root / adapter))
    with torch.no_grad():
        return model(**enc).logits


def test_merge_bf16_checks_and_reload_parity(env, tmp_path):
    import torch
    from safetensors.torch import load_file

    from qatforge.io import read_json
    from qatforge.model import load_causal_lm

    root, tok = env
    out = tmp_path / "merged"
    info = M.merge(root / "base", root / "adapter", out, provenance={"run": "baseline"}, log=lambda m: None)
    c = info["checks"]
    assert c["reload_max_abs_logit_diff"] == 0.0
    assert c["chat_template_identical"] and c["special_ids_match_base"] and c["no_double_bos"]
    assert c["eos_in_generation_config"] and c["safetensors"]
    assert (c["eos_token_id"], c["bos_token_id"], c["pad_token_id"]) == (tok.eos_token_id, None, tok.pad_token_id)
    assert info["lora_tensors"] == 14 and info["dtype"] == "bfloat16"
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "export.json"} <= files
    assert not any(f.endswith(".bin") for f in files) and not list(tmp_path.glob(".merged.tmp-*"))
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())
    manifest = read_json(out / "export.json")
    assert manifest["provenance"]["run"] == "baseline" and manifest["sha256"] == info["sha256"]
    # The merged model computes what base + adapter computes (up to the bf16 cast of the weights).
    enc = M.check_inputs(tok, M.CHECK_PROMPTS)
    ref = _peft_logits(env, "adapter", enc)
    with torch.no_grad():
        got = load_causal_lm(out, dtype=torch.float32)(**enc).logits
    assert 0 < M.masked_max_diff(ref, got, enc["attention_mask"]) < 0.1
    assert info["checks"]["fp32_to_16bit_max_abs_logit_diff"] > 0


def test_merge_fp32_is_exact_and_deterministic(env, tmp_path):
    import torch

    from qatforge.model import load_causal_lm

    root, tok = env
    a = M.merge(root / "base", root / "adapter", tmp_path / "a", dtype="float32", log=lambda m: None)
    b = M.merge(root / "base", root / "adapter", tmp_path / "b", dtype="float32", log=lambda m: None)
    assert a["sha256"] == b["sha256"]  # same inputs, byte-identical checkpoint
    assert a["checks"]["fp32_to_16bit_max_abs_logit_diff"] == 0.0
    enc = M.check_inputs(tok, M.CHECK_PROMPTS)
    with torch.no_grad():
        got = load_causal_lm(tmp_path / "a")(**enc).logits
    assert M.masked_max_diff(_peft_logits(env, "adapter", enc), got, enc["attention_mask"]) < 1e-4


def test_qat_adapter_merges_like_a_plain_one(env, tmp_path):
    """An adapter saved under fake quantization holds only LoRA tensors and merges without prepare."""
    from safetensors.torch import load_file

    root, _ = env
    plain, qat = load_file(str(root / "adapter/adapter_model.safetensors")), load_file(
        str(root / "adapter_qat/adapter_model.safetensors"))
    assert plain.keys() == qat.keys()
    info = M.merge(root / "base", root / "adapter_qat", tmp_path / "merged", qat_scheme="int8-int4", log=lambda m: None)
    assert info["qat_scheme"] == "int8-int4" and info["fake_quantized_stripped"] == 0
    assert info["checks"]["reload_max_abs_logit_diff"] == 0.0


def test_qat_convert_of_merged(env, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from qatforge.export.torchao import qat_convert, quantized_modules

    root, tok = env
    M.merge(root / "base", root / "adapter_qat", tmp_path / "merged", qat_scheme="int8-int4", log=lambda m: None)
    info = qat_convert(tmp_path / "merged", tmp_path / "qat_converted", "int8-int4", log=None)
    assert info["quantized_modules"] == 9 and info["reload_max_abs_logit_diff"] == 0.0
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "qat_converted")
    assert len(quantized_modules(m)) == 9
    enc = M.check_inputs(tok, M.CHECK_PROMPTS[:1])
    with torch.no_grad():
        out = m.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_merge_bad_inputs(env, tmp_path):
    root, _ = env
    with pytest.raises(M.MergeError, match="no adapter_model.safetensors"):
        M.merge(root / "base", tmp_path, tmp_path / "m", log=lambda m: None)
    with pytest.raises(M.MergeError, match="dtype"):
        M.merge(root / "base", root / "adapter", tmp_path / "m", dtype="int8", log=lambda m: None)
    assert not (tmp_path / "m").exists()


def test_merge_of_a_16bit_base_in_place_equals_the_float32_merge(env, tmp_path):
    """A bf16-stored base is merged in place (one 16-bit copy in memory), with the same weights as
    loading it in float32, merging, and casting to bf16 once."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from qatforge.model import cast_parameters, load_causal_lm, stored_dtype

    root, tok = env
    base16 = tmp_path / "base16"
    model = load_causal_lm(root / "base")
    cast_parameters(model, torch.bfloat16)
    model.save_pretrained(base16)
    tok.save_pretrained(base16)
    assert stored_dtype(base16) == torch.bfloat16
    info = M.merge(base16, root / "adapter", tmp_path / "merged", log=lambda m: None)
    assert info["merged_in"] == "bfloat16" and info["checks"]["fp32_to_16bit_max_abs_logit_diff"] is None
    ref = PeftModel.from_pretrained(load_causal_lm(base16, dtype=torch.float32), str(root / "adapter"))
    ref = ref.merge_and_unload()
    want = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert got.keys() <= want.keys() and len(got) > 10
    changed = 0
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
        changed += int(not torch.equal(v, load_file(str(base16 / "model.safetensors")).get(k, v)))
    assert changed >= 7  # the LoRA-targeted projections really moved


def test_load_upcast_equals_a_float32_load(env, tmp_path):
    import torch

    from qatforge.model import cast_parameters, load_causal_lm, load_upcast

    root, tok = env
    model = load_causal_lm(root / "base")
    cast_parameters(model, torch.bfloat16)
    model.save_pretrained(tmp_path / "b16")
    a = load_upcast(tmp_path / "b16")
    b = load_causal_lm(tmp_path / "b16", dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert {n: t.dtype for n, t in a.named_buffers()} == {n: t.dtype for n, t in b.named_buffers()}
    assert a.config.dtype == torch.float32


def test_step_0_merge_saves_the_base_itself(env, tmp_path):
    """A distilled QAT run that selected step 0 (no adapter) ships its base, the teacher, cast once."""
    import torch
    from safetensors.torch import load_file

    root, _ = env
    info = M.merge(root / "base", None, tmp_path / "m", log=lambda m: None)
    assert info["adapter_dir"] is None and info["lora_tensors"] == 0
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = load_file(str(root / "base" / "model.safetensors"))
    assert set(got) == set(want)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)

"""QAT schemes (Unsloth names), torchao prepare/strip on a tiny Qwen3 + LoRA, and the deploy quantization
(qatforge.export.torchao) of the same schemes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_qwen3_base
from qatforge.spec import schemes

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- pure scheme logic


def test_scheme_names_are_unsloths():
    assert schemes.UNSLOTH_SCHEMES == ("int4", "int8-int4", "fp8-int4", "fp8-fp8", "int8")
    assert schemes.canonical("phone-deployment") == "int8-int4"
    assert schemes.canonical("int2-w128") == "int2-w128"
    assert schemes.canonical("w2g128") == "int2-w128"
    assert schemes.canonical({"weight_dtype": "int2", "group_size": 128}) == "int2-w128"
    s = schemes.parse_scheme("int8-int4")
    assert (s.weight_bits, s.group_size, s.activation, s.embedding) == (4, 32, "int8", True)
    assert schemes.gguf_type("gguf-q4_0") == "Q4_0" and schemes.gguf_type("int8-int4") is None
    assert schemes.matched_artifact("gguf-q8_0") == ("gguf", "Q8_0")
    assert schemes.matched_artifact("phone-deployment") == ("torchao", "int8-int4")


@pytest.mark.parametrize("bad", ["int9", "int4-w0", "bogus", {"weight_dtype": "float2", "group_size": 8},
                                 {"weight_dtype": "int2", "group_size": 0}, {"weight_dtype": "int2", "gs": 1}])
def test_unknown_scheme_rejected_with_valid_list(bad):
    ok, reason = schemes.device_support(bad, None)
    assert not ok
    with pytest.raises(ValueError):
        schemes.parse_scheme(bad)
    if isinstance(bad, str):
        assert repr(bad) in reason and "int8-int4" in reason and "int2-w128" in reason


def test_device_support_cpu_and_gpu():
    for name in ("int8-int4", "phone-deployment", "int8", "int2-w128", "int4-w32"):
        assert schemes.device_support(name, None) == (True, "ok")
    for name in ("int4", "fp8-int4", "fp8-fp8"):
        ok, reason = schemes.device_support(name, None)
        assert not ok and "CPU" in reason and "int8-int4" in reason, reason
    ok, reason = schemes.device_support("fp8-fp8", (8, 0))
    assert not ok and "8.9" in reason and "8.0" in reason
    assert schemes.device_support("fp8-fp8", (9, 0)) == (True, "ok")
    ok, reason = schemes.device_support("int4", (9, 0))  # the kernel package is not installable here
    assert not ok and "mslk" in reason
    assert schemes.problems("int8", None) == []
    assert schemes.problems("fp8-fp8", None) and "fp8-fp8" in schemes.problems("fp8-fp8", None)[0]


def test_scheme_check_is_fast_and_torch_free():
    """The config validator calls this at Snakefile parse time: no torch import, well under 5 s."""
    code = (
        "import sys, time; t=time.perf_counter();"
        "from qatforge.spec import schemes as q;"
        "[q.parse_scheme(n) for n in q.SCHEMES];"
        "r=q.device_support('fp8-fp8', q.detect_cuda_capability());"
        "print(r[0], 'torch' in sys.modules, time.perf_counter()-t)"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[:2] == ["False", "False"]  # no GPU here; torch never imported
    assert time.perf_counter() - t0 < 5


def test_torchao_configs_from_the_scheme():
    """The torchao config a scheme names, built from its own fields; parsing a Scheme returns it."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    from qatforge import qat

    s = schemes.parse_scheme("phone-deployment")
    assert schemes.parse_scheme(s) is s
    assert qat.torchao_configs(s) == (
        Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
        IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)))
    assert qat.torchao_configs("w3g64") == (IntxWeightOnlyConfig(weight_dtype=torch.int3, granularity=PerGroup(64)), None)
    with pytest.raises(qat.QATError, match="GGUF-targeted"):
        qat.torchao_configs("gguf-q4_0")


def test_capability_override(monkeypatch):
    monkeypatch.setenv("QATFORGE_CUDA_CAPABILITY", "8.9")
    assert schemes.detect_cuda_capability() == (8, 9)
    monkeypatch.setenv("QATFORGE_CUDA_CAPABILITY", "none")
    assert schemes.detect_cuda_capability() is None
    monkeypatch.setenv("QATFORGE_CUDA_CAPABILITY", "eight")
    with pytest.raises(ValueError, match="QATFORGE_CUDA_CAPABILITY"):
        schemes.detect_cuda_capability()


# ----------------------------------------------------------------------------- torchao on a tiny Qwen3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 1-layer Qwen3 (hidden 256) with a BPE tokenizer trained on the shipped data."""
    d, tok, _ = tiny_qwen3_base(tmp_path_factory)
    return d, tok


def _load(d):
    from qatforge.model import load_causal_lm

    return load_causal_lm(d)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))


def _ids(tok):
    from qatforge.chat import render

    text = render(tok, [{"role": "user", "content": "Reverse: a b c"}], add_generation_prompt=True)
    return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def test_prepare_on_lora_model_fake_quantizes_base_only(tiny):
    import torch
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    from qatforge import qat

    d, _ = tiny
    model = _lora(_load(d))
    weights = {n: p for n, p in model.named_parameters()}
    msgs = []
    n = qat.prepare_qat(model, "int8-int4", log=msgs.append)
    # 7 projections of the single layer + lm_head (Linear, in_features % 32 == 0) + the embedding
    assert n == 9 == qat.count_fake_quantized(model)
    assert msgs and "9 modules" in msgs[0]
    kinds = {type(m) for m in model.modules()}
    assert FakeQuantizedLinear in kinds and FakeQuantizedEmbedding in kinds
    for name, m in model.named_modules():
        if "lora_" in name and isinstance(m, torch.nn.Linear):
            assert type(m) is torch.nn.Linear, f"{name} was fake-quantized"
    # The same Parameter objects are used: prepare only wraps modules; only LoRA trains.
    after = {n.replace("base_layer.", "base_layer."): p for n, p in model.named_parameters()}
    assert {id(p) for p in after.values()} == {id(p) for p in weights.values()}
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_prepare_rejects_scheme_matching_no_module(tiny):
    from qatforge import qat

    d, _ = tiny
    model = _lora(_load(d))
    with pytest.raises(qat.QATError, match="0 modules"):
        qat.prepare_qat(model, "int4-w1000")  # no in_features is a multiple of 1000


def test_strip_is_identity_on_weights(tiny):
    """Prepare then QATConfig(step='convert') (no base config) leaves every weight bit-identical."""
    import torch

    from qatforge import qat

    d, _ = tiny
    model = _lora(_load(d))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qat.prepare_qat(model, "int8-int4")
    assert qat.strip_fake_quant(model) == 9
    assert qat.count_fake_quantized(model) == 0  # embedding included (torchao's default filter skips it)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("scheme", ["int8-int4", "int8", "int2-w128"])
def test_fake_quant_matches_real_quantization(tiny, scheme):
    """QAT's fake quantization simulates exactly what quantize_for_deploy produces."""
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from qatforge import qat
    from qatforge.export import torchao as torchao_export

    d, tok = tiny
    ids = _ids(tok)
    model = _load(d)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    qat.prepare_qat(model, scheme)
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    # torchao's own convert path on the fake-quantized model ...
    cfg, emb_cfg, _ = qat.scheme_config(scheme)
    ref = _load(d)
    qat.prepare_qat(ref, scheme)
    if emb_cfg is not None:
        quantize_(ref, QATConfig(emb_cfg, step="convert"), filter_fn=lambda m, f: "FakeQuantizedEmbedding" in type(m).__name__)
    quantize_(ref, QATConfig(cfg, step="convert"))
    # ... and ours on a plain (merged-like) model give the same logits.
    qat.strip_fake_quant(model)
    info = torchao_export.quantize_for_deploy(model, scheme)
    with torch.no_grad():
        real = model(input_ids=ids).logits
        conv = ref(input_ids=ids).logits
    assert len(info["modules"]) > 0
    assert torch.equal(real, conv)
    assert float((real - fake).abs().max()) < 1e-4
    assert float((real - plain).abs().max()) > 1e-4  # quantization really changed something


def test_qatconfig_convert_is_noop_on_plain_model(tiny):
    """Why quantize_for_deploy calls quantize_(model, cfg): QATConfig(cfg, 'convert') skips plain modules."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from qatforge import qat
    from qatforge.export import torchao as torchao_export

    d, _ = tiny
    model = _load(d)
    cfg, _, filt = qat.scheme_config("int8")
    quantize_(model, QATConfig(cfg, step="convert"), filter_fn=filt)
    assert torchao_export.quantized_modules(model) == {}


def test_quantize_for_deploy_rejects_unsupported(tiny):
    from qatforge import qat
    from qatforge.export import torchao as torchao_export

    d, _ = tiny
    with pytest.raises(qat.QATError, match="fp8"):
        torchao_export.quantize_for_deploy(_load(d), "fp8-fp8")


@pytest.mark.parametrize("scheme", ["int8-int4", "int2-w128"])
def test_qat_convert_saves_reloads_and_generates(tiny, tmp_path, scheme):
    import torch
    from transformers import AutoModelForCausalLM

    from qatforge.export import torchao as torchao_export
    from qatforge.io import read_json

    d, tok = tiny
    out = tmp_path / "qat_converted"
    info = torchao_export.qat_convert(d, out, scheme, provenance={"run": "test"}, log=None)
    assert info["quantized_modules"] == (9 if scheme == "int8-int4" else 8)
    assert info["reload_max_abs_logit_diff"] == 0.0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin")) and not list(out.glob(".*tmp*"))
    assert not list(tmp_path.glob(".qat_converted.tmp-*"))
    manifest = read_json(out / "export.json")
    assert manifest["provenance"]["run"] == "test" and manifest["provenance"]["scheme"] == schemes.canonical(scheme)
    cfg = read_json(out / "config.json")
    assert cfg["quantization_config"]["quant_method"] == "torchao"
    # An independent reload through the public API generates tokens from quantized weights.
    m = AutoModelForCausalLM.from_pretrained(out)
    assert len(torchao_export.quantized_modules(m)) == info["quantized_modules"]
    ids = _ids(tok)
    with torch.no_grad():
        gen = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]


@pytest.mark.parametrize("scheme", ["int8", "int8-int4"])
def test_tied_embeddings_are_untied_explicitly_and_reload(tiny, tmp_path, scheme):
    """Tied input/output embeddings (Qwen3-0.6B, Llama-3.2, Gemma, SmolLM2): the quantized LM head
    gets its own weight, the saved config says so, and the reload has the same quantized modules."""
    import torch
    from transformers import AutoModelForCausalLM

    from qatforge.export import torchao as torchao_export
    from qatforge.io import read_json

    d, tok = tiny
    m = AutoModelForCausalLM.from_pretrained(d, tie_word_embeddings=True)
    m.tie_weights()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    src = tmp_path / "tied"
    m.save_pretrained(src)
    tok.save_pretrained(src)
    info = torchao_export.qat_convert(src, tmp_path / "out", scheme, log=None)
    assert info["untied_embeddings"] is True
    assert read_json(tmp_path / "out" / "config.json")["tie_word_embeddings"] is False
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert "lm_head" in torchao_export.quantized_modules(re)
    with torch.no_grad():
        assert torch.isfinite(re(input_ids=_ids(tok)).logits).all()

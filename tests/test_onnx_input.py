"""What ONNX Runtime GenAI's builder is given for a merged text model (qatforge.export.onnx_input).

Unit tests of the view (pure: config, renamed safetensors, symlinks) and real builder runs on the
text models of the Qwen3.5, Ministral 3 and Gemma 4 replicas (tests/families.py, published as
*ForConditionalGeneration; ``base.write_text_model`` extracts the text model as the base stage does):
fp32 logits parity with the HF text model, and the graph inputs (Qwen3.5's linear-attention layers
carry conv and recurrent state instead of a KV cache).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qatforge.export.onnx_input import builder_input, rename_safetensors
from qatforge.spec.onnx_archs import BUILDER_ARCHITECTURES, WRAPPERS, builder_architectures, view_key


def _text_dir(tmp_path: Path, arch: str = "Ministral3ForCausalLM", **extra) -> Path:
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "merged"
    d.mkdir()
    cfg = {"architectures": [arch], "model_type": "ministral3", "hidden_size": 8, "tie_word_embeddings": True,
           "transformers_version": "5.17.0", "dtype": "bfloat16", **extra}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_text("{}")
    tensors = {"model.embed_tokens.weight": torch.arange(24, dtype=torch.bfloat16).reshape(3, 8),
               "model.layers.0.mlp.up_proj.weight": torch.ones(5, 8, dtype=torch.bfloat16),
               "model.norm.weight": torch.full((7,), 2.0)}  # odd sizes: offsets that are not 8-aligned
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_builder_input_is_the_merged_dir_when_the_builder_registers_it(tmp_path):
    merged = _text_dir(tmp_path, arch="Qwen3ForCausalLM", model_type="qwen3")
    assert builder_input(merged, tmp_path / "view", registered=["Qwen3ForCausalLM"]) == merged
    assert not (tmp_path / "view").exists()
    # no multimodal mapping either: handed over as it is, the builder names what it lacks
    assert builder_input(merged, tmp_path / "view", registered=[]) == merged


def test_view_wraps_the_text_config_and_renames_tensors_without_touching_their_bytes(tmp_path):
    from safetensors import safe_open

    merged = _text_dir(tmp_path)
    view = builder_input(merged, tmp_path / "view", registered=["Mistral3ForConditionalGeneration"])
    assert view == tmp_path / "view"
    cfg = json.loads((view / "config.json").read_text())
    assert cfg["architectures"] == ["Mistral3ForConditionalGeneration"] and cfg["model_type"] == "mistral3"
    assert cfg["text_config"]["model_type"] == "ministral3" and "architectures" not in cfg["text_config"]
    assert cfg["tie_word_embeddings"] is True and cfg["vision_config"]["model_type"] == "pixtral"
    assert (view / "tokenizer.json").is_symlink()
    assert (view / "tokenizer.json").resolve() == (merged / "tokenizer.json").resolve()
    with safe_open(str(merged / "model.safetensors"), "pt") as a, safe_open(str(view / "model.safetensors"), "pt") as b:
        assert sorted(b.keys()) == sorted(view_key(k) for k in a.keys())
        assert all(k.startswith("model.language_model.") for k in b.keys())
        assert b.metadata() == a.metadata()
        for k in a.keys():
            assert a.get_tensor(k).equal(b.get_tensor(view_key(k))), k
    # the data section is the merged file's, byte for byte
    def data(p):
        raw = p.read_bytes()
        return raw[8 + int.from_bytes(raw[:8], "little"):]
    assert data(view / "model.safetensors") == data(merged / "model.safetensors")
    # rebuilt from scratch on a second call
    assert builder_input(merged, view, registered=[]) == view and (view / "config.json").is_file()


def test_view_drops_declared_mtp_layers_without_mtp_tensors(tmp_path):
    merged = _text_dir(tmp_path, arch="Qwen3_5ForCausalLM", model_type="qwen3_5_text", mtp_num_hidden_layers=1)
    view = builder_input(merged, tmp_path / "view", registered=["Qwen3_5ForConditionalGeneration"])
    cfg = json.loads((view / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5" and cfg["text_config"]["mtp_num_hidden_layers"] == 0


def test_sharded_index_is_renamed(tmp_path):
    merged = _text_dir(tmp_path)
    index = {"metadata": {"total_size": 1}, "weight_map": {"model.norm.weight": "model.safetensors",
                                                           "lm_head.weight": "model.safetensors"}}
    (merged / "model.safetensors.index.json").write_text(json.dumps(index))
    view = builder_input(merged, tmp_path / "view", registered=[])
    got = json.loads((view / "model.safetensors.index.json").read_text())["weight_map"]
    assert got == {"model.language_model.norm.weight": "model.safetensors", "lm_head.weight": "model.safetensors"}


def test_rename_safetensors_keeps_the_header_aligned(tmp_path):
    merged = _text_dir(tmp_path)
    rename_safetensors(merged / "model.safetensors", tmp_path / "out.safetensors")
    n = int.from_bytes((tmp_path / "out.safetensors").read_bytes()[:8], "little")
    assert n % 8 == 0


def test_the_table_names_architectures_the_installed_builder_registers():
    registered = builder_architectures()
    if not registered:
        pytest.skip("onnxruntime-genai is not installed")
    assert set(BUILDER_ARCHITECTURES.values()) <= set(registered)
    assert set(BUILDER_ARCHITECTURES.values()) <= set(WRAPPERS)
    assert not set(BUILDER_ARCHITECTURES) & set(registered)  # else the table would be stale


# --- real builder runs on the replicas' text models ---------------------------------------------

# family -> the graph inputs besides input_ids, attention_mask and the KV cache of its attention layers
BUILT = {
    "qwen3_5": {"position_ids", "past.0.conv", "past.0.recurrent"},  # M-RoPE ids, linear-attention state
    "ministral3": set(),
    "gemma4": set(),
}


@pytest.fixture(scope="module")
def text_models(tmp_path_factory) -> dict[str, Path]:
    from families import build

    from qatforge.base import write_text_model
    from qatforge.model import load_tokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("onnx-input")
    out = {}
    for name in BUILT:
        rep = build(name, root / "replica" / name)
        text, _ = write_text_model(str(rep), root / "text" / name, log=lambda s: None)
        save_tokenizer(load_tokenizer(rep), text)  # as the base stage saves it
        out[name] = text
    return out


@pytest.mark.parametrize("name", list(BUILT))
def test_the_export_builds_the_text_model_view_with_logits_parity(name, text_models, tmp_path):
    """The ONNX export of a text model the builder knows only under its multimodal architecture: the
    builder is given the view, onnxruntime on its fp32 graph gives the text model's logits (Ministral
    3's YaRN restated for the builder: exact), and its int4 graph builds."""
    import numpy as np

    from qatforge.evaluate.onnx import GenAIRuntime, OnnxRuntime
    from qatforge.export import onnx as onnx_export
    from qatforge.hf_runtime import HFRuntime

    text = text_models[name]
    if name == "gemma4":  # the failure onnx_archs.BUILDER_FAILURES records (the config check refuses it)
        with pytest.raises(RuntimeError, match="ONNX model builder failed") as e:
            onnx_export.export(text, tmp_path / "fp32", {"precision": "fp32"})
        assert "AmbiguousGlobalPerLayerAttributeError" in str(e.value)
        assert not (tmp_path / "fp32").exists()
        return
    view = builder_input(text, tmp_path / "view")
    assert json.loads((view / "config.json").read_text())["architectures"] == [
        BUILDER_ARCHITECTURES[json.loads((text / "config.json").read_text())["architectures"][0]]]
    onnx_export.export(text, tmp_path / "fp32", {"precision": "fp32"})
    rt = OnnxRuntime(tmp_path / "fp32")
    cfg = json.loads((text / "config.json").read_text())
    kv = {f"past_key_values.{i}.{kind}" for i, t in enumerate(cfg.get("layer_types") or
                                                               ["full_attention"] * cfg["num_hidden_layers"])
          if t != "linear_attention" for kind in ("key", "value")}
    assert set(rt.inputs) == {"input_ids", "attention_mask"} | kv | BUILT[name]

    msgs = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the largest digit in 3917? Reverse the letters of 'planet'."}]
    hf_rt = HFRuntime(text)
    ids = hf_rt.prompt_ids(msgs)
    assert rt.prompt_ids(msgs) == ids
    hf, got = hf_rt.logits(ids), rt.logits(ids)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    kl = (np.exp(log_softmax(hf)) * (log_softmax(hf) - log_softmax(got))).sum(-1)
    print(json.dumps({"family": name, "max_abs_logit_diff": float(np.abs(hf - got).max()), "mean_kl": float(kl.mean())}))
    assert kl.mean() < 1e-6 and (hf.argmax(-1) == got.argmax(-1)).all()
    # the KV cache / recurrent state path gives the full-sequence logits
    rt.start(ids[:-1])
    assert np.abs(rt.advance(ids[-1]) - got[-1]).max() < 1e-3

    int4 = onnx_export.export(text, tmp_path / "int4", {"precision": "int4", "block_size": 32})
    assert int4["graph"]["ops"]["MatMulNBits"] > 0 and int4["check"]["prompt_ids_equal"]
    # the deployment runtime (the evaluate job's speed path) loads and runs it
    assert GenAIRuntime(tmp_path / "int4").timed_generate(ids, 3)[2:] == (len(ids), 2)

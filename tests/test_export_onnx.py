"""ONNX Runtime GenAI folders written by its model builder (fp32, int4, int8) from the tiny model."""

from __future__ import annotations

import json

import pytest
from export_helpers import tiny_checkpoint

from qatforge.evaluate.onnx import GenAIRuntime
from qatforge.export import onnx as onnx_export

VARIANTS = {"fp32": {"precision": "fp32"}, "int4": {"precision": "int4", "block_size": 32},
            "int8": {"precision": "int8", "block_size": 32}}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(merged, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    infos = {v: onnx_export.export(merged, root / v, s, source={"run": "test", "checkpoint": "tiny"})
             for v, s in VARIANTS.items()}
    return root, infos


def _torch_vs_onnxruntime(onnx_dir, torch_dir, new_tokens=8):
    """Max |logit diff| over the chat prompt and whether greedy decoding through the graph's KV cache
    gives PyTorch's tokens."""
    import numpy as np

    from qatforge.decode import greedy
    from qatforge.evaluate.onnx import OnnxRuntime
    from qatforge.hf_runtime import HFRuntime

    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    hf, rt = HFRuntime(torch_dir), OnnxRuntime(onnx_dir)
    ids = hf.prompt_ids(messages)
    assert rt.prompt_ids(messages) == ids
    diff = float(np.abs(hf.logits(ids) - rt.logits(ids)).max())
    same = greedy(hf, ids, new_tokens, set(), True)[0] == greedy(rt, ids, new_tokens, set(), True)[0]
    return diff, same


def test_fp32_folder_matches_torch_and_runs_in_onnxruntime_genai(exported, merged):
    import numpy as np
    import onnxruntime_genai as og

    root, infos = exported
    d = root / "fp32"
    for name in ("model.onnx", "genai_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (d / name).is_file(), name
    assert (d / "chat_template.jinja").read_text() == (merged / "chat_template.jinja").read_text()
    check = infos["fp32"]["check"]
    assert check["prompt_ids_equal"] and check["genai_config"] and check["external_tensors"] > 0
    diff, same = _torch_vs_onnxruntime(d, merged)
    assert diff < 1e-4 and same
    record = json.loads((d / "export.json").read_text())
    prov = record["provenance"]
    assert prov["source"]["run"] == "test"
    assert prov["settings"]["precision"] == "fp32" and prov["tool"]["onnxruntime-genai"]
    assert "MatMulNBits" not in prov["graph"]["ops"] and "GroupQueryAttention" in prov["graph"]["ops"]
    assert record["size_bytes"] > 0 and len(record["sha256"]) == 64

    # The folder alone is a deployable ONNX Runtime GenAI model: its own tokenizer and generator.
    model = og.Model(str(d))
    tok = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    ids = tok.encode("What is 1 + 2?")
    params.set_search_options(max_length=len(ids) + 5, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == len(ids) + 5


@pytest.mark.parametrize("variant,bits", [("int4", 4), ("int8", 8)])
def test_quantized_folders_use_matmulnbits_block_32(exported, merged, variant, bits):
    root, infos = exported
    graph = infos[variant]["graph"]
    layers = json.loads((merged / "config.json").read_text())["num_hidden_layers"]
    # every linear layer (fused qkv, o, gate, up, down) and the LM head
    assert graph["ops"]["MatMulNBits"] == layers * 5 + 1 and "MatMul" not in graph["ops"]
    assert graph["matmulnbits_bits"] == [bits] and graph["matmulnbits_block_size"] == [32]
    # the embedding lookup stays float (a Gather), so less than the 8x / 4x of the linear weights
    assert infos["int4"]["size_bytes"] < infos["int8"]["size_bytes"] < 0.5 * infos["fp32"]["size_bytes"]
    assert infos[variant]["check"]["prompt_ids_equal"] and infos[variant]["check"]["genai_config"]
    diff, _ = _torch_vs_onnxruntime(root / variant, merged)
    # the deployment runtime (the evaluate job's speed path) loads and runs it: 3 new tokens, 2 decode steps
    assert GenAIRuntime(root / variant).timed_generate([1, 2, 3], 3)[2:] == (3, 2)
    assert 0 < diff < 5.0  # quantized: close, not equal


def test_export_refuses_a_non_checkpoint_and_keeps_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        onnx_export.export(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_builder_failure_names_the_checkpoint_and_keeps_nothing(merged, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in merged.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="ONNX model builder failed on .*broken"):
        onnx_export.export(broken, tmp_path / "out", {"precision": "int4"})
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no builder work dir either


def test_builder_gets_transformers_4s_rope_layout_for_per_layer_type_rope():
    """Gemma 3 under transformers 5 keeps RoPE per layer type; the builder reads the flat layout."""
    from transformers import Gemma3TextConfig, Qwen3Config

    from qatforge.export.onnx_builder import transformers4_rope

    cfg = Gemma3TextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    assert set(cfg.rope_parameters) == {"full_attention", "sliding_attention"}
    full, sliding = dict(cfg.rope_parameters["full_attention"]), cfg.rope_parameters["sliding_attention"]
    transformers4_rope(cfg)
    assert cfg.rope_parameters == full and cfg.rope_parameters["rope_type"] == "default"
    assert cfg.rope_local_base_freq == sliding["rope_theta"] != full["rope_theta"]
    flat = Qwen3Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    before = dict(flat.rope_parameters)
    assert transformers4_rope(flat).rope_parameters == before  # a flat layout is left alone


def _file_digests(d):
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir()) if f.is_file()}


def test_streamed_quantization_writes_the_builders_own_bytes(merged, exported, tmp_path):
    """The runner hands the quantizer the float graph as external data (onnx_builder.streamed_to_nbits):
    the folder is byte for byte what the unpatched builder writes, and its scratch is removed."""
    import os
    import subprocess
    import sys

    from qatforge.export.onnx_builder import BUILDER

    root, _ = exported
    settings = VARIANTS["int4"]
    out, cache = tmp_path / "plain", tmp_path / "cache"
    cmd = onnx_export.builder_command(merged, out, cache, settings, tied=False)
    plain = [sys.executable, "-m", BUILDER, *cmd[3:]]  # the builder itself, no qatforge runner
    subprocess.run(plain, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ours = tmp_path / "ours"
    subprocess.run(onnx_export.builder_command(merged, ours, tmp_path / "cache2", settings, tied=False),
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    want, got = _file_digests(out), _file_digests(ours)
    assert "model.onnx.data" in want and got == want
    assert not (tmp_path / "cache2").exists()  # float graph removed, empty cache dir too
    shipped = _file_digests(root / "int4")  # export() itself, through the same runner
    assert all(shipped[k] == want[k] for k in ("model.onnx", "model.onnx.data"))

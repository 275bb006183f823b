"""ONNX export through optimum-onnx (fp32, validated) and onnxruntime dynamic int8, on the tiny model."""

from __future__ import annotations

import json

import pytest
from export_helpers import tiny_checkpoint

from qatforge.export import onnx as onnx_export


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(merged, tmp_path_factory):
    import torch

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("onnx")
    fp32 = onnx_export.export(merged, root / "fp32", threads=2, source={"run": "test", "checkpoint": "tiny"})
    int8 = onnx_export.quantize_int8(root / "fp32", root / "int8", threads=2)  # reference from the record
    return root, fp32, int8


def test_fp32_export_matches_torch_and_loads_on_its_own(exported, merged):
    root, fp32, _ = exported
    d = root / "fp32"
    assert (d / "model.onnx").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (d / name).read_bytes() == (merged / name).read_bytes(), name
    assert fp32["check"]["max_abs_logit_diff"] < 1e-4
    assert fp32["check"]["greedy_identical"] == fp32["check"]["texts"]
    record = json.loads((d / "export.json").read_text())
    assert record["provenance"]["source"]["run"] == "test"
    assert record["provenance"]["settings"]["task"] == "text-generation-with-past"
    assert record["provenance"]["tool"]["optimum-onnx"]
    assert record["size_bytes"] > 0 and len(record["sha256"]) == 64

    # The directory alone is enough: tokenizer with chat template + ORT model, greedy generation.
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    model = ORTModelForCausalLM.from_pretrained(d)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_int8_is_quantized_loads_and_generates(exported):
    import onnx
    import onnxruntime as ort

    root, _, int8 = exported
    d = root / "int8"
    graph = onnx.load(str(d / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}, ops
    assert (d / "model.onnx").stat().st_size < 0.5 * (root / "fp32" / "model.onnx").stat().st_size
    ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    assert int8["sessions"]["model.onnx"]["inputs"] >= 3
    assert 0 < int8["check"]["max_abs_logit_diff"] < 5.0  # quantized: different, but close
    assert (d / "chat_template.jinja").is_file() and (d / "export.json").is_file()
    record = json.loads((d / "export.json").read_text())
    assert record["provenance"]["settings"]["weight_type"] == "QInt8"
    assert record["provenance"]["source"]["run"] == "test"  # carried over from the fp32 record


def test_export_refuses_a_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        onnx_export.export(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no .onnx"):
        onnx_export.quantize_int8(tmp_path, tmp_path / "out8")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out8").exists()

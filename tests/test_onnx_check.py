"""The export's folder checks (graph, genai_config, external data, prompt ids) without the weights."""

from __future__ import annotations

import json
import shutil

import pytest
from export_helpers import tiny_checkpoint

from qatforge.export import onnx as onnx_export
from qatforge.export.onnx_check import FolderError, check_folder, load_graph, tensor_bytes


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def folder(merged, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_check") / "fp32"
    onnx_export.export(merged, out, {"precision": "fp32"})
    return out


@pytest.fixture
def copy(folder, tmp_path):
    dst = tmp_path / "fp32"
    shutil.copytree(folder, dst)
    return dst


def _edit_genai_config(d, edit):
    p = d / "genai_config.json"
    cfg = json.loads(p.read_text())
    edit(cfg["model"])
    p.write_text(json.dumps(cfg))


def test_a_built_folder_passes_and_every_weight_byte_is_accounted_for(folder, merged):
    check = check_folder(folder, merged, load_graph(folder))
    layers = json.loads((merged / "config.json").read_text())["num_hidden_layers"]
    data = [folder / f for f in check["external_files"]]
    assert check["external_bytes"] == sum(p.stat().st_size for p in data) > 0
    assert check["bound_inputs"] == 2 + 2 * layers
    assert check["prompt_ids_equal"] and check["layers"] == layers


def test_a_truncated_data_file_is_refused_naming_the_tensor(copy, merged):
    model = load_graph(copy)
    data = copy / check_folder(copy, merged, model)["external_files"][0]
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 4)
    with pytest.raises(FolderError, match=r"model.onnx.data is \d+ bytes; tensor .* ends at byte"):
        check_folder(copy, merged, model)


def test_a_tensor_whose_length_disagrees_with_its_shape_is_refused(copy, merged):
    model = load_graph(copy)
    t = next(t for t in model.graph.initializer if t.external_data)
    entry = next(e for e in t.external_data if e.key == "length")
    entry.value = str(int(entry.value) - 4)
    with pytest.raises(FolderError, match=f"tensor {t.name} stores"):
        check_folder(copy, merged, model)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["decoder"]["inputs"].update(past_key_names="past.%d.k"), "binds no value to the graph's inputs"),
    (lambda m: m["decoder"]["outputs"].update(present_value_names="kv.%d.v"), "lacks: \\['kv.0.v'"),
    (lambda m: m["decoder"]["inputs"].pop("attention_mask"), "binds no value to the graph's inputs"),
    (lambda m: m["decoder"]["outputs"].update(logits="scores"), "names what model.onnx lacks"),
    (lambda m: m.update(vocab_size=m["vocab_size"] + 1), "vocab_size"),
    (lambda m: m["decoder"].update(num_hidden_layers=m["decoder"]["num_hidden_layers"] + 1),
     r"lacks: \[\"layer \d+'s cache"),
])
def test_a_genai_config_that_does_not_bind_the_graph_is_refused(copy, merged, edit, message):
    _edit_genai_config(copy, edit)
    with pytest.raises(FolderError, match=message):
        check_folder(copy, merged, load_graph(copy))


def test_a_folder_whose_template_renders_other_prompt_ids_is_refused(copy, merged):
    (copy / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(FolderError, match="other prompt ids than the checkpoint's"):
        check_folder(copy, merged, load_graph(copy))


@pytest.mark.parametrize("dtype,dims,expected", [
    ("FLOAT", [3, 5], 60), ("FLOAT16", [7], 14), ("UINT8", [4, 2, 16], 128), ("INT64", [2], 16),
    ("INT4", [5], 3), ("UINT4", [2, 4], 4),
])
def test_tensor_bytes_follow_type_and_shape(dtype, dims, expected):
    from onnx import TensorProto

    t = TensorProto(name="w", data_type=getattr(TensorProto, dtype), dims=dims)
    assert tensor_bytes(t) == expected

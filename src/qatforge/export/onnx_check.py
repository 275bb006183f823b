"""Checks of an ONNX Runtime GenAI folder that read its graph but never its weights.

An export job must not hold more than its output: a float32 graph is already twice the bf16
checkpoint, so loading it into a runtime would raise the job's peak past that. The folder is
checked here from ``model.onnx`` without its external data (a few hundred KB), ``genai_config.json``
and the tokenizer files; the deployment runtime runs the folder in the evaluate job (logits in
onnxruntime, timed generation in ``onnxruntime_genai``), which holds the model anyway.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

CHECK_MESSAGES = ({"role": "user", "content": "What is 12 + 30?"},)
SUB_BYTE_TYPES = frozenset({"INT4", "UINT4", "FLOAT4E2M1"})  # two values per byte


class FolderError(RuntimeError):
    """An exported folder that the runtime would refuse or misread."""


def load_graph(model_dir: Path) -> Any:
    """``model.onnx`` without its external data: nodes, inputs, outputs and the tensors' metadata."""
    import onnx

    return onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)


def graph_summary(model: Any) -> dict[str, Any]:
    """Operator counts of the graph and its input names: what the record and the tests read
    (``MatMulNBits`` for the quantized variants)."""
    graph = model.graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    return {"ops": dict(sorted(ops.items())), "inputs": [i.name for i in graph.input],
            "matmulnbits_bits": sorted({a.i for n in nbits for a in n.attribute if a.name == "bits"}),
            "matmulnbits_block_size": sorted({a.i for n in nbits for a in n.attribute if a.name == "block_size"}),
            "lm_head_weights": sorted(t.name for t in graph.initializer if t.name.startswith("lm_head."))}


def tensor_bytes(tensor: Any) -> int:
    """Bytes of a TensorProto's raw data from its type and shape."""
    from onnx import TensorProto, helper

    n = math.prod(tensor.dims)
    if TensorProto.DataType.Name(tensor.data_type) in SUB_BYTE_TYPES:
        return (n + 1) // 2
    return n * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def external_data_check(model_dir: Path, model: Any) -> dict[str, Any]:
    """Every initializer stored outside ``model.onnx`` has the bytes its type and shape need, inside
    a file of the folder, without overlapping another: a truncated or mismatched data file fails
    here instead of in the runtime."""
    from onnx.external_data_helper import uses_external_data

    model_dir = Path(model_dir)
    extents: dict[str, list[tuple[int, int, str]]] = {}
    for t in model.graph.initializer:
        if not uses_external_data(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        location, offset, length = info.get("location", ""), int(info.get("offset", 0)), int(info.get("length", -1))
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise FolderError(f"{model_dir}: tensor {t.name} points outside the folder ({location})")
        if length != tensor_bytes(t):
            raise FolderError(f"{model_dir}: tensor {t.name} stores {length} bytes, its type and shape "
                              f"{list(t.dims)} need {tensor_bytes(t)}")
        extents.setdefault(location, []).append((offset, length, t.name))
    total = 0
    for location, spans in extents.items():
        path = model_dir / location
        if not path.is_file():
            raise FolderError(f"{model_dir}: external data file {location} missing")
        size = path.stat().st_size
        spans.sort()
        for (o0, l0, n0), (o1, _, n1) in zip(spans, spans[1:]):
            if o0 + l0 > o1:
                raise FolderError(f"{path}: tensors {n0} and {n1} overlap")
        offset, length, name = spans[-1]
        if offset + length > size:
            raise FolderError(f"{path} is {size} bytes; tensor {name} ends at byte {offset + length}")
        total += sum(length for _, length, _ in spans)
    return {"external_tensors": sum(map(len, extents.values())), "external_bytes": total,
            "external_files": sorted(extents)}


def _split(names: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A genai_config ``inputs``/``outputs`` block: its plain names, and its per-layer templates
    (``past_key_names: past_key_values.%d.key``) by kind (``key_names``)."""
    plain = [v for k, v in names.items() if not k.endswith("_names")]
    per_layer = {k.split("_", 1)[1]: v for k, v in names.items() if k.endswith("_names")}
    return plain, per_layer


def _last_dim(value_info: Any) -> int | None:
    dims = value_info.type.tensor_type.shape.dim
    return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None


def genai_config_check(model_dir: Path, model: Any) -> dict[str, Any]:
    """``genai_config.json`` parses in ``onnxruntime_genai`` (its ``Config``, no model loaded) and
    names what the graph has: its file, every input and output it will bind (the KV cache of each
    layer) and the vocabulary of the logits."""
    import onnxruntime_genai as og

    model_dir = Path(model_dir)
    og.Config(str(model_dir))
    cfg = json.loads((model_dir / "genai_config.json").read_text())["model"]
    decoder = cfg["decoder"]
    if decoder.get("filename") != "model.onnx":
        raise FolderError(f"{model_dir}/genai_config.json: decoder file {decoder.get('filename')!r}, not model.onnx")
    if "logits" not in decoder.get("outputs", {}):
        raise FolderError(f"{model_dir}/genai_config.json names no logits output")
    layers = int(decoder["num_hidden_layers"])
    plain_in, past = _split(decoder.get("inputs", {}))
    plain_out, present = _split(decoder.get("outputs", {}))
    graph_in = {i.name for i in model.graph.input}
    graph_out = {o.name: o for o in model.graph.output}
    missing = [n for n in plain_in if n not in graph_in] + [n for n in plain_out if n not in graph_out]
    # a layer carries the states its type has (attention: key and value; a linear-attention layer
    # of a hybrid: conv and recurrent), so a template binds only the layers the graph has it for
    bound = set(plain_in)
    for i in range(layers):
        kinds = [k for k, t in past.items() if t % i in graph_in]
        if not kinds:
            missing.append(f"layer {i}'s cache ({', '.join(t % i for t in past.values())})")
        bound |= {past[k] % i for k in kinds}
        for k in kinds:  # each state read is written back
            out = present[k] % i if k in present else f"an output for past_{k}"
            if out not in graph_out:
                missing.append(out)
    if missing:
        raise FolderError(f"{model_dir}/genai_config.json names what model.onnx lacks: {missing[:6]}")
    unbound = sorted(graph_in - bound)
    if unbound:
        raise FolderError(f"{model_dir}/genai_config.json binds no value to the graph's inputs {unbound[:6]}")
    vocab = _last_dim(graph_out[decoder["outputs"]["logits"]])
    if vocab is not None and vocab != int(cfg["vocab_size"]):
        raise FolderError(f"{model_dir}/genai_config.json: vocab_size {cfg['vocab_size']}, the graph's logits {vocab}")
    return {"genai_config": True, "layers": layers, "bound_inputs": len(bound),
            "vocab_size": int(cfg["vocab_size"])}


def prompt_check(model_dir: Path, merged_dir: Path, messages: Sequence[dict] = CHECK_MESSAGES) -> dict[str, Any]:
    """The folder's chat prompt ids equal the merged checkpoint's (same renderer and tokenizer
    library on both folders' files)."""
    from qatforge.evaluate.onnx import FolderTokenizer

    prompt = FolderTokenizer(model_dir).prompt_ids(list(messages))
    source = FolderTokenizer(merged_dir).prompt_ids(list(messages))
    if prompt != source:
        raise FolderError(f"ONNX export of {merged_dir}: the folder's tokenizer/chat template give other prompt "
                          f"ids than the checkpoint's ({prompt[:12]}... vs {source[:12]}...)")
    return {"prompt_ids_equal": True, "prompt_tokens": len(prompt)}


def check_folder(model_dir: Path, merged_dir: Path, model: Any) -> dict[str, Any]:
    """All of the above; raises :class:`FolderError` naming the file and what is wrong."""
    return {**prompt_check(model_dir, merged_dir), **genai_config_check(model_dir, model),
            **external_data_check(model_dir, model)}

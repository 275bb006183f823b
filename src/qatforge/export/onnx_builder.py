"""ONNX Runtime GenAI's model builder, run as ``python -m qatforge.export.onnx_builder <builder args>``,
with the RoPE of transformers 5 configs given to it in the layout it reads.

transformers 5 keeps the RoPE of a model with sliding and full attention layers per layer type
(Gemma 3: ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``). The builder
(0.18) reads transformers 4's layout, ``rope_parameters["rope_type"]`` and Gemma 3's
``rope_local_base_freq``, and stops with ``KeyError: 'rope_type'`` on every Gemma 3. The configs
the builder itself loads (``AutoConfig.from_pretrained``) are given that layout: the full-attention
layers' parameters as ``rope_parameters``, the sliding layers' theta as ``rope_local_base_freq``.
The model transformers builds to hand the builder its weights keeps its own config.

Quantized precisions (int4/int8) are quantized by the builder's ``to_nbits``, which hands ONNX
Runtime's ``MatMulNBitsQuantizer`` ``ir.to_proto(model)``: every weight materialized as float32
in one protobuf (twice the bf16 checkpoint) on top of the torch weights the graph still points
to, with the float weights kept until the quantizer's final ``clean_initializers``.
:func:`streamed_to_nbits` gives it the same graph with its weights as external data instead: the
graph is saved tensor by tensor (``ir.save`` streams) to a file in the builder's cache directory,
the quantizer reads each weight from there as it quantizes it (ONNX Runtime resolves external data
relative to the working directory, which is that directory for the call), and the tensors it
leaves (norms, embeddings) are read from that file again when the builder saves the model. The
values, names and order are those of ``to_proto``, so the saved folder is byte for byte the same.
The pages of the checkpoint the torch weights map are dropped once the float graph is written.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
from pathlib import Path
from typing import Any, Iterator

BUILDER = "onnxruntime_genai.models.builder"


def transformers4_rope(config: Any) -> Any:
    """``config`` (and its text config) with per-layer-type ``rope_parameters`` restated as
    transformers 4 wrote them; other configs unchanged."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in {id(c): c for c in (config, text)}.values():
        rope = getattr(cfg, "rope_parameters", None)
        if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
            sliding = rope.get("sliding_attention")
            cfg.rope_parameters = dict(rope["full_attention"])
            if isinstance(sliding, dict) and "rope_theta" in sliding:
                cfg.rope_local_base_freq = sliding["rope_theta"]
    return config


FP32_GRAPH = "float-graph.onnx"  # the unquantized graph streamed to the builder's cache directory


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def streamed_to_nbits(to_nbits: Any) -> Any:
    """The builder's ``Model.to_nbits`` with the graph it quantizes handed over as external data
    (see the module docstring) instead of one in-memory protobuf of float32 weights."""
    import onnx
    import onnx_ir as ir

    from qatforge.io import drop_mapped_pages

    def wrapped(self: Any) -> Any:
        work = Path(self.cache_dir).resolve() / "to_nbits"
        work.mkdir(parents=True, exist_ok=True)
        to_proto = ir.to_proto

        def external_proto(model: Any) -> Any:
            if model is not self.model:
                return to_proto(model)
            ir.save(model, work / FP32_GRAPH, external_data=FP32_GRAPH + ".data", size_threshold_bytes=0)
            drop_mapped_pages()  # the checkpoint's pages the save read (transformers maps the safetensors)
            return onnx.load(str(work / FP32_GRAPH), load_external_data=False)

        ir.to_proto = external_proto
        try:
            with _cwd(work):  # where the quantizer resolves the weights' relative external-data paths
                model = to_nbits(self)
        finally:
            ir.to_proto = to_proto
        ir.external_data.set_base_dir(model.graph, work)  # the tensors left for the builder's save
        return model

    return wrapped


def removing_scratch(save_model: Any) -> Any:
    """The builder's ``Model.save_model``, then the float graph :func:`streamed_to_nbits` wrote removed."""
    import shutil

    def wrapped(self: Any, out_dir: Any) -> None:
        save_model(self, out_dir)
        scratch = Path(self.cache_dir) / "to_nbits"
        if scratch.is_dir():
            shutil.rmtree(scratch)
            with contextlib.suppress(OSError):
                Path(self.cache_dir).rmdir()  # as the builder does when its cache is left empty

    return wrapped


def main() -> None:
    from transformers import AutoConfig

    load = AutoConfig.from_pretrained

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        return transformers4_rope(load(*args, **kwargs))

    AutoConfig.from_pretrained = from_pretrained  # the builder's own config loads, not the model's
    import onnxruntime_genai.models  # noqa: F401 - puts the builder's directory on sys.path

    from builders.base import Model  # the module the builder imports (as a top-level package)

    Model.to_nbits = streamed_to_nbits(Model.to_nbits)
    Model.save_model = removing_scratch(Model.save_model)
    sys.argv[0] = BUILDER
    runpy.run_module(BUILDER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

"""ONNX Runtime GenAI's model builder, run as ``python -m qatforge.export.onnx_builder <builder args>``,
with the RoPE of transformers 5 configs given to it in the layout it reads.

transformers 5 keeps the RoPE of a model with sliding and full attention layers per layer type
(Gemma 3: ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``). The builder
(0.18) reads transformers 4's layout, ``rope_parameters["rope_type"]`` and Gemma 3's
``rope_local_base_freq``, and stops with ``KeyError: 'rope_type'`` on every Gemma 3. The configs
the builder itself loads (``AutoConfig.from_pretrained``) are given that layout: the full-attention
layers' parameters as ``rope_parameters``, the sliding layers' theta as ``rope_local_base_freq``.
The model transformers builds to hand the builder its weights keeps its own config; nothing else
changes.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

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


def main() -> None:
    from transformers import AutoConfig

    load = AutoConfig.from_pretrained

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        return transformers4_rope(load(*args, **kwargs))

    AutoConfig.from_pretrained = from_pretrained  # the builder's own config loads, not the model's
    sys.argv[0] = BUILDER
    runpy.run_module(BUILDER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

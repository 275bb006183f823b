"""Which architecture ONNX Runtime GenAI's model builder takes a text model under: torch-free.

qatforge fine-tunes and exports the *text* model of a multimodal checkpoint (``base.write_text_model``):
the merged checkpoint is a transformers text CausalLM (``Qwen3_5ForCausalLM``, ``Gemma4ForCausalLM``,
``Ministral3ForCausalLM``). The builder (``onnxruntime_genai.models.builder.create_model``) dispatches
on ``config.architectures[0]`` and registers these families only under their published multimodal
architecture, whose text part it builds (``Qwen35Model``, ``Gemma4MoEModel``, ``Mistral3TextModel``;
vision and audio are left out). ``qatforge.export.onnx_input`` hands it such a view of the text model.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any

# text CausalLM architecture -> the architecture the builder registers for its family
BUILDER_ARCHITECTURES: dict[str, str] = {
    "Qwen3_5ForCausalLM": "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForCausalLM": "Qwen3_5MoeForConditionalGeneration",
    "Gemma4ForCausalLM": "Gemma4ForConditionalGeneration",
    "Ministral3ForCausalLM": "Mistral3ForConditionalGeneration",
}

# What config.json of the multimodal architecture needs besides ``text_config``. The builder loads
# the weights with the transformers class of that architecture, which builds the vision tower from
# ``vision_config`` (random init: the text checkpoint has none); a tiny one keeps that negligible.
# None: the tower is left out (Gemma 4 allows that). The builder reads only the text part.
WRAPPERS: dict[str, dict[str, Any]] = {
    "Qwen3_5ForConditionalGeneration": {
        "model_type": "qwen3_5",
        "vision_config": {"model_type": "qwen3_5_vision", "depth": 1, "hidden_size": 16, "intermediate_size": 16,
                          "num_heads": 1, "num_position_embeddings": 16},
    },
    "Qwen3_5MoeForConditionalGeneration": {
        "model_type": "qwen3_5_moe",
        "vision_config": {"model_type": "qwen3_5_moe_vision", "depth": 1, "hidden_size": 16, "intermediate_size": 16,
                          "num_heads": 1, "num_position_embeddings": 16},
    },
    "Gemma4ForConditionalGeneration": {"model_type": "gemma4", "vision_config": None, "audio_config": None},
    "Mistral3ForConditionalGeneration": {
        "model_type": "mistral3",
        "vision_config": {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                          "num_attention_heads": 1, "head_dim": 16},
    },
}

# Where the multimodal classes keep the language model: the text checkpoint's ``model.*`` tensors
# go under this prefix; ``lm_head.*`` (untied heads) and anything else keep their names.
TEXT_PREFIX, LANGUAGE_MODEL_PREFIX = "model.", "model.language_model."

# keys of the text config.json that describe the file, not the text model
FILE_KEYS = ("architectures", "transformers_version", "auto_map")


# Registered by the builder yet failing on checkpoints saved by the pinned transformers, per
# onnxruntime-genai version (re-examined when the pin moves): refused at parse time, before training.
BUILDER_FAILURES: dict[tuple[str, str], str] = {
    ("0.18.0", "Gemma4ForConditionalGeneration"): (
        "its Gemma 4 builder reads config.head_dim, global_head_dim and num_global_key_value_heads as single "
        "values, which transformers 5.17 keeps per layer (AmbiguousGlobalPerLayerAttributeError)"),
}


def builder_architecture(text_architecture: str) -> str | None:
    """The builder architecture a text CausalLM is built under, or None when there is no mapping."""
    return BUILDER_ARCHITECTURES.get(text_architecture)


def _yarn_dim(beta: float, dim: int, theta: float, original: float) -> float:
    """The rotary dimension where a YaRN boundary lies (``beta`` rotations over the original context)."""
    return dim * math.log(original / (beta * 2 * math.pi)) / (2 * math.log(theta))


def builder_yarn(rope: dict[str, Any], head_dim: int) -> dict[str, Any] | None:
    """YaRN ``rope_parameters`` the builder turns into transformers' own rotary cache, or None when
    nothing needs changing.

    transformers rounds YaRN's correction range to whole dimensions (floor of the ``beta_fast``
    boundary, ceiling of the ``beta_slow`` one; ``truncate``, default true: Ministral 3); the builder
    (0.18) does not. Its range is the same formula, so the betas whose un-rounded boundaries are
    transformers' rounded ones give the same inverse frequencies."""
    if rope.get("rope_type") != "yarn" or rope.get("truncate", True) is False:
        return None
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    theta, original = float(rope["rope_theta"]), float(rope["original_max_position_embeddings"])
    fast, slow = float(rope.get("beta_fast", 32)), float(rope.get("beta_slow", 1))
    low = math.floor(_yarn_dim(fast, dim, theta, original))
    high = math.ceil(_yarn_dim(slow, dim, theta, original))
    if not 0 < low < high < dim // 2 - 1:  # the builder's own range check: leave its refusal to it
        return None
    def beta(d: float) -> float:
        return original / (2 * math.pi * theta ** (2 * d / dim))
    return {**rope, "beta_fast": beta(low), "beta_slow": beta(high)}


def view_config(text_config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """config.json of the ``architecture`` view of a text model's ``text_config`` (a dict); a YaRN
    rope is restated for the builder (:func:`builder_yarn`)."""
    wrapper = WRAPPERS[architecture]
    text = {k: v for k, v in text_config.items() if k not in FILE_KEYS}
    rope = text.get("rope_parameters")
    if isinstance(rope, dict):
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        text["rope_parameters"] = builder_yarn(rope, head_dim) or rope
    cfg: dict[str, Any] = {"architectures": [architecture], **wrapper, "text_config": text}
    for key in ("tie_word_embeddings", "dtype", "torch_dtype"):
        if key in text_config:
            cfg[key] = text_config[key]
    return cfg


def view_key(name: str) -> str:
    """The name a text checkpoint tensor has in the multimodal view."""
    if name.startswith(TEXT_PREFIX) and not name.startswith(LANGUAGE_MODEL_PREFIX):
        return LANGUAGE_MODEL_PREFIX + name[len(TEXT_PREFIX):]
    return name


def builder_source() -> Path | None:
    """``onnxruntime_genai/models/builder.py`` of the installed package (found without importing it)."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "builder.py"
    return path if path.is_file() else None


def builder_architectures(builder_py: str | os.PathLike | None = None) -> list[str]:
    """The ``architectures[0]`` names the builder's ``create_model`` dispatches on (read from its
    source: every ``config.architectures[0] == "<name>"``); [] when the builder is not installed."""
    path = Path(builder_py) if builder_py is not None else builder_source()
    if path is None or not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return sorted(set(re.findall(r"config\.architectures\[0\]\s*==\s*[\"']([A-Za-z0-9_]+)[\"']", text)))

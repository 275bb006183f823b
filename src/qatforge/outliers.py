"""LLM-like outlier input channels for the builtin base, planted exactly after its warm-up.

Trained LLMs have a few input channels whose weights are far larger than the rest (the outlier
features of LLM.int8(), the salient weights AWQ protects). They are why 4-bit grids cost real
models accuracy: a group's absmax scale is set by its outlier, so the group's other weights land on
a coarse grid. A 3 MB model warmed up for minutes has none, and 4-bit rounding there costs nothing
measurable.

``plant`` moves a power-of-two factor ``scale`` from the RMSNorm gain of ``channels`` hidden
channels into the weight columns that read them (q/k/v after ``input_layernorm``, gate/up after
``post_attention_layernorm``), the same channels in every layer. ``norm(x)·g`` then feeds
``W[:, j]·s`` with ``g[j]/s``: the function is unchanged bit for bit (a power of two only moves the
exponent), only where the precision of a quantizer goes changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# RMSNorm -> the linear layers that read its output, per decoder layer (Qwen3 / Llama names).
CONSUMERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


def outlier_channels(hidden: int, channels: int, seed: int) -> list[int]:
    """The ``channels`` hidden channels (sorted) that ``plant`` scales, drawn with ``seed``."""
    import torch

    if not 0 <= channels <= hidden:
        raise ValueError(f"outlier channels must be in [0, {hidden}], got {channels}")
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(hidden, generator=g)[:channels].tolist())


def plant_state_dict(state: dict[str, Any], layers: int, channels: list[int], scale: int) -> dict[str, Any]:
    """A copy of ``state`` with ``scale`` moved from the norm gains of ``channels`` into their
    consuming weight columns, in every one of ``layers`` decoder layers."""
    if scale < 1 or scale & (scale - 1):
        raise ValueError(f"outlier scale must be a power of two >= 1 (exact in floating point), got {scale}")
    out = dict(state)
    if not channels or scale == 1:
        return out
    for i in range(layers):
        p = f"model.layers.{i}."
        for norm, consumers in CONSUMERS.items():
            key = p + norm + ".weight"
            if key not in state:
                raise KeyError(f"no {key} in the base (outliers need a Qwen3/Llama-style decoder)")
            g = state[key].clone()
            g[channels] /= scale
            out[key] = g
            for m in consumers:
                w = state[p + m + ".weight"].clone()
                w[:, channels] *= scale
                out[p + m + ".weight"] = w
    return out


def plant(model_dir: str | Path, *, channels: int, scale: int, seed: int) -> dict[str, Any]:
    """Plant outliers in ``model_dir/model.safetensors`` in place (atomic rewrite); return the record
    for the base manifest."""
    from safetensors.torch import load_file, save_file

    from qatforge.io import atomic_file, read_json

    cfg = read_json(Path(model_dir) / "config.json")
    chosen = outlier_channels(cfg["hidden_size"], channels, seed) if scale != 1 else []  # x1 moves nothing
    record = {"channels": chosen, "scale": scale, "consumers": {k: list(v) for k, v in CONSUMERS.items()}}
    if not chosen:
        return record
    path = Path(model_dir) / "model.safetensors"
    state = plant_state_dict(load_file(path), cfg["num_hidden_layers"], chosen, scale)
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return record

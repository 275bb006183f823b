"""MatMulNBits int4 weights rewritten under learned block scales (qatforge.export.onnx_block_scales):
the builder's bytes at its own scales, MLAS's rounding at any others, and refusals (the real ONNX
Runtime GenAI builder; nothing mocked)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from qatforge.export.onnx_block_scales import hf_weights, pack

INT4 = {"precision": "int4", "block_size": 32}
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")


def test_builder_names_to_hf_weights():
    assert hf_weights("model.layers.3.attn.qkv_proj") == [
        "model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
        "model.layers.3.self_attn.v_proj.weight"]
    assert hf_weights("model.layers.0.attn.o_proj") == ["model.layers.0.self_attn.o_proj.weight"]
    assert hf_weights("model.layers.1.mlp.down_proj") == ["model.layers.1.mlp.down_proj.weight"]
    assert hf_weights("lm_head") == ["lm_head.weight"]


def test_pack_puts_consecutive_pairs_in_one_byte():
    levels = np.arange(64, dtype=np.uint8).reshape(1, 64) % 16
    out = pack(levels)
    assert out.shape == (1, 2, 16)
    assert out[0, 0, 0] == 0 | (1 << 4) and out[0, 0, 1] == 2 | (3 << 4) and out[0, 1, 0] == 0 | (1 << 4)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """The tiny merged checkpoint (untied), its layers' names."""
    from export_helpers import tiny_checkpoint

    src = tiny_checkpoint(tmp_path_factory)
    d = tmp_path_factory.mktemp("onnx_scales") / "merged"
    shutil.copytree(src, d)
    return d


def _weights(merged):
    from safetensors.torch import load_file

    return {k: v.float() for f in merged.glob("model*.safetensors") for k, v in load_file(str(f)).items()}


def _write_scales(merged, factor=None, seed=0):
    """A scales file for every projection: the builder's own scales, times ``factor(shape)``."""
    from safetensors.torch import save_file

    from qatforge.learned_scales import GRIDS, SCALES_FILE

    grid = GRIDS["MatMulNBits int4"]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in _weights(merged).items():
        if not any(p in name for p in PROJ):
            continue
        own = grid.own(w.reshape(-1, 32)).reshape(w.shape[0], -1)
        out[f"{name}.d_format"] = own.contiguous()
        out[f"{name}.d"] = (own * (factor(own.shape, g) if factor else 1)).contiguous()
    save_file(out, str(merged / SCALES_FILE), metadata={"format": grid.name})
    return out


def _initializer(folder, name, dtype):
    import onnx

    from qatforge.export.onnx_block_scales import _external

    init = {i.name: i for i in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.initializer}[name]
    location, offset, length = _external(init)
    with open(folder / location, "rb") as f:
        f.seek(offset)
        return np.frombuffer(f.read(length), dtype=dtype).reshape(tuple(init.dims))


def test_own_scales_give_the_builders_bytes(merged, tmp_path):
    from qatforge.export.onnx import export
    from qatforge.learned_scales import SCALES_FILE

    (merged / SCALES_FILE).unlink(missing_ok=True)
    export(merged, tmp_path / "plain", INT4)
    _write_scales(merged)
    rec = export(merged, tmp_path / "own", INT4)
    (merged / SCALES_FILE).unlink()
    written = rec["learned_block_scales"]  # also in the folder's export.json
    assert written["nodes"] == 2 * 5 and written["scale_ratio_quartiles"] == [1.0, 1.0, 1.0]
    assert (tmp_path / "own" / "model.onnx.data").read_bytes() == (tmp_path / "plain" / "model.onnx.data").read_bytes()


def test_learned_scales_are_written_as_mlas_rounds(merged, tmp_path):
    """Scales off the builder's (some below |extreme|/8, so levels clamp): every rewritten node's
    levels and scales dequantize to ``dequantized_with_scales`` of the merged weights bit for bit."""
    from qatforge.export.onnx import export
    from qatforge.learned_scales import SCALES_FILE
    from qatforge.onnx_fake_quant import dequantized_with_scales

    saved = _write_scales(merged, lambda shape, g: torch.exp(torch.randn(shape, generator=g) * 0.25))
    export(merged, tmp_path / "learned", INT4)
    (merged / SCALES_FILE).unlink()
    weights = _weights(merged)
    for layer in range(2):
        for prefix, names in ((f"model.layers.{layer}.attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                              (f"model.layers.{layer}.mlp.down_proj", ("down_proj",))):
            hf = hf_weights(prefix)
            w = torch.cat([weights[h] for h in hf])
            d = torch.cat([saved[f"{h}.d"] for h in hf])
            blob = _initializer(tmp_path / "learned", f"{prefix}.MatMul.weight_Q4", np.uint8)
            scales = _initializer(tmp_path / "learned", f"{prefix}.MatMul.weight_scales", np.float32)
            levels = np.stack([blob & 15, blob >> 4], axis=-1).reshape(w.shape).astype(np.float32)
            got = (levels - 8) * np.repeat(scales, 32, axis=1)
            assert np.array_equal(scales.view(np.uint32), d.numpy().view(np.uint32)), prefix
            assert np.array_equal(got.view(np.uint32), dequantized_with_scales(w, d).numpy().view(np.uint32)), prefix
            assert (levels == 0).any() or (levels == 15).any()


def test_scales_of_another_checkpoint_are_refused(merged, tmp_path):
    """Scales saved for other weights than the folder's: refused before the folder is kept."""
    from qatforge.export.onnx import export
    from qatforge.learned_scales import GRIDS, SCALES_FILE

    saved = _write_scales(merged)
    from safetensors.torch import save_file

    key = next(k for k in saved if k.endswith(".d_format") and "k_proj" in k)
    saved[key] = saved[key] * 1.01
    save_file(saved, str(merged / SCALES_FILE), metadata={"format": GRIDS["MatMulNBits int4"].name})
    with pytest.raises(ValueError, match="qkv_proj.*are not the builder's own scales"):
        export(merged, tmp_path / "bad", INT4)
    (merged / SCALES_FILE).unlink()
    assert not (tmp_path / "bad").exists()

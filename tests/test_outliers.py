"""Planted outlier channels: the function is unchanged bit for bit, 4-bit grids get coarser."""

import pytest
import torch

from conftest import tiny_qwen3_base
from qatforge import outliers
from qatforge.gguf_fake_quant import dequantized
from qatforge.io import read_json
from qatforge.model import load_causal_lm


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_qwen3_base(tmp_path_factory)[0]


def test_channels_are_seeded_and_bounded():
    a = outliers.outlier_channels(256, 8, seed=1)
    assert a == outliers.outlier_channels(256, 8, seed=1) and a == sorted(a) and len(set(a)) == 8
    assert a != outliers.outlier_channels(256, 8, seed=2)
    assert outliers.outlier_channels(256, 0, seed=1) == []
    with pytest.raises(ValueError, match="outlier channels"):
        outliers.outlier_channels(256, 257, seed=1)


def test_scale_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        outliers.plant_state_dict({}, 1, [0], 12)


def test_plant_keeps_logits_bit_identical_and_moves_the_scale(base, tmp_path):
    import shutil

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    before = load_causal_lm(base, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = before(ids).logits
    planted = tmp_path / "base"
    shutil.copytree(base, planted)
    rec = outliers.plant(planted, channels=8, scale=16, seed=5)
    assert rec["channels"] == outliers.outlier_channels(256, 8, seed=5) and rec["scale"] == 16
    after = load_causal_lm(planted, dtype=torch.float32).eval()
    with torch.no_grad():
        got = after(ids).logits
    assert torch.equal(ref, got)  # a power of two only moves exponents

    J = rec["channels"]
    old, new = before.state_dict(), after.state_dict()
    assert read_json(planted / "config.json")["num_hidden_layers"] == 1
    assert torch.equal(new["model.layers.0.input_layernorm.weight"][J] * 16, old["model.layers.0.input_layernorm.weight"][J])
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        w_old, w_new = old[f"model.layers.0.{m}.weight"], new[f"model.layers.0.{m}.weight"]
        assert torch.equal(w_new[:, J], w_old[:, J] * 16)
        rest = [j for j in range(w_old.shape[1]) if j not in J]
        assert torch.equal(w_new[:, rest], w_old[:, rest])
    # What the outliers are for: the Q4_0 round trip of a reading layer loses more of its output.
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    g_old = old["model.layers.0.input_layernorm.weight"]
    g_new = new["model.layers.0.input_layernorm.weight"]
    errs = []
    for g, w in ((g_old, old["model.layers.0.self_attn.q_proj.weight"]), (g_new, new["model.layers.0.self_attn.q_proj.weight"])):
        y = (x * g) @ w.T
        errs.append(float(((x * g) @ dequantized(w, "Q4_0").T - y).norm() / y.norm()))
    assert errs[1] > 2 * errs[0], errs


def test_zero_channels_leave_the_file_alone(base, tmp_path):
    import shutil

    from qatforge.io import sha256_path

    planted = tmp_path / "base"
    shutil.copytree(base, planted)
    before = sha256_path(planted / "model.safetensors")
    assert outliers.plant(planted, channels=0, scale=16, seed=5)["channels"] == []
    assert sha256_path(planted / "model.safetensors") == before


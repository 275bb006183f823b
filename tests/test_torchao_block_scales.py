"""TorchAO int4 weights rewritten under learned block scales (qatforge.export.torchao_block_scales):
torchao's own tensors at its own scales, and a refusal for scales of another checkpoint (real
torchao ``quantize_`` and checkpoint save/reload)."""

from __future__ import annotations

import shutil

import pytest
import torch

from qatforge.learned_scales import GRIDS, SCALES_FILE

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture()
def merged(tmp_path_factory, tmp_path):
    from export_helpers import tiny_checkpoint

    d = tmp_path / "merged"
    shutil.copytree(tiny_checkpoint(tmp_path_factory), d)
    return d


def _write_scales(merged, bump=None):
    from safetensors.torch import load_file, save_file

    grid = GRIDS["torchao int4"]
    out = {}
    for name, w in load_file(str(merged / "model.safetensors")).items():
        if name.split(".")[-2] in PROJ:
            own = grid.own(w.float().reshape(-1, 32)).reshape(w.shape[0], -1)
            out[f"{name}.d_format"], out[f"{name}.d"] = own, own.clone()
    if bump:
        out[bump] = out[bump] * 1.01
    save_file(out, str(merged / SCALES_FILE), metadata={"format": grid.name})


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_own_scales_give_torchaos_tensors(merged, tmp_path):
    from qatforge.export.torchao import qat_convert

    qat_convert(merged, tmp_path / "plain", "int8-int4")
    _write_scales(merged)
    qat_convert(merged, tmp_path / "own", "int8-int4")
    plain, own = _weights(tmp_path / "plain"), _weights(tmp_path / "own")
    assert plain.keys() == own.keys()
    assert all(torch.equal(plain[k], own[k]) for k in plain)
    import json

    record = json.loads((tmp_path / "own" / "export.json").read_text())["provenance"]["learned_block_scales"]
    assert record["tensors"] == 2 * 7 and record["scale_ratio_quartiles"] == [1.0, 1.0, 1.0]


def test_scales_of_another_checkpoint_are_refused(merged, tmp_path):
    from qatforge.export.torchao import qat_convert

    _write_scales(merged, bump="model.layers.1.mlp.up_proj.weight.d_format")
    with pytest.raises(ValueError, match="up_proj.weight: the scales torchao chose are not the own scales"):
        qat_convert(merged, tmp_path / "bad", "int8-int4")
    assert not (tmp_path / "bad").exists()

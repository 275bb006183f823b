"""TorchAO post-training quantization of the tiny merged model with the QAT schemes' configs."""

from __future__ import annotations

import json

import pytest
from export_helpers import tiny_checkpoint

from qatforge.export import torchao as torchao_export


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.mark.parametrize("scheme", ["int8-int4", "int8"])
def test_ptq_reloads_and_generates(merged, tmp_path, scheme):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    out = tmp_path / scheme
    info = torchao_export.ptq(merged, out, scheme, threads=2, source={"run": "baseline"})
    record = json.loads((out / "export.json").read_text())
    prov = record["provenance"]
    assert prov["settings"]["scheme"] == scheme and prov["settings"]["method"] == "ptq"
    assert prov["source"]["run"] == "baseline" and prov["source"]["merged_dir"] == str(merged)
    assert prov["duration_s"] > 0 and prov["tool"]["torchao"]
    assert info["check"]["quantized_modules"] > 0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))  # transformers 5: safetensors only

    # An independent reload: quantized tensors come back, logits are finite, generate runs.
    model = AutoModelForCausalLM.from_pretrained(out)
    qtypes = {type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert any(t not in ("Parameter", "Tensor") for t in qtypes), qtypes
    tok = AutoTokenizer.from_pretrained(out)
    # transformers 5: a tokenizing apply_chat_template returns a BatchEncoding (return_dict defaults to True)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
        got = model(ids).logits
    assert gen.shape[1] > ids.shape[1]
    assert torch.isfinite(got).all()
    assert float((got - ref).abs().max()) > 0  # really quantized


def test_unknown_scheme_is_rejected(merged, tmp_path):
    with pytest.raises(ValueError, match="int8-int4"):
        torchao_export.ptq(merged, tmp_path / "x", "int3-banana")
    assert not (tmp_path / "x").exists()

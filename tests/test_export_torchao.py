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


def _tensor_files(d):
    """Parsed safetensors header and data bytes (the header's metadata map is written in Rust
    HashMap order, which varies from run to run), plus every other file's bytes, of a folder."""
    from qatforge.io import safetensors_header

    out = {}
    for f in sorted(d.iterdir()):
        if f.name == "export.json":
            continue
        if f.suffix == ".safetensors":
            header, start = safetensors_header(f)
            out[f.name] = (header, f.read_bytes()[start:])
        else:
            out[f.name] = f.read_bytes()
    return out


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tiny checkpoint with its LM head tied to the embedding (schemes untie it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_checkpoint(tmp_path_factory)
    out = tmp_path_factory.getbasetemp() / "tiny-tied"
    if not (out / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.get_input_embeddings().weight
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.mark.parametrize("scheme", ["int8-int4", "int8", "int2-w128"])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_streamed_quantization_saves_what_a_float32_load_does(merged, tied, tmp_path, scheme, which):
    """quantize_checkpoint loads in bf16 and upcasts weight by weight as it quantizes; the folder is
    bit for bit the one quantizing a float32 load of the checkpoint gives (the pre-streaming path)."""
    import torch

    from qatforge.model import load_tokenizer, load_upcast

    src = merged if which == "untied" else tied
    model, upcast = torchao_export.load_for_quantize(src)
    assert upcast == torch.float32 and next(model.parameters()).dtype == torch.bfloat16
    del model
    torchao_export.ptq(src, tmp_path / "streamed", scheme, threads=2)

    reference = load_upcast(src, dtype=torch.float32)
    torchao_export.quantize_for_deploy(reference, scheme)
    torchao_export.save_torchao(reference, load_tokenizer(src), tmp_path / "float32", scheme)
    got, want = _tensor_files(tmp_path / "streamed"), _tensor_files(tmp_path / "float32")
    assert list(got) == list(want) and "model.safetensors" in got
    for name in want:
        assert got[name] == want[name], name


def test_drop_mapped_pages_keeps_mapped_tensors_readable(merged):
    """transformers loads safetensors weights as views of the mapped file; dropping the mapping's
    resident pages loses nothing (they are read again from the file)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qatforge.io import drop_mapped_pages

    want = load_file(str(merged / "model.safetensors"))  # copies
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], want[k]) for k in params)  # every page read
    assert drop_mapped_pages() > 0
    assert all(torch.equal(params[k], want[k]) for k in params)


@pytest.mark.parametrize("scheme", ["int8-int4", "int8", "int4-w32", "int2-w128"])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_row_blocks_save_what_whole_weights_do(merged, tied, tmp_path, monkeypatch, scheme, which):
    """With every weight above the block size, each is quantized in row blocks (the last one short)
    and put together: the folder is bit for bit the one quantizing whole weights gives."""
    src = merged if which == "untied" else tied
    blocked = []

    def spy(module, config, **kw):
        done = quantize_rows(module, config, **kw)
        blocked.append(done)
        return done

    quantize_rows = torchao_export.quantize_rows
    # 100 rows of 256 columns, 33 of 768: every weight of the tiny model (k_proj's 128 rows the
    # smallest) is split, and its last block is short
    monkeypatch.setattr(torchao_export, "ROW_BLOCK_BYTES", 100 * 256 * 4)
    monkeypatch.setattr(torchao_export, "quantize_rows", spy)
    torchao_export.ptq(src, tmp_path / "blocked", scheme, threads=2)
    assert blocked and all(blocked)  # every quantized weight went through the row blocks

    monkeypatch.setattr(torchao_export, "ROW_BLOCK_BYTES", 2**40)
    blocked.clear()
    torchao_export.ptq(src, tmp_path / "whole", scheme, threads=2)
    assert blocked and not any(blocked)
    got, want = _tensor_files(tmp_path / "blocked"), _tensor_files(tmp_path / "whole")
    assert list(got) == list(want) and "model.safetensors" in got
    for name in want:
        assert got[name] == want[name], name


def test_row_blocks_leave_a_biased_linear_to_quantize_(monkeypatch):
    """A Linear with a bias is not split (the scheme may fold the bias into its packed weight)."""
    import torch

    from qatforge.qat import torchao_configs

    cfg, _ = torchao_configs("int8-int4")
    lin = torch.nn.Linear(64, 48, bias=True)
    before = lin.weight.detach().clone()
    assert not torchao_export.quantize_rows(lin, cfg, block_bytes=64)
    assert type(lin.weight) is torch.nn.Parameter and torch.equal(lin.weight, before)
    lin.bias = None
    assert torchao_export.quantize_rows(lin, cfg, block_bytes=64 * 4 * 5)
    assert type(lin.weight).__name__ == "IntxUnpackedToInt8Tensor" and lin.weight.qdata.shape == (48, 64)


@pytest.mark.parametrize("scheme", ["int8-int4", "int8"])
def test_blocked_dequantization_gives_the_same_logits(tied, monkeypatch, scheme):
    """The save check's head and embedding computed from row blocks of their quantized weights give
    the logits and greedy tokens of whole-weight dequantization, and the modules are restored after."""
    import torch

    from qatforge.model import load_tokenizer

    model, upcast = torchao_export.load_for_quantize(tied)
    torchao_export.quantize_for_deploy(model, scheme, upcast=upcast)
    ids = torchao_export._check_ids(load_tokenizer(tied), "Hello there")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        want_gen = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    monkeypatch.setattr(torchao_export, "ROW_BLOCK_BYTES", 100 * 256 * 4)  # 100 rows of the head: 4 blocks
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    emb_quantized = torchao_export._is_quantized_weight(emb.weight)  # int8-int4 quantizes it, int8 not
    assert emb_quantized == (scheme == "int8-int4") and len(head.weight) > 300
    with torch.no_grad(), torchao_export.blocked_dequantization(model) as n:
        got = model(input_ids=ids).logits
        got_gen = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        assert "forward" in vars(head) and ("forward" in vars(emb)) == emb_quantized
    assert n >= 1 + emb_quantized and not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1)) and torch.equal(got_gen, want_gen)

"""Learned Q4_0 block scales (qatforge.learned_scales): the training forward is the file's values bit
for bit, LSQ's gradients, θ saved with the adapter and loaded by name, and the whole path
train forward → merge → convert → llama-quantize + rewrite → llama.cpp on the tiny Qwen3 (real
PEFT, merge, converter, llama-quantize and llama.cpp)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_qwen3_base
from qatforge.gguf_fake_quant import dequantized_with_scales, fake_quantize
from qatforge.learned_scales import GAIN, GRIDS, PARAM, SCALES_FILE, learned, load_thetas, saved_thetas, scales

Q4_0 = GRIDS["Q4_0"]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _w(seed=0, shape=(48, 256)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[3, 40] = 0.5  # an outlier
    w[5, 64:96] = 0.0  # a zero block
    return w.to(torch.bfloat16).float()


def _bits(t):
    return t.detach().contiguous().numpy().view(np.uint32)


def test_forward_is_the_file_rounding_and_theta_zero_is_llama_cpp():
    w = _w()
    theta = torch.randn(48, 8, generator=torch.Generator().manual_seed(1)) * 0.02
    got = learned(w, theta, Q4_0)
    assert np.array_equal(_bits(got), _bits(dequantized_with_scales(w, scales(w, theta, Q4_0))))
    assert np.array_equal(_bits(learned(w, torch.zeros(48, 8), Q4_0)), _bits(fake_quantize(w, "Q4_0")))
    assert not torch.equal(got, fake_quantize(w, "Q4_0"))


def test_lsq_gradients():
    """The backward against autograd through LSQ's own formulation (u = w/d inside the grid with a
    straight-through round, the clamped level outside), equal up to the fp16 rounding of d. (No
    zero block here: the formulation divides by d = 0 there; the zero block's gradients are below.)"""
    w = _w(2) * 3
    w[5, 64:96] = 0.01
    w.requires_grad_(True)
    theta = (torch.randn(48, 8, generator=torch.Generator().manual_seed(3)) * 0.05).requires_grad_(True)
    g = torch.randn(48, 256, generator=torch.Generator().manual_seed(4))
    (learned(w, theta, Q4_0) * g).sum().backward()
    gw, gt = w.grad.clone(), theta.grad.clone()

    w2, t2 = w.detach().clone().requires_grad_(True), theta.detach().clone().requires_grad_(True)
    x = w2.reshape(-1, 32)
    ax = x.detach().abs()
    d0 = torch.gather(x.detach(), -1, ax.argmax(-1, keepdim=True)) / -8.0
    d = d0 * torch.exp(GAIN * t2.reshape(-1, 1))
    u = x / d
    q = (torch.trunc(u.detach() + 8.5).clamp(0, 15) - 8)
    inside = (u.detach() >= -8.5) & (u.detach() < 7.5)
    assert (~inside).any()  # some values clamp
    qs = torch.where(inside, u + (q - u).detach(), q)
    ((qs * d).reshape(w2.shape) * g).sum().backward()
    assert torch.allclose(gw, w2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gt, t2.grad, rtol=1e-3, atol=1e-6)
    assert float(gt.abs().max()) > 0
    # a zero block: d = 0, its values stay 0; the weight gets the gradient, θ none
    z = torch.zeros(2, 32, requires_grad=True)
    tz = torch.zeros(2, 1, requires_grad=True)
    out = learned(z, tz, Q4_0)
    assert torch.equal(out, torch.zeros(2, 32))
    out.sum().backward()
    assert torch.equal(z.grad, torch.ones(2, 32)) and torch.equal(tz.grad, torch.zeros(2, 1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_qwen3_base(tmp_path_factory)


def _peft(d, learned=True, scheme="gguf-q4_0"):
    """The tiny base with a rank-4 adapter (random B) prepared merge-exact for ``scheme``, θ random
    (as after some training)."""
    from peft import LoraConfig, get_peft_model

    from qatforge import merge as merge_mod
    from qatforge.model import load_causal_lm
    from qatforge.qat_lora import prepare_merged_qat

    model = get_peft_model(load_causal_lm(d), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    info = prepare_merged_qat(model, scheme, storage_dtype=merge_mod.STORAGE_DTYPE, learned_scales=learned)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            if PARAM in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model, info


def test_thetas_are_trainable_saved_and_loaded_by_name(tiny, tmp_path):
    from peft import PeftModel

    from qatforge import merge as merge_mod
    from qatforge.model import load_causal_lm
    from qatforge.qat_lora import prepare_merged_qat

    d, tok, rows = tiny
    model, info = _peft(d)
    assert len(info["learned_block_scales"]) == 7
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(PARAM in n for n in trainable) == 7
    model.save_pretrained(tmp_path / "adapter")
    saved = saved_thetas(tmp_path / "adapter")
    assert len(saved) == 7
    # loaded under another adapter name (as select_best loads each checkpoint)
    other = PeftModel.from_pretrained(load_causal_lm(d), str(tmp_path / "adapter"), adapter_name="step2")
    prepare_merged_qat(other, "gguf-q4_0", storage_dtype=merge_mod.STORAGE_DTYPE, learned_scales=True)
    assert load_thetas(other, tmp_path / "adapter", "step2") == 7
    mine = {n: m for n, m in model.named_modules() if hasattr(m, PARAM)}
    for n, m in other.named_modules():
        if hasattr(m, PARAM):
            assert torch.equal(getattr(m, PARAM)["step2"], getattr(mine[n], PARAM)["default"]), n
    enc = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=enc).logits, other.eval()(input_ids=enc).logits)
    # a checkpoint without θ for a layer that learns scales
    plain, _ = _peft(d, learned=False)
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(KeyError, match="no learned block scales"):
        load_thetas(other, tmp_path / "plain", "step3")


def _trained_and_merged(tiny, tmp_path, scheme, n=6):
    """A learned-scale adapter for ``scheme`` (as after training), saved and merged: the encoded
    conversations, the training forward's logits on them, θ by merged module name, and the merged
    checkpoint (with its scales) beside a copy without them (what PTQ of the same model reads)."""
    import shutil

    from qatforge import merge as merge_mod
    from qatforge.chat import encode_for_training

    d, tok, rows = tiny
    model, info = _peft(d, scheme=scheme)
    assert len(info["learned_block_scales"]) == 7
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    enc = [encode_for_training(tok, r, 256)["input_ids"] for r in rows[:n]]
    with torch.no_grad():
        train_fwd = [model(input_ids=torch.tensor([e])).logits[0].float() for e in enc]
    thetas = {n.removeprefix("base_model.model."): getattr(m, PARAM)["default"].detach().clone()
              for n, m in model.named_modules() if hasattr(m, PARAM)}
    del model
    merged = tmp_path / "merged"
    info = merge_mod.merge(d, tmp_path / "adapter", merged, qat_scheme=scheme, log=lambda *a: None)
    assert info["learned_block_scales"] == 7 and (merged / SCALES_FILE).is_file()
    shutil.copytree(merged, tmp_path / "merged-ptq")
    (tmp_path / "merged-ptq" / SCALES_FILE).unlink()
    return enc, train_fwd, thetas, merged, tmp_path / "merged-ptq"


def _kld_to(train_fwd, enc, logits_of) -> float:
    """Mean KLD (float64) from the training forward to a runtime's logits over the conversations."""
    from qatforge.parity import kld

    return float(np.mean([np.mean(kld(np.asarray(logits_of(e), np.float64), t.numpy().astype(np.float64)))
                          for e, t in zip(enc, train_fwd)]))


def test_learned_scales_reach_the_gguf_file_bit_for_bit(tiny, tmp_path):
    """The training forward's Q4_0 weights are the file's: merge writes d beside the checkpoint,
    llama-quantize's Q4_0 tensors are rewritten with it, and every one dequantizes (gguf-py) to the
    training fake quantizer's values of the merged weight; llama.cpp's logits follow the training
    forward, not PTQ."""
    from gguf import GGUFReader, quants
    from safetensors.torch import load_file

    from qatforge.evaluate.gguf import LlamaCppRuntime
    from qatforge.export import gguf
    from qatforge.spec.schemes import gguf_recipe

    enc, train_fwd, thetas, merged, _ = _trained_and_merged(tiny, tmp_path, "gguf-q4_0")
    merged_state = load_file(str(merged / "model.safetensors"))

    bf16 = tmp_path / "m-BF16.gguf"
    gguf.convert(merged, bf16, outtype="bf16", source={"run": "r", "checkpoint": "c"})
    spec = gguf_recipe("gguf-q4_0").quant_spec()
    qtype = spec.pop("type")
    ptq = tmp_path / "ptq-Q4_0.gguf"
    gguf.quantize(bf16, ptq, qtype=qtype, options=spec)
    q4 = tmp_path / "m-Q4_0.gguf"
    rec = gguf.quantize(bf16, q4, qtype=qtype, options=spec, trained={
        "scheme": "gguf-q4_0", "targets": "all-linear", "block_scales": str(merged / SCALES_FILE)})
    assert rec["learned_block_scales"]["tensors"] == 7
    assert rec["tensors"]["blk.0.attn_q.weight"] == "Q4_0"
    layer_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                   "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    tensors = {t.name: t for t in GGUFReader(str(q4)).tensors}
    for module, theta in thetas.items():
        hf = module + ".weight"
        w = merged_state[hf].float()
        gname = f"blk.0.{layer_names[hf.split('.')[-2]]}.weight"
        t = tensors[gname]
        got = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(w.shape)).astype(np.float32)
        assert np.array_equal(got.view(np.uint32), _bits(learned(w, theta, Q4_0))), gname
    qat_gap = _kld_to(train_fwd, enc, LlamaCppRuntime(q4, n_ctx=512, threads=1).logits)
    ptq_gap = _kld_to(train_fwd, enc, LlamaCppRuntime(ptq, n_ctx=512, threads=1).logits)
    print(f"KLD to the training forward: the file with learned scales {qat_gap:.3g}, PTQ {ptq_gap:.3g}")
    assert qat_gap <= 1e-4 and qat_gap < 0.1 * ptq_gap


def test_learned_scales_reach_the_onnx_folder(tiny, tmp_path):
    """onnx-int4 with learned scales: merge writes them, the int4 export writes them into its
    MatMulNBits, and onnxruntime's logits on the folder follow the training forward, not the
    builder's own scales (PTQ of the same merged model)."""
    from qatforge.evaluate.onnx import OnnxRuntime
    from qatforge.export.onnx import export

    enc, train_fwd, _, merged, merged_ptq = _trained_and_merged(tiny, tmp_path, "onnx-int4")
    settings = {"precision": "int4", "block_size": 32}
    rec = export(merged, tmp_path / "int4", settings)
    assert rec["learned_block_scales"]["nodes"] == 5
    export(merged_ptq, tmp_path / "int4-ptq", settings)
    qat_gap = _kld_to(train_fwd, enc, OnnxRuntime(tmp_path / "int4", threads=1).logits)
    ptq_gap = _kld_to(train_fwd, enc, OnnxRuntime(tmp_path / "int4-ptq", threads=1).logits)
    print(f"KLD to the training forward: the folder with learned scales {qat_gap:.3g}, PTQ {ptq_gap:.3g}")
    assert qat_gap <= 1e-4 and qat_gap < 0.1 * ptq_gap


def test_learned_scales_reach_the_torchao_checkpoint(tiny, tmp_path):
    """int8-int4 with learned scales: merge writes them, qat_convert puts them and the levels under
    them into the int4 weights, which reload (transformers' TorchAO loader) dequantizing to the
    training forward's weights bit for bit; the checkpoint's logits follow the training forward
    (KL < 1e-6, as for torchao's own scales), not PTQ."""
    from safetensors.torch import load_file

    from qatforge.export.torchao import qat_convert
    from qatforge.model import load_causal_lm

    enc, train_fwd, thetas, merged, merged_ptq = _trained_and_merged(tiny, tmp_path, "int8-int4", n=4)
    qat_convert(merged, tmp_path / "qat", "int8-int4")
    qat_convert(merged_ptq, tmp_path / "ptq", "int8-int4")
    merged_state = load_file(str(merged / "model.safetensors"))
    deployed = load_causal_lm(tmp_path / "qat", dtype=torch.float32)
    mods = dict(deployed.named_modules())
    for name, theta in thetas.items():
        w = merged_state[name + ".weight"].float()
        assert torch.equal(mods[name].weight.dequantize(), learned(w, theta, GRIDS["torchao int4"])), name

    def kl_max(m):
        with torch.no_grad():
            out = [m(input_ids=torch.tensor([e])).logits[0].float() for e in enc]
        return max(float(torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                                      reduction="none").sum(-1).max()) for a, b in zip(train_fwd, out))

    qat_kl, ptq_kl = kl_max(deployed), kl_max(load_causal_lm(tmp_path / "ptq", dtype=torch.float32))
    print(f"max KL to the training forward: learned scales {qat_kl:.3g}, PTQ {ptq_kl:.3g}")
    assert qat_kl < 1e-6 < ptq_kl


def test_a_checkpoint_the_scales_were_not_learned_on_is_refused(tiny, tmp_path):
    """Scales from one merged checkpoint and a GGUF of another: refused before anything is written."""
    from qatforge import merge as merge_mod
    from qatforge.export import gguf
    from qatforge.export.gguf.block_scales import write_learned_scales

    d, tok, rows = tiny
    model, _ = _peft(d)
    model.save_pretrained(tmp_path / "adapter")
    merge_mod.merge(d, tmp_path / "adapter", tmp_path / "merged", qat_scheme="gguf-q4_0", log=lambda *a: None)
    bf16 = tmp_path / "base-BF16.gguf"
    gguf.convert(d, bf16, outtype="bf16", source={"run": "r", "checkpoint": "c"})  # the base, not the merged model
    q4 = tmp_path / "base-Q4_0.gguf"
    gguf.quantize(bf16, q4, qtype="Q4_0", options={"pure": True})
    before = q4.read_bytes()
    with pytest.raises(ValueError, match="is not model.layers.0.* as the scales were learned on"):
        write_learned_scales(q4, bf16, tmp_path / "merged" / SCALES_FILE)
    assert q4.read_bytes() == before


def test_a_run_that_kept_step_0_ships_the_formats_own_scales(tmp_path):
    """Selection may keep step 0 (the teacher, no adapter): merge writes no scales, and the writers
    keep the format's own; a checkpoint merged from an adapter must have its scales file."""
    from qatforge.io import write_manifest
    from qatforge.learned_scales import merged_scales_file

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"")
    write_manifest(merged, {"checkpoint": "step-0", "merge": {"adapter_dir": None}})
    assert merged_scales_file(merged / SCALES_FILE) is None
    write_manifest(merged, {"checkpoint": "checkpoint-8", "merge": {"adapter_dir": "ckpts/checkpoint-8"}})
    with pytest.raises(FileNotFoundError, match="no learned block scales beside .*merged from ckpts/checkpoint-8"):
        merged_scales_file(merged / SCALES_FILE)
    (merged / SCALES_FILE).write_bytes(b"x")
    assert merged_scales_file(merged / SCALES_FILE) == merged / SCALES_FILE

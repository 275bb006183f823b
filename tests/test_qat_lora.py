"""Merge-exact LoRA QAT (qatforge.qat_lora) and the distillation loss (qatforge.distill)."""

from __future__ import annotations

import pytest

from conftest import tiny_qwen3_base

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 1-layer Qwen3 (hidden 256) with a BPE tokenizer trained on the shipped data."""
    return tiny_qwen3_base(tmp_path_factory)


def _peft(d, seed=0):
    """The tiny base with a rank-4 adapter whose B is random (as after some training)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qatforge.model import load_causal_lm

    model = get_peft_model(load_causal_lm(d), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _batch(tok, rows, n=4):
    from qatforge.chat import encode_for_training

    enc = [encode_for_training(tok, r, 256) for r in rows[:n]]
    return enc


def _logits(model, enc):
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([e["input_ids"]])).logits[0].float() for e in enc]


def test_merged_forward_equals_real_quantization_of_the_merged_checkpoint(tiny, tmp_path):
    """Training-time QAT forward == torchao's real int8-int4 quantization of the saved merged bf16 checkpoint."""
    import torch

    from qatforge import merge as merge_mod
    from qatforge.model import load_upcast
    from qatforge.export.torchao import quantize_for_deploy
    from qatforge.qat_lora import prepare_merged_qat

    d, tok, rows = tiny
    model = _peft(d)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    info = prepare_merged_qat(model, "int8-int4", storage_dtype=merge_mod.STORAGE_DTYPE)
    assert len(info["merged_linears"]) == 7 and info["fake_quantized_other"] == 2  # lm_head + embedding
    model.eval()
    enc = _batch(tok, rows)
    train_fwd = _logits(model, enc)

    merge_mod.merge(d, adapter, tmp_path / "merged", log=lambda *a: None)
    deployed = load_upcast(tmp_path / "merged", dtype=torch.float32)
    quantize_for_deploy(deployed, "int8-int4")
    real = _logits(deployed, enc)
    for a, b in zip(train_fwd, real):
        kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        assert float(kl.max()) < 1e-6
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    # The Unsloth-style forward differs from what ships: the adapter's delta is not quantized.
    from qatforge.qat import prepare_qat

    uns = _peft(d)
    prepare_qat(uns, "int8-int4")
    uns.eval()
    diff = max(float((a - b).abs().max()) for a, b in zip(_logits(uns, enc), real))
    assert diff > 1e-3


def test_merged_qat_gradients_reach_lora_only(tiny):
    import torch

    from qatforge.qat_lora import prepare_merged_qat

    d, tok, rows = tiny
    model = _peft(d)
    prepare_merged_qat(model, "int8-int4", storage_dtype="bfloat16")
    e = _batch(tok, rows, 1)[0]
    out = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_A" in n)


def test_merged_qat_refuses_lora_dropout_and_bad_group(tiny):
    from peft import LoraConfig, get_peft_model

    from qatforge.model import load_causal_lm
    from qatforge.qat import QATError
    from qatforge.qat_lora import prepare_merged_qat

    d, _, _ = tiny
    m = get_peft_model(load_causal_lm(d), LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.1))
    with pytest.raises(QATError, match="dropout"):
        prepare_merged_qat(m, "int8-int4", storage_dtype="bfloat16")
    with pytest.raises(QATError, match="group size 1000"):
        prepare_merged_qat(_peft(d), "int4-w1000", storage_dtype="bfloat16")


def test_kd_loss_values_on_known_logits():
    import math

    import torch

    from qatforge.distill import kd_loss

    # One sequence of 3 positions, vocab 2; position 2 is padding; only position 1 is an answer.
    s = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]]])
    t = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 9.0]]])
    labels = torch.tensor([[-100, -100, 1]])
    mask = torch.tensor([[1, 1, 0]])
    kl0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # teacher (3/4, 1/4) vs uniform
    kl1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    ce1 = -math.log(0.75)
    # "all": positions whose next token is not padding: t=0 only (token 2 is padding)
    loss, parts = kd_loss(s, t, labels, mask, alpha=1.0, temperature=1.0, positions="all")
    assert parts["kd"] == pytest.approx(kl0, rel=1e-6)
    loss, parts = kd_loss(s, t, labels, mask, alpha=0.5, temperature=1.0, positions="answer")
    assert parts["kd"] == pytest.approx(kl1, rel=1e-6) and parts["ce"] == pytest.approx(ce1, rel=1e-6)
    assert float(loss) == pytest.approx(0.5 * kl1 + 0.5 * ce1, rel=1e-6)
    with pytest.raises(ValueError, match="kd_positions"):
        kd_loss(s, t, labels, mask, alpha=1.0, temperature=1.0, positions="user")


def _kl(p_logits, q_logits):
    import numpy as np

    from qatforge.parity import kld

    return float(np.mean(kld(np.asarray(p_logits, dtype=np.float64), np.asarray(q_logits, dtype=np.float64))))


def _tied_copy(d, dest):
    """The tiny base with its LM head tied to the input embedding (Qwen3-0.6B's, Llama-3.2's shape)."""
    import shutil

    from qatforge.model import load_causal_lm

    model = load_causal_lm(d)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(dest, safe_serialization=True)
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, dest / f.name)
    return dest


def _trained_forward(tiny, tmp_path, tied, scheme):
    """A rank-4 adapter on the tiny base (tied or not) prepared merge-exact for ``scheme``: the QAT
    info, the training forward's logits on 6 conversations, the unquantized merged model's logits,
    the merged checkpoint's directory and the encoded conversations."""
    import torch

    from qatforge import merge as merge_mod
    from qatforge.model import load_causal_lm
    from qatforge.qat_lora import prepare_merged_qat

    d, tok, rows = tiny
    if tied:
        d = _tied_copy(d, tmp_path / "tied")
    model = _peft(d, seed=1)
    model.save_pretrained(tmp_path / "adapter")
    info = prepare_merged_qat(model, scheme, storage_dtype=merge_mod.STORAGE_DTYPE)
    model.eval()
    enc = _batch(tok, rows, 6)
    train_fwd = [x.numpy() for x in _logits(model, enc)]
    merge_mod.merge(d, tmp_path / "adapter", tmp_path / "merged", log=lambda *a: None)
    plain = [x.numpy() for x in _logits(load_causal_lm(tmp_path / "merged", dtype=torch.float32), enc)]
    return info, train_fwd, plain, tmp_path / "merged", enc


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_q4_0_forward_matches_llama_cpp_on_the_quantized_file(tiny, tmp_path, tied):
    """gguf-q4_0's training forward (merged weight → bf16 → Q4_0, Q8_0 activations, token embedding and
    output at Q8_0, llama.cpp's QAT mix) against llama.cpp running the file llama-quantize writes with
    that mix from the merged checkpoint, tied or untied."""
    import numpy as np

    from qatforge.evaluate.gguf import LlamaCppRuntime
    from qatforge.export import gguf
    from qatforge.spec.schemes import gguf_recipe

    info, train_fwd, plain, merged, enc = _trained_forward(tiny, tmp_path, tied, "gguf-q4_0")
    assert len(info["merged_linears"]) == 7
    assert info["gguf_outside_adapters"] == {"token_embd": "Q8_0", **({} if tied else {"output": "Q8_0"}),
                                             "output input": "Q8_0"}
    bf16 = tmp_path / "m-BF16.gguf"
    gguf.convert(merged, bf16, outtype="bf16", source={"run": "r", "checkpoint": "c"})
    q4 = tmp_path / "m-Q4_0.gguf"
    spec = gguf_recipe("gguf-q4_0").quant_spec()
    rec = gguf.quantize(bf16, q4, qtype=spec.pop("type"), options=spec,
                        trained={"scheme": "gguf-q4_0", "targets": "all-linear"})
    assert rec["tensors"]["token_embd.weight"] == "Q8_0" and rec["tensors"]["blk.0.attn_q.weight"] == "Q4_0"
    assert ("output.weight" in rec["tensors"]) is not tied
    check = rec["qat_tensor_types"]
    assert len(check["trained"]) == 7 + (1 if tied else 2) and check["other"] == {}
    assert check["trained"]["token_embd.weight"] == "Q8_0" and check["trained"].get("output.weight", "Q8_0") == "Q8_0"
    # llama.cpp's plain Q4_0 keeps a Q4_0 token_embd (Q6_K for a tied one) and a Q6_K output: refused
    with pytest.raises(ValueError, match="written as another type: .*token_embd.weight=Q(4_0|6_K) "):
        gguf.quantize(bf16, tmp_path / "plain-Q4_0.gguf", qtype="Q4_0",
                      trained={"scheme": "gguf-q4_0", "targets": "all-linear"})
    assert not (tmp_path / "plain-Q4_0.gguf").exists()  # the check runs before the file is kept
    rt = LlamaCppRuntime(q4, n_ctx=512, threads=1)
    cpp = [rt.logits(e["input_ids"]) for e in enc]
    qat_gap = np.mean([_kl(c, t) for c, t in zip(cpp, train_fwd)])
    ptq_gap = np.mean([_kl(c, p) for c, p in zip(cpp, plain)])
    print(f"KLD(llama.cpp Q4_0 || QAT forward) {qat_gap:.3g}; || unquantized merged {ptq_gap:.3g}")
    assert qat_gap <= 1e-4 and qat_gap < 0.1 * ptq_gap


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_onnx_int4_forward_matches_onnxruntime_on_the_builders_file(tiny, tmp_path, tied):
    """onnx-int4's training forward (merged weight → bf16 → MatMulNBits int4 block 32, int8
    activations, the LM head at int4, the embedding float unless tied to it) against onnxruntime running the int4
    folder the ONNX Runtime GenAI builder writes from the merged checkpoint, tied or untied."""
    import numpy as np

    from qatforge.evaluate.onnx import OnnxRuntime
    from qatforge.export.onnx import export
    from qatforge.spec.schemes import parse_scheme

    info, train_fwd, plain, merged, enc = _trained_forward(tiny, tmp_path, tied, "onnx-int4")
    assert len(info["merged_linears"]) == 7
    # tied: the builder's embedding is a GatherBlockQuantized over the LM head's int4 blocks
    assert info["onnx_outside_adapters"] == {"lm_head": "int4 block 32", **({"embed_tokens (tied)": "int4 block 32"}
                                             if tied else {}), "lm_head input": "int8 (accuracy_level 4)"}
    export(merged, tmp_path / "int4", parse_scheme("onnx-int4").onnx.builder_settings())
    rt = OnnxRuntime(tmp_path / "int4", threads=1)
    ort = [rt.logits(e["input_ids"]) for e in enc]
    qat_gap = np.mean([_kl(o, t) for o, t in zip(ort, train_fwd)])
    ptq_gap = np.mean([_kl(o, p) for o, p in zip(ort, plain)])
    print(f"KLD(onnxruntime int4 || QAT forward) {qat_gap:.3g}; || unquantized merged {ptq_gap:.3g}")
    assert qat_gap <= 1e-4 and qat_gap < 0.05 * ptq_gap


def test_inference_cache_follows_adapter_updates(tiny):
    """Without grad the fake-quantized merged weight is cached, and an in-place update (an optimizer
    step) or switching adapters off invalidates it."""
    import torch

    from qatforge.qat_lora import prepare_merged_qat

    d, tok, rows = tiny
    model = _peft(d)
    prepare_merged_qat(model, "int8-int4", storage_dtype="bfloat16")
    model.eval()
    e = _batch(tok, rows, 1)
    before = _logits(model, e)[0]
    assert torch.equal(before, _logits(model, e)[0])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    after = _logits(model, e)[0]
    assert not torch.equal(before, after)
    with torch.enable_grad():
        fresh = model(input_ids=torch.tensor([e[0]["input_ids"]])).logits[0].detach().float()
    assert torch.equal(after, fresh)
    with model.disable_adapter():
        off = _logits(model, e)[0]
    assert not torch.equal(off, after)


def _PureSTE(fq):
    import torch

    class PureSTE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fq = fq

        def forward(self, w):
            return w + (self.fq(w) - w).detach()

    return PureSTE()


@pytest.mark.parametrize("scheme", ["int8-int4", "gguf-q4_0"])
def test_fast_gradients_equal_autograd_through_the_merged_weight(tiny, scheme, monkeypatch):
    """The training path's hand-written A/B gradients equal autograd's through round(W + s·B·A)
    with an identity straight-through estimator (the generic path, which multi-adapter layers take;
    torchao's weight quantizer is wrapped as ``w + (fq(w) - w).detach()`` there, since its own
    autograd also differentiates the absmax scale)."""
    import torch

    from qatforge import qat_lora
    from qatforge.qat_lora import prepare_merged_qat

    d, tok, rows = tiny
    e = _batch(tok, rows, 2)
    grads = []
    for fast in (True, False):
        torch.manual_seed(0)  # peft's init of A
        model = _peft(d, seed=3)
        prepare_merged_qat(model, scheme, storage_dtype="bfloat16")
        if not fast:
            monkeypatch.setattr(qat_lora, "_single_adapter", lambda layer: None)
            for m in qat_lora.lora_linears(model).values():
                m._qat_weight_fq = _PureSTE(m._qat_weight_fq)
        loss = 0
        for x in e:
            loss = loss + model(input_ids=torch.tensor([x["input_ids"]]), labels=torch.tensor([x["labels"]])).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        monkeypatch.undo()
    fast, slow = grads
    assert fast.keys() == slow.keys() and len(fast) == 14
    for n in fast:
        assert float((fast[n] - slow[n]).norm() / slow[n].norm()) < 1e-5, n


def test_dev_answer_logits_batched_equal_one_by_one(tiny):
    """select_best's teacher KLD scores the answer positions of right-padded batches."""
    import torch

    from qatforge.model import load_causal_lm
    from qatforge.parity import answer_positions
    from qatforge.select import answer_predictions

    d, tok, rows = tiny
    model = load_causal_lm(d).eval()
    convs = rows[:5]
    one, batched = (answer_predictions(model, tok, convs, 256, batch_size=b) for b in (1, 4))
    enc = _batch(tok, rows, 5)
    for (a, ya), (b, yb), e in zip(one, batched, enc):
        assert a.shape[0] == len(answer_positions([lab != -100 for lab in e["labels"]])) > 0
        assert torch.allclose(a, b, atol=1e-4)
        assert ya.tolist() == yb.tolist() == [lab for lab in e["labels"][1:] if lab != -100]  # the next tokens

"""Training memory at size (exact refactors): recomputed fake-quantized weights, chunked KD loss,
gradient checkpointing and its ``auto`` rule, the tokens/s log. No test asserts memory or timing."""

from __future__ import annotations

import pytest

from conftest import ROOT

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def small():
    """A random 2-layer Qwen3 (hidden 256) and a batch of 4 right-padded shipped conversations."""
    import json

    import torch

    from qatforge import tiny
    from qatforge.chat import collate, encode_for_training

    torch.set_num_threads(1)
    rows = [json.loads(line)["messages"] for line in (ROOT / "data/chat.jsonl").read_text().splitlines()[:200]]
    tok = tiny.build_tokenizer((m["role"] + "\n" + m["content"] for c in rows for m in c), vocab_size=300)
    model = tiny.build_model(tok, layers=2, intermediate=256, seed=5)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = collate([encode_for_training(tok, c, 96) for c in rows[:4]], pad)
    return model.state_dict(), model.config, batch


def _student(small, scheme, *, recompute=True, checkpointing=False):
    """A merged-QAT PEFT model of the small base with a random B (as after some training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qatforge.qat_lora import lora_linears, prepare_merged_qat

    state, config, _ = small
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    base.load_state_dict(state)
    base.config.use_cache = False
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    prepare_merged_qat(model, scheme, storage_dtype="bfloat16")
    for m in lora_linears(model).values():
        m._qat_recompute = recompute
    return model.train()


def _grads(model, batch):
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("scheme", ["int8-int4", "gguf-q4_0"])
def test_recomputed_fake_quantized_weight_gives_the_same_gradients(small, scheme):
    """The merged layers' backward rebuilds fq(round(W + s·B·A)) instead of keeping it: bit for bit."""
    import torch

    kept_loss, kept = _grads(_student(small, scheme, recompute=False), small[2])
    loss, rec = _grads(_student(small, scheme, recompute=True), small[2])
    assert loss == kept_loss and kept.keys() == rec.keys() and len(rec) == 28
    for n in rec:
        assert torch.equal(rec[n], kept[n]), n


def test_merged_layer_keeps_no_weight_for_backward(small, recompute=True):
    """With recomputation the merged Function saves x̂, A and B only (no [out, in] tensor)."""
    import torch

    model = _student(small, "int8-int4", recompute=recompute)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        model(input_ids=small[2]["input_ids"][:1]).logits.sum()
    square = {(256, 256), (256, 512), (512, 256), (1024, 256), (256, 1024), (768, 256), (256, 768)}
    kept = [s for s in saved if s in square]
    assert not kept, kept


@pytest.mark.parametrize("scheme", ["int8-int4", "gguf-q4_0"])
def test_gradient_checkpointing_gives_the_same_gradients(small, scheme):
    """Checkpointed decoder layers (non-reentrant, merged weights kept per recomputed layer)."""
    plain_loss, plain = _grads(_student(small, scheme), small[2])
    loss, ckpt = _grads(_student(small, scheme, recompute=False, checkpointing=True), small[2])
    assert abs(loss - plain_loss) <= 1e-6 * abs(plain_loss)
    for n in plain:
        assert float((ckpt[n] - plain[n]).norm()) <= 1e-6 * float(plain[n].norm()) + 1e-12, n


@pytest.mark.parametrize("scheme", ["int8-int4", "gguf-q4_0", "onnx-int4"])
def test_teacher_shares_the_students_frozen_weights(small, scheme):
    """A distilled run's teacher (the merged checkpoint: bf16 values held in float32) points at the
    student's bitwise-equal frozen tensors, so the LoRA base weights and norms are held once; what
    the scheme replaced by its round trip (the GGUF recipe's Q8_0 embedding and output, the ONNX
    recipe's int4 LM head) keeps its own copy; the teacher's logits are unchanged."""
    import torch
    from transformers import AutoModelForCausalLM

    from qatforge.distill import share_frozen_tensors
    from qatforge.qat_lora import lora_linears

    state, config, batch = small
    merged = {k: v.to(torch.bfloat16).to(v.dtype) for k, v in state.items()}
    student = _student((merged, config, batch), scheme)
    teacher = AutoModelForCausalLM.from_config(config)
    teacher.load_state_dict(merged)
    teacher.eval().requires_grad_(False)
    ids = batch["input_ids"][:2]
    with torch.no_grad():
        before = teacher(input_ids=ids).logits
    freed = share_frozen_tensors(teacher, student)
    with torch.no_grad():
        after = teacher(input_ids=ids).logits
    assert torch.equal(before, after)

    student_ptrs = {p.data_ptr() for p in student.parameters()}
    mine = dict(teacher.named_parameters())
    for fqn, layer in lora_linears(student).items():
        name = fqn.removeprefix("base_model.model.") + ".weight"
        assert mine[name].data_ptr() == layer.get_base_layer().weight.data_ptr(), name
    norms = [n for n in mine if "norm" in n]
    assert norms and all(mine[n].data_ptr() in student_ptrs for n in norms)
    # untied here: the GGUF recipe replaces both by their Q8_0 round trips, the ONNX one the LM head
    # by its int4 round trip; torchao's fake quantizers leave the weights as they are
    shared = {what: m.weight.data_ptr() in student_ptrs
              for what, m in (("embedding", teacher.get_input_embeddings()), ("head", teacher.get_output_embeddings()))}
    assert shared == {"int8-int4": {"embedding": True, "head": True}, "gguf-q4_0": {"embedding": False, "head": False},
                      "onnx-int4": {"embedding": True, "head": False}}[scheme]
    own = sum(p.numel() * p.element_size() for p in teacher.parameters() if p.data_ptr() not in student_ptrs)
    total = sum(p.numel() * p.element_size() for p in teacher.parameters())
    assert freed == total - own and freed > 0.5 * total


@pytest.mark.parametrize("alpha,temperature,positions", [(1.0, 1.0, "all"), (0.9, 1.0, "all"), (0.5, 2.0, "answer"),
                                                         (0.7, 0.5, "all")])
def test_chunked_kd_loss_equals_kd_loss(alpha, temperature, positions):
    """Blocks of positions (down to one row) give kd_loss's value (summation order aside) and its
    exact per-position gradient; padding and the last position get none."""
    import torch

    from qatforge.distill import IGNORE_INDEX, chunked_kd_loss, kd_loss

    g = torch.Generator().manual_seed(0)
    b, length, v = 3, 9, 40
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[:, :3] = IGNORE_INDEX
    labels[2, 6:] = IGNORE_INDEX
    mask = torch.ones(b, length, dtype=torch.long)
    mask[2, 6:] = 0
    teacher = torch.randn(b, length, v, generator=g) * 2
    student = torch.randn(b, length, v, generator=g) * 2
    ref = student.clone().requires_grad_()
    loss, parts = kd_loss(ref, teacher, labels, mask, alpha=alpha, temperature=temperature, positions=positions)
    loss.backward()
    for rows in (1, 4, 1000):
        s = student.clone().requires_grad_()
        got, got_parts = chunked_kd_loss(s, teacher, labels, mask, alpha=alpha, temperature=temperature,
                                         positions=positions, chunk_elements=rows * v)
        (got * 0.5).backward()  # the upstream gradient scales the handed-over one
        assert abs(float(got.detach()) - float(loss.detach())) <= 1e-6 * abs(float(loss.detach()))
        assert got_parts == pytest.approx(parts, rel=1e-6)
        assert torch.equal(s.grad[:, :-1] * 2, ref.grad[:, :-1])
        assert not s.grad[:, -1].any()


def test_gradient_checkpointing_setting_and_auto_rule():
    from qatforge.train import TrainSettings
    from qatforge.train.settings import GC_AUTO_PARAMS, use_gradient_checkpointing

    assert TrainSettings().gradient_checkpointing == "auto"
    assert TrainSettings(gradient_checkpointing="false").gradient_checkpointing is False
    assert TrainSettings.from_config({"gradient_checkpointing": True}).gradient_checkpointing is True
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        TrainSettings(gradient_checkpointing="sometimes")
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        TrainSettings(gradient_checkpointing=1)
    assert not use_gradient_checkpointing("auto", 3_500_000)  # the tiny default
    assert not use_gradient_checkpointing("auto", GC_AUTO_PARAMS - 1)
    assert use_gradient_checkpointing("auto", GC_AUTO_PARAMS)
    assert use_gradient_checkpointing("auto", 596_049_920)  # Qwen3-0.6B's shape
    assert use_gradient_checkpointing(True, 1) and not use_gradient_checkpointing(False, 10**10)


def test_callback_reports_tokens_per_second_from_the_first_step(tmp_path):
    """tokens/s was nan on the first logged step (no previous count) and for distilled runs (their
    loss did not count tokens): the callback starts from 0 at train begin."""
    import csv

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from qatforge import train as T

    cb = T.make_callback(tmp_path / "loss.csv", T.TrainSettings(), lambda m: None)
    state, args = TrainerState(), TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state.max_steps = 2
    cb.on_train_begin(args, state, TrainerControl())
    for step in (1, 2):
        state.global_step = step
        cb.on_log(args, state, TrainerControl(), logs={"loss": 1.0, "grad_norm": 1.0, "learning_rate": 1e-3,
                                                       "num_tokens": 100.0 * step})
    cb.on_train_end(args, state, TrainerControl())
    rates = [float(r["tokens_per_s"]) for r in csv.DictReader(open(tmp_path / "loss.csv"))]
    assert len(rates) == 2 and all(r > 0 for r in rates)

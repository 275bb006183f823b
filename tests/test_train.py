"""LoRA / QAT training with trl's SFTTrainer on a tiny random Qwen3: outputs, labels, resume, divergence."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qatforge import train as T

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(max_steps=6, save_steps=2, batch_size=4, lr=1e-3, lora_r=4, lora_alpha=8, threads=1,
                max_len=96, eval_rows=8, seed=7, backend="hf")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny random base (1 layer, hidden 256) and a train/dev/test split of 240 shipped conversations."""
    import torch

    from qatforge import data, tiny

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("train")
    src = root / "chat.jsonl"
    src.write_text("\n".join((ROOT / "data/chat.jsonl").read_text().splitlines()[:240]) + "\n")
    data.prepare(src, *(root / f"{s}.parquet" for s in data.SPLITS), dev_fraction=0.1, test_fraction=0.1,
                 max_tokens=256)
    convs = data.read_conversations(root / "train.parquet")
    tok = tiny.build_tokenizer((t for c in convs for m in c for t in (m["role"] + "\n", m["content"])), vocab_size=300)
    model = tiny.build_model(tok, layers=1, intermediate=256, seed=1)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root


def _run(env, name, log=None, **over):
    settings = T.TrainSettings(**{**SETTINGS, **over})
    msgs = []
    summary = T.train_run(env / "base", env / "train.parquet", env / "dev.parquet", env / name, settings,
                          work_dir=env / f"{name}.work", log=log or msgs.append)
    return summary, msgs


@pytest.fixture(scope="module")
def baseline(env):
    return _run(env, "baseline")


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_train_writes_checkpoints_state_and_loss_csv(env, baseline):
    summary, msgs = baseline
    out = env / "baseline"
    assert summary["checkpoints"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for c in summary["checkpoints"]:
        assert (out / c / "adapter_model.safetensors").is_file() and (out / c / "adapter_config.json").is_file()
        assert json.loads((out / c / "trainer_state.json").read_text())["global_step"] == int(c.split("-")[1])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert list(rows[0]) == list(T.LOSS_FIELDS)
    assert all(float(r["loss"]) > 0 and float(r["grad_norm"]) > 0 for r in rows)
    assert float(rows[-1]["tokens_per_s"]) > 0
    assert json.loads((out / "train.json").read_text())["global_step"] == 6
    assert summary["fake_quantized_modules"] == 0 and summary["resumed_from_step"] is None
    assert not (env / "baseline.work").exists()  # moved into the output, work dir removed
    assert any(m.startswith("step 1/6") for m in msgs)  # dense early logging
    # Training changed the adapters (LoRA B starts at zero).
    assert any(float(v.abs().max()) > 0 for k, v in _adapter(out / "checkpoint-6").items() if "lora_B" in k)


def test_qat_training_fake_quantizes(env):
    summary, msgs = _run(env, "qat", max_steps=2, save_steps=2, qat_scheme="phone-deployment")
    # merge-exact (the default): the 7 LoRA linears, plus torchao's lm_head and embedding
    assert summary["fake_quantized_modules"] == 9 and summary["settings"]["qat_mode"] == "merged"
    assert summary["settings"]["qat_scheme"] == "int8-int4"
    assert any("7 LoRA linears fake-quantize round(W + s·B·A)" in m for m in msgs)
    assert (env / "qat" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    summary, msgs = _run(env, "qat_unsloth", max_steps=2, save_steps=2, qat_scheme="int8-int4", qat_mode="unsloth")
    assert summary["fake_quantized_modules"] == 9 and any("9 modules fake-quantized" in m for m in msgs)


def test_learned_block_scales_train_and_are_saved(env):
    """qat.block_scales learned (gguf-q4_0): every Q4_0 linear trains a θ per block of 32 through
    the generic autograd path; the checkpoint carries it beside lora_A/lora_B."""
    summary, msgs = _run(env, "qat_lsq", max_steps=2, save_steps=2, qat_scheme="gguf-q4_0", block_scales="learned")
    assert any("7 of them learn their Q4_0 block scales" in m for m in msgs), msgs
    assert summary["settings"]["block_scales"] == "learned"
    thetas = {k: v for k, v in _adapter(env / "qat_lsq" / "checkpoint-2").items() if k.endswith(".lora_qat_scale")}
    assert len(thetas) == 7 and all(v.shape[1] * 32 in (256, 512) for v in thetas.values())
    assert all(float(v.abs().max()) > 0 for v in thetas.values())  # trained away from llama.cpp's own scales
    from qatforge.qat import QATError

    with pytest.raises(QATError, match="block_scales learned is for GGUF Q4_0, ONNX int4"):
        _run(env, "lsq_int8", max_steps=1, save_steps=1, qat_scheme="int8", block_scales="learned")


def test_distilled_qat_starts_at_the_teacher(env, baseline):
    """Distillation with kd_alpha 1: the student is the teacher plus a zero adapter, so the first
    loss is only the quantization's KL, far below the cross-entropy a fine-tune starts from."""
    summary, msgs = _run(env, "qat_kd", max_steps=2, save_steps=2, qat_scheme="int8-int4", distill=True, kd_alpha=1.0)
    assert any("distilling from the teacher" in m for m in msgs)
    # the LoRA base weights are the teacher's (float32 from the same file): held once
    shares = [float(m.split()[3].replace(",", "")) for m in msgs if m.startswith("the teacher shares")]
    assert len(shares) == 1 and shares[0] > 0, msgs
    first = [float(r["loss"]) for r in csv.DictReader(open(env / "qat_kd" / "loss.csv"))][0]
    ce = [float(r["loss"]) for r in csv.DictReader(open(env / "baseline" / "loss.csv"))][0]
    assert 0 < first < 0.05 * ce
    assert summary["adapted_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert any("gradient checkpointing off (auto" in m for m in msgs)
    rates = [float(r["tokens_per_s"]) for r in csv.DictReader(open(env / "qat_kd" / "loss.csv"))]
    assert all(r > 0 for r in rates), rates  # the KD loss counts tokens too


def test_gradient_checkpointing_trains_the_same_adapter(env):
    """Checkpointed decoder layers (train.gradient_checkpointing: true) on a distilled merge-exact
    run: the same losses and adapter as the plain run (up to float rounding)."""
    import torch

    kw = dict(max_steps=2, save_steps=2, qat_scheme="int8-int4", distill=True, kd_alpha=1.0)
    runs = {}
    for gc in (False, True):
        _, msgs = _run(env, f"qat_kd_gc{int(gc)}", gradient_checkpointing=gc, **kw)
        assert any(f"gradient checkpointing {'on' if gc else 'off'} ({gc}" in m for m in msgs)
        runs[gc] = ([float(r["loss"]) for r in csv.DictReader(open(env / f"qat_kd_gc{int(gc)}" / "loss.csv"))],
                    _adapter(env / f"qat_kd_gc{int(gc)}" / "checkpoint-2"))
    (plain_loss, plain), (gc_loss, ckpt) = runs[False], runs[True]
    assert gc_loss == pytest.approx(plain_loss, rel=1e-5)
    for k in plain:
        assert float((ckpt[k] - plain[k]).norm()) <= 1e-4 * float(plain[k].norm()) + 1e-8, k


def test_lora_target_that_matches_nothing_fails_before_training(env):
    with pytest.raises(T.TrainingError, match=r"\['qkv_proj'\] match no module.*'q_proj'"):
        _run(env, "bad_targets", target_modules=("q_proj", "qkv_proj"))
    assert not (env / "bad_targets").exists()


def test_trainer_keeps_assistant_only_labels(env):
    """trl must not re-tokenize or re-mask: the collated labels are exactly encode_for_training's."""
    from qatforge.chat import IGNORE_INDEX, encode_for_training
    from qatforge.data import read_conversations
    from qatforge.model import load_tokenizer

    tok = load_tokenizer(env / "base")
    convs = read_conversations(env / "train.parquet")[:3]
    rows = T.tokenize_split(tok, convs, 96, "train")
    assert rows[0] == encode_for_training(tok, convs[0], 96)
    settings = T.TrainSettings(**SETTINGS)
    trainer, _ = T.build_trainer(env / "base", rows, [], env / "labels.work", settings, log=lambda m: None)
    assert [trainer.train_dataset[i]["input_ids"] for i in range(3)] == [r["input_ids"] for r in rows]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    for i, r in enumerate(rows):
        n = len(r["labels"])
        assert batch["labels"][i, :n].tolist() == r["labels"]
        assert set(batch["labels"][i, n:].tolist()) <= {IGNORE_INDEX}
    # Only assistant content (and its end-of-turn token) is trained on.
    kept = tok.decode([t for t in rows[0]["labels"] if t != IGNORE_INDEX])
    first_answer = next(m["content"] for m in convs[0] if m["role"] == "assistant")
    assert kept.startswith(first_answer + "<|im_end|>")
    assert "<|im_start|>" not in kept and "user" not in kept and "system" not in kept


def test_group_by_length_batches_rows_of_similar_length(env):
    """train.sampling: group_by_length gives Hugging Face's length-grouped sampler: every row once per
    epoch, in batches padded less than random ones; random keeps the random sampler."""
    from qatforge.data import read_conversations
    from qatforge.model import load_tokenizer

    tok = load_tokenizer(env / "base")
    rows = T.tokenize_split(tok, read_conversations(env / "train.parquet"), 96, "train")
    padded = {}
    for sampling in ("random", "group_by_length"):
        settings = T.TrainSettings(**{**SETTINGS, "sampling": sampling})
        trainer, _ = T.build_trainer(env / "base", rows, [], env / f"{sampling}.work", settings, log=lambda m: None)
        order = list(trainer._get_train_sampler())
        assert sorted(order) == list(range(len(rows)))
        lengths = [len(rows[i]["input_ids"]) for i in order]
        batches = [lengths[i:i + settings.batch_size] for i in range(0, len(lengths), settings.batch_size)]
        padded[sampling] = sum(max(b) * len(b) - sum(b) for b in batches) / sum(lengths)
    assert padded["group_by_length"] < padded["random"] / 2, padded
    with pytest.raises(ValueError, match="train.sampling 'sorted' is not one of random, group_by_length"):
        T.TrainSettings(sampling="sorted")


def test_resume_after_kill_matches_uninterrupted_run(env, baseline):
    """A SIGKILLed training job rerun resumes from its last complete checkpoint, to identical adapters."""
    out, work = env / "killed", env / "killed.work"
    settings = json.dumps(SETTINGS)
    cmd = [sys.executable, "-m", "qatforge.train", str(env / "base"), str(env / "train.parquet"),
           str(env / "dev.parquet"), str(out), "--work-dir", str(work), "--settings", settings]
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not T.complete_checkpoints(work):
            assert proc.poll() is None, "training finished or failed before the first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = T.complete_checkpoints(work)
    last = T.checkpoint_step(done[-1])
    assert last < 6 and not out.exists()
    summary, msgs = _run(env, "killed")
    assert summary["resumed_from_step"] == last
    assert any(f"resuming from checkpoint-{last}" in m for m in msgs)
    assert summary["steps_this_process"] == 6 - last
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    ref_rows = list(csv.DictReader(open(env / "baseline" / "loss.csv")))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    a, b = _adapter(out / "checkpoint-6"), _adapter(env / "baseline" / "checkpoint-6")
    assert a.keys() == b.keys()
    import torch

    assert all(torch.equal(a[k], b[k]) for k in a)


OOM_SCRIPT = """
import json, resource, sys
from qatforge import train as T
env, big = sys.argv[1], int(sys.argv[2])

# Rows of ~12 exchanges (near max_len) and more of them than the big batch, so the batch's memory
# does not depend on how short the shipped conversations happen to be.
import polars as pl
from qatforge import data
convs = data.read_conversations(env + "/train.parquet")
rows = [[convs[0][0]] + [m for j in range(12) for m in convs[(i * 7 + j) % len(convs)][1:]] for i in range(big + 52)]
pl.DataFrame({"messages": rows}).write_parquet(env + "/oom_train.parquet")

def run(name, batch):
    s = T.TrainSettings(max_steps=1, save_steps=1, batch_size=batch, lr=1e-3, threads=1, max_len=256,
                        eval_rows=0, backend="hf", lora_r=4, lora_alpha=8)
    return T.train_run(env + "/base", env + "/oom_train.parquet", env + "/dev.parquet", env + "/" + name, s,
                       log=lambda m: None)

run("oom_calib", 2)  # the address space a small batch needs (a second run, as the real one will be) ...
run("oom_calib2", 2)
peak = int(dict(l.split(":", 1) for l in open("/proc/self/status"))["VmPeak"].split()[0]) * 1024
limit = peak + 600 * 2**20  # ... plus 600 MiB: far less than a batch of `big` long rows needs
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
print(json.dumps(run("oom", big)))
"""


def test_out_of_memory_retries_with_half_batch(env):
    """A real allocation failure (address-space limit) → retry with half batch, double accumulation.

    The retry loads its model under the same limit, so this also fails if the failed attempt's
    model and activations are still alive when it does."""
    # One malloc arena: per-thread arenas reserve 64 MiB of address space each. A fixed mmap
    # threshold: glibc's adaptive one moves large blocks freed after an OOM onto the heap, whose
    # address space is not given back, and the retries' model loads (mmaps) then find none left.
    malloc = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run([sys.executable, "-c", OOM_SCRIPT, str(env), "2048"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **malloc}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    retries = summary["oom_retries"]
    assert retries and "allocate memory" in retries[0]["error"]
    assert (retries[0]["batch_size"], retries[0]["grad_accum"]) == (1024, 2)
    s = summary["settings"]
    assert s["batch_size"] < 2048 and s["batch_size"] * s["grad_accum"] == 2048  # same effective batch
    assert summary["checkpoints"] == ["checkpoint-1"]


def test_stale_work_dir_is_discarded(env):
    """A work dir left by other settings is not resumed from."""
    work = env / "stale.work"
    (work / "checkpoint-2").mkdir(parents=True)
    (work / "fingerprint.txt").write_text("other\n")
    summary, msgs = _run(env, "stale", max_steps=2, save_steps=2)
    assert summary["resumed_from_step"] is None
    assert any("discarding" in m for m in msgs)


def test_nan_divergence_stops_with_the_step(env):
    """An absurd learning rate overflows the adapters to inf/NaN within a few steps: stop, name the step."""
    with pytest.raises(T.TrainingDiverged, match=r"diverged at step \d+: .*non-finite"):
        _run(env, "diverge", max_steps=20, save_steps=20, lr=1e30, eval_rows=0)
    assert not (env / "diverge").exists()
    rows = list(csv.DictReader(open(env / "diverge.work" / "loss.csv")))
    assert "nan" in (rows[-1]["loss"], rows[-1]["grad_norm"])


def _feed(tmp_path, losses, **over):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    settings = T.TrainSettings(**{**SETTINGS, "dense_steps": 2, **over})
    cb = T.make_callback(tmp_path / "loss.csv", settings, lambda m: None)
    state = TrainerState()
    state.max_steps = len(losses)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    try:
        for i, loss in enumerate(losses, start=1):
            state.global_step = i
            cb.on_log(args, state, TrainerControl(), logs={"loss": loss, "grad_norm": 1.0, "learning_rate": 1e-3})
    finally:
        cb.on_train_end(args, state, TrainerControl())
    return [r["step"] for r in csv.DictReader(open(tmp_path / "loss.csv"))]


def test_divergence_checks_of_the_callback(tmp_path):
    with pytest.raises(T.TrainingDiverged, match="step 2.*non-finite"):
        _feed(tmp_path / "a", [2.0, float("nan"), 1.0])
    assert _feed(tmp_path / "b", [2.0, 1.5, 1.0, 0.8, 0.9, 0.7, 0.75]) == [str(i) for i in range(1, 8)]
    with pytest.raises(T.TrainingDiverged, match=r"step \d+: smoothed loss .* running minimum"):
        _feed(tmp_path / "c", [2.0, 1.0, 0.5, 0.4, 0.4, 9.0, 9.0, 9.0, 9.0])
    steps = [r["step"] for r in csv.DictReader(open(tmp_path / "c" / "loss.csv"))]
    assert steps[-1] in ("6", "7", "8", "9")  # the bad step is recorded before stopping


def test_unsupported_scheme_fails_before_training(env):
    t0 = time.perf_counter()
    with pytest.raises(T.TrainingError, match="fp8-fp8.*CPU"):
        _run(env, "fp8", qat_scheme="fp8-fp8")
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ValueError, match="unknown qat scheme"):
        T.TrainSettings(qat_scheme="int3-int5")


def test_settings_from_config_and_backend():
    import yaml

    from qatforge.spec import config as qcfg

    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    s = T.TrainSettings.from_config(qcfg.train_settings(cfg, "qat-int8-int4"), threads=2, max_len=256)
    own = cfg["runs"]["qat-int8-int4"]["train"]["lora"]  # its rank over the train.lora defaults
    assert (s.lora_r, s.lora_alpha, s.lora_dropout) == (own["r"], own["alpha"], cfg["train"]["lora"]["dropout"])
    assert (own["r"], own["alpha"]) != (cfg["train"]["lora"]["r"], cfg["train"]["lora"]["alpha"])
    assert s.target_modules == T.DEFAULT_TARGETS and s.qat_scheme == "int8-int4" and s.seed == cfg["seed"]
    # the QAT run's own overrides: 120 steps at lr 1e-3, distilled, merge-exact
    assert s.max_steps == cfg["runs"]["qat-int8-int4"]["train"]["max_steps"] and s.lr == 1e-3
    assert s.distill and s.qat_mode == "merged"
    b = T.TrainSettings.from_config(qcfg.train_settings(cfg, "baseline"))
    assert b.max_steps == cfg["train"]["max_steps"] and b.lr == cfg["train"]["lr"] and not b.distill
    with pytest.raises(ValueError, match="train.batch_size"):
        T.TrainSettings(batch_size=0)
    assert T.resolve_backend("hf") == "hf"
    assert T.resolve_backend("auto") == "hf"  # no CUDA here
    with pytest.raises(ValueError, match="backend"):
        T.resolve_backend("deepspeed")
    if not __import__("importlib").util.find_spec("unsloth"):
        with pytest.raises(T.TrainingError, match="unsloth is not installed"):
            T.resolve_backend("unsloth")


@pytest.mark.skipif(os.environ.get("QATFORGE_TEST_UNSLOTH") != "1", reason="make test-unsloth only (installs unsloth)")
def test_unsloth_backend_trains_qat_on_cpu(env):
    """Unsloth's FastLanguageModel path on CPU (no GPU here): it drops qat_scheme on CPU, so the torchao
    preparation must be applied by qatforge; runs in a fresh interpreter so unsloth is imported first."""
    out = env / "unsloth"
    settings = json.dumps({**SETTINGS, "backend": "unsloth", "qat_scheme": "int8-int4", "max_steps": 2, "save_steps": 2})
    proc = subprocess.run(
        [sys.executable, "-m", "qatforge.train", str(env / "base"), str(env / "train.parquet"), str(env / "dev.parquet"),
         str(out), "--settings", settings],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((out / "train.json").read_text())
    assert summary["backend"] == "unsloth" and summary["fake_quantized_modules"] > 0
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_unsloth_wiring_with_a_stand_in(env, monkeypatch):
    """The unsloth backend's wiring without unsloth (no GPU here): a stand-in ``unsloth`` module whose
    FastLanguageModel loads through transformers and adapts with peft, and, like unsloth on CPU,
    ignores ``qat_scheme``. qatforge must pass transformers-5 arguments (``dtype``), apply the torchao
    preparation itself, and train through trl's SFTTrainer with the model it gets back."""
    import importlib.machinery
    import types

    calls = {}

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(model_name, **kw):
            from qatforge.model import load_causal_lm, load_tokenizer

            calls["from_pretrained"] = kw
            return load_causal_lm(model_name, dtype=kw["dtype"]), load_tokenizer(model_name)

        @staticmethod
        def get_peft_model(model, **kw):
            from peft import LoraConfig, get_peft_model

            calls["get_peft_model"] = kw
            return get_peft_model(model, LoraConfig(r=kw["r"], lora_alpha=kw["lora_alpha"], lora_dropout=kw["lora_dropout"],
                                                    target_modules=kw["target_modules"], bias=kw["bias"],
                                                    task_type="CAUSAL_LM"))

    fake = types.ModuleType("unsloth")
    fake.__spec__ = importlib.machinery.ModuleSpec("unsloth", None)
    fake.FastLanguageModel = FastLanguageModel
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    summary, msgs = _run(env, "unsloth_stand_in", max_steps=2, save_steps=2, backend="unsloth",
                         qat_scheme="int8-int4", qat_mode="unsloth")
    assert summary["backend"] == "unsloth" and summary["fake_quantized_modules"] == 9
    assert any("unsloth applied no fake quantization" in m for m in msgs)
    assert "torch_dtype" not in calls["from_pretrained"] and calls["from_pretrained"]["load_in_4bit"] is False
    assert calls["get_peft_model"]["qat_scheme"] == "int8-int4" and calls["get_peft_model"]["r"] == SETTINGS["lora_r"]
    assert calls["get_peft_model"]["use_gradient_checkpointing"] is False  # auto: off for a tiny model
    assert (env / "unsloth_stand_in" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    _run(env, "unsloth_stand_in_gc", max_steps=1, save_steps=1, backend="unsloth", gradient_checkpointing=True)
    assert calls["get_peft_model"]["use_gradient_checkpointing"] == "unsloth"  # Unsloth's own mode


def test_fake_quantized_lm_head_trains_with_plain_nll(env):
    """trl's chunked_nll multiplies by lm_head.weight itself, skipping a fake-quantized head's quantizers:
    a QAT scheme that quantizes lm_head must train with the plain loss, any other run keeps chunked_nll."""
    from qatforge.train.loop import _loss_type
    from qatforge.train.setup import setup_hf

    plain, _, _ = setup_hf(env / "base", T.TrainSettings(**SETTINGS), lambda m: None)
    assert _loss_type(plain) == "chunked_nll"
    qat, _, n_fq = setup_hf(env / "base", T.TrainSettings(**{**SETTINGS, "qat_scheme": "int8-int4"}), lambda m: None)
    assert n_fq and "FakeQuantized" in type(qat.get_base_model().get_output_embeddings()).__name__
    assert _loss_type(qat) == "nll"

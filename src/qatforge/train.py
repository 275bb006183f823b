"""LoRA (and QAT LoRA) fine-tuning with trl's SFTTrainer: resumable, watched, atomic.

Layout: the trainer writes into ``work_dir`` (outside the declared Snakemake output, so it
survives Snakemake's deletion of a failed job's outputs); a rerun resumes from the last complete
``checkpoint-{step}``; on success every checkpoint, ``trainer_state.json``, ``loss.csv`` and
``train.json`` are moved into ``out_dir`` atomically and ``work_dir`` is removed.

torch/transformers/trl/peft are imported inside functions; unsloth only for ``backend: unsloth``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

ALL_LINEAR = "all-linear"  # peft's own option: every linear layer except the output head
DEFAULT_TARGETS = ALL_LINEAR
BACKENDS = ("auto", "hf", "unsloth")
LOSS_CSV = "loss.csv"
LOSS_FIELDS = ("step", "loss", "grad_norm", "lr", "tokens_per_s", "elapsed_s")
CHECKPOINT_FILES = ("adapter_config.json", "trainer_state.json")


class TrainingError(RuntimeError):
    """Training cannot go on (divergence, bad settings, nothing to train on)."""


class TrainingDiverged(TrainingError):
    """The loss became NaN/inf or climbed far above its running minimum."""


@dataclass
class TrainSettings:
    """Settings of one LoRA run (``config.train`` with the run's overrides)."""

    max_steps: int = 120
    save_steps: int = 40
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] = DEFAULT_TARGETS
    qat_scheme: str | None = None
    qat_mode: str = "merged"  # merged: fq(W + s·B·A) (qatforge.qat_lora); unsloth: fq(W) + s·B·A
    distill: bool = False  # the base is the teacher's merged model; loss as qatforge.distill
    kd_alpha: float = 0.9
    kd_temperature: float = 1.0
    kd_positions: str = "all"
    seed: int = 1234
    threads: int = 2
    max_len: int = 256
    backend: str = "auto"
    log_every: int = 10  # console log period after the dense first ``dense_steps`` steps
    dense_steps: int = 10
    warmup_steps: int | None = None  # None: 5 % of max_steps
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    divergence_factor: float = 3.0  # smoothed loss > factor * running min + divergence_margin → stop
    divergence_margin: float = 1.0
    eval_rows: int = 64  # eval-split rows scored at each checkpoint (0: none)

    def __post_init__(self) -> None:
        if self.target_modules != ALL_LINEAR:
            if isinstance(self.target_modules, str):
                raise ValueError(f"train.lora.target_modules must be {ALL_LINEAR!r} or a list of names, "
                                 f"got {self.target_modules!r}")
            self.target_modules = tuple(self.target_modules)
        for name in ("max_steps", "save_steps", "batch_size", "grad_accum", "lora_r", "threads", "max_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train.lr must be a positive number, got {self.lr!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"train.backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.qat_scheme is not None:
            from qatforge.qat_schemes import canonical

            self.qat_scheme = canonical(self.qat_scheme)
        from qatforge.distill import POSITIONS
        from qatforge.qat_lora import MODES

        if self.qat_mode not in MODES:
            raise ValueError(f"qat.mode {self.qat_mode!r} is not one of {', '.join(MODES)}")
        if self.kd_positions not in POSITIONS:
            raise ValueError(f"qat.kd_positions {self.kd_positions!r} is not one of {', '.join(POSITIONS)}")
        if not (0.0 <= self.kd_alpha <= 1.0) or not self.kd_temperature > 0:
            raise ValueError(f"qat.kd_alpha must be in [0, 1] and qat.kd_temperature > 0, got "
                             f"{self.kd_alpha!r}, {self.kd_temperature!r}")

    @classmethod
    def from_config(cls, train: Mapping[str, Any], **extra: Any) -> "TrainSettings":
        """From ``qatforge.config.train_settings(config, run)`` (nested ``lora:``); unknown keys ignored."""
        lora = dict(train.get("lora") or {})
        kw: dict[str, Any] = {k: v for k, v in train.items() if k in _FIELDS and k != "lora"}
        for src, dst in (("r", "lora_r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout"),
                         ("target_modules", "target_modules")):
            if src in lora:
                kw[dst] = lora[src]
        kw.update(extra)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = self.target_modules if self.target_modules == ALL_LINEAR else list(self.target_modules)
        return d


_FIELDS = {f.name for f in dataclasses.fields(TrainSettings)}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(name: str) -> str:
    """``hf`` or ``unsloth``: ``auto`` picks unsloth when CUDA is available and ``import unsloth`` works."""
    if name not in BACKENDS:
        raise ValueError(f"unknown training backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        if name == "unsloth" and importlib.util.find_spec("unsloth") is None:
            raise TrainingError("train.backend is 'unsloth' but unsloth is not installed (pip install '.[unsloth]')")
        return name
    if importlib.util.find_spec("unsloth") is None or not cuda_available():
        return "hf"
    try:
        import unsloth  # noqa: F401
    except Exception:  # unsloth raises plain Exceptions when no supported accelerator is found
        return "hf"
    return "unsloth"


# --------------------------------------------------------------------------- data


def tokenize_split(tokenizer: Any, conversations: list, max_len: int, source: str) -> list[dict]:
    """Pre-tokenized rows {input_ids, labels} (assistant-only labels); rows without targets dropped."""
    from qatforge.chat import IGNORE_INDEX, encode_for_training

    rows = []
    for i, conv in enumerate(conversations):
        try:
            r = encode_for_training(tokenizer, conv, max_len)
        except (ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"{source}: row {i}: cannot encode conversation: {e}") from e
        if any(x != IGNORE_INDEX for x in r["labels"][1:]):
            rows.append(r)
    if not rows:
        raise TrainingError(f"{source}: no conversation has assistant tokens within max_len={max_len}")
    return rows


# --------------------------------------------------------------------------- work dir / resume


def _fingerprint(base_dir: Path, train_parquet: Path, eval_parquet: Path, settings: TrainSettings) -> str:
    """Identity of a run's inputs (file names, sizes, mtimes) and settings; decides if resuming is valid."""
    h = hashlib.sha256(json.dumps(settings.to_dict(), sort_keys=True).encode())
    for p in (base_dir, train_parquet, eval_parquet):
        files = sorted(q for q in (p.rglob("*") if p.is_dir() else [p]) if q.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith("checkpoint-"):
        return None
    tail = name[len("checkpoint-"):]
    return int(tail) if tail.isdigit() else None


def complete_checkpoints(root: Path) -> list[Path]:
    """``checkpoint-{step}`` dirs under ``root`` that were fully written, by step.

    The HF Trainer writes ``trainer_state.json`` last, so a checkpoint whose state file is
    missing or unparsable was interrupted while being saved.
    """
    out = []
    if not root.is_dir():
        return out
    for d in root.iterdir():
        step = checkpoint_step(d)
        if step is None or not d.is_dir():
            continue
        if not all((d / f).is_file() for f in CHECKPOINT_FILES):
            continue
        try:
            state = json.loads((d / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if state.get("global_step") == step:
            out.append(d)
    return sorted(out, key=lambda p: checkpoint_step(p))


def _prepare_work_dir(work_dir: Path, fingerprint: str, log: Callable[[str], None]) -> Path | None:
    """Keep ``work_dir`` when it belongs to the same inputs/settings; return the checkpoint to resume."""
    stamp = work_dir / "fingerprint.txt"
    if work_dir.exists():
        old = stamp.read_text().strip() if stamp.is_file() else None
        if old != fingerprint:
            log(f"discarding {work_dir}: it was made from other inputs or settings")
            shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")
    done = complete_checkpoints(work_dir)
    for d in work_dir.iterdir():  # interrupted saves
        if checkpoint_step(d) is not None and d not in done:
            log(f"removing incomplete checkpoint {d.name}")
            shutil.rmtree(d, ignore_errors=True)
    return done[-1] if done else None


def _trim_loss_csv(path: Path, last_step: int) -> None:
    """Drop loss rows after ``last_step`` (they are recomputed when resuming from it)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= last_step]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOSS_FIELDS)
        w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------- callbacks


def _make_callback(loss_csv: Path, settings: TrainSettings, log: Callable[[str], None]) -> Any:
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        """Per-step loss.csv, dense console logging early, NaN/divergence stop."""

        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.last_t = self.t0
            self.last_tokens: float | None = None
            self.ema: float | None = None
            self.min_ema = math.inf
            self.f: Any = None
            self.w: Any = None

        def _write(self, rec: dict) -> None:
            if self.f is None:  # append: a resumed run continues the trimmed file
                loss_csv.parent.mkdir(parents=True, exist_ok=True)
                new = not loss_csv.is_file()
                self.f = open(loss_csv, "a", newline="")
                self.w = csv.DictWriter(self.f, fieldnames=LOSS_FIELDS)
                if new:
                    self.w.writeheader()
            self.w.writerow(rec)
            self.f.flush()

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            logs = logs or {}
            if "loss" not in logs:
                if "eval_loss" in logs:
                    log(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")
                return
            step = state.global_step
            now = time.perf_counter()
            tokens = logs.get("num_tokens")
            tps = float("nan")
            if tokens is not None:
                delta = tokens - self.last_tokens if self.last_tokens is not None and tokens >= self.last_tokens else None
                if delta is not None and now > self.last_t:
                    tps = delta / (now - self.last_t)
                self.last_tokens = tokens
            self.last_t = now
            loss = float(logs["loss"])
            gn = float(logs.get("grad_norm", float("nan")))
            rec = {"step": step, "loss": f"{loss:.6g}", "grad_norm": f"{gn:.6g}",
                   "lr": f"{float(logs.get('learning_rate', float('nan'))):.6g}",
                   "tokens_per_s": f"{tps:.1f}", "elapsed_s": f"{now - self.t0:.2f}"}
            self._write(rec)
            if step <= settings.dense_steps or step % settings.log_every == 0 or step == state.max_steps:
                log(f"step {step}/{state.max_steps}: loss {loss:.4f} grad_norm {gn:.3g} lr {rec['lr']} "
                    f"tokens/s {rec['tokens_per_s']}")
            if not math.isfinite(loss) or (logs.get("grad_norm") is not None and not math.isfinite(gn)):
                raise TrainingDiverged(
                    f"training diverged at step {step}: loss {loss}, grad_norm {gn} (non-finite); "
                    f"lower train.lr or use another qat_scheme"
                )
            self.ema = loss if self.ema is None else 0.7 * self.ema + 0.3 * loss
            if step > settings.dense_steps and self.ema > settings.divergence_factor * self.min_ema + settings.divergence_margin:
                raise TrainingDiverged(
                    f"training diverged at step {step}: smoothed loss {self.ema:.4f} climbed far above its running "
                    f"minimum {self.min_ema:.4f}; lower train.lr"
                )
            self.min_ema = min(self.min_ema, self.ema)

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            if self.f is not None:
                self.f.close()
                self.f = None

    return Watch()


# --------------------------------------------------------------------------- model setup


def _lora_config(settings: TrainSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules if settings.target_modules == ALL_LINEAR else list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapted_modules(model: Any, targets: str | tuple[str, ...]) -> list[str]:
    """The module names (last path component) the adapter wraps; a listed target that matched no
    module raises ``TrainingError`` naming it and the model's linear layers."""
    import torch
    from peft.tuners.lora import LoraLayer

    wrapped = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)})
    if targets != ALL_LINEAR:
        missing = sorted(set(targets) - set(wrapped))
        if missing:
            linear = sorted({n.removesuffix(".base_layer").rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and "lora_" not in n})
            raise TrainingError(f"train.lora.target_modules {missing} match no module of the model; its linear "
                                f"layers are {linear} (or use {ALL_LINEAR!r})")
    if not wrapped:
        raise TrainingError(f"train.lora.target_modules {targets!r} adapted no module")
    return wrapped


def _dtype_for_device() -> tuple[Any, bool]:
    """(load dtype, bf16 flag): fp32 on CPU (bf16 is 3-7x slower here), bf16 on CUDA that supports it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16, True
    return torch.float32, False


def _setup_hf(base_dir: Path, settings: TrainSettings, log: Callable[[str], None]) -> tuple[Any, Any, int]:
    from peft import get_peft_model
    from transformers import set_seed

    from qatforge.model import load_causal_lm, load_tokenizer

    dtype, _ = _dtype_for_device()
    tok = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir, dtype=dtype)
    model.config.use_cache = False
    set_seed(settings.seed)
    model = get_peft_model(model, _lora_config(settings))
    log(f"LoRA adapts {adapted_modules(model, settings.target_modules)}")
    return model, tok, apply_qat(model, settings, log)


def apply_qat(model: Any, settings: TrainSettings, log: Callable[[str], None]) -> int:
    """Prepare a PEFT model for the run's QAT (``settings.qat_mode``); the number of fake-quantized modules."""
    from qatforge.merge import STORAGE_DTYPE
    from qatforge.qat import prepare_qat
    from qatforge.qat_lora import prepare_merged_qat

    if not settings.qat_scheme:
        return 0
    if settings.qat_mode == "merged":
        info = prepare_merged_qat(model, settings.qat_scheme, storage_dtype=STORAGE_DTYPE, log=log)
        return len(info["merged_linears"]) + info["fake_quantized_other"]
    return prepare_qat(model, settings.qat_scheme, log=log)


def _setup_unsloth(base_dir: Path, settings: TrainSettings, log: Callable[[str], None]) -> tuple[Any, Any, int]:
    """Unsloth's FastLanguageModel path (not run in CI here: needs unsloth, normally a CUDA GPU)."""
    from unsloth import FastLanguageModel  # must come before transformers/trl patch points are used

    from qatforge.qat import count_fake_quantized
    from qatforge.qat_schemes import UNSLOTH_SCHEMES

    dtype, _ = _dtype_for_device()
    model, tok = FastLanguageModel.from_pretrained(
        model_name=str(base_dir),
        max_seq_length=settings.max_len,
        dtype=dtype,
        load_in_4bit=False,
        full_finetuning=False,
        trust_remote_code=False,
    )
    # merged mode: Unsloth's PEFT model gets the same merged-forward modules as the hf backend
    unsloth_scheme = (settings.qat_scheme if settings.qat_scheme in UNSLOTH_SCHEMES and settings.qat_mode == "unsloth"
                      else None)
    model = FastLanguageModel.get_peft_model(
        model,
        r=settings.lora_r,
        target_modules=settings.target_modules if settings.target_modules == ALL_LINEAR else list(settings.target_modules),
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        bias="none",
        use_gradient_checkpointing=False,
        random_state=settings.seed,
        use_rslora=False,
        loftq_config=None,
        qat_scheme=unsloth_scheme,
    )
    log(f"LoRA adapts {adapted_modules(model, settings.target_modules)}")
    n_fq = count_fake_quantized(model)
    if settings.qat_scheme and n_fq == 0:
        if settings.qat_mode == "unsloth":
            log(f"unsloth applied no fake quantization for qat_scheme={settings.qat_scheme!r} "
                "(it drops qat_scheme on CPU and knows no explicit specs): applying the torchao preparation")
        n_fq = apply_qat(model, settings, log)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok, n_fq


# --------------------------------------------------------------------------- training


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or "can't allocate memory" in msg or isinstance(e, MemoryError)
    )


def _loss_type(model: Any) -> str:
    """trl's default ``chunked_nll`` (the LM head on answer tokens only, in chunks), or plain
    ``nll`` where that path cannot find the decoder: it runs ``base_model``, which on transformers 4.x
    is the causal LM itself for classes whose ``base_model_prefix`` names no attribute (e.g.
    ``Gemma3ForCausalLM``: "language_model" vs ``.model``)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "nll" if inner.base_model is inner else "chunked_nll"


def build_trainer(
    base_dir: str | os.PathLike,
    train_rows: list[dict],
    eval_rows: list[dict],
    work_dir: str | os.PathLike,
    settings: TrainSettings,
    *,
    backend: str = "hf",
    log: Callable[[str], None] = print,
) -> tuple[Any, int]:
    """The configured ``SFTTrainer`` (LoRA model, QAT applied, callbacks) and the fake-quant count.

    Rows are pre-tokenized ``{input_ids, labels}``; trl 1.14 treats a dataset with ``input_ids``
    as processed (no re-tokenization) and its collator keeps given ``labels`` (pads with -100).
    """
    import datasets
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback

    datasets.disable_progress_bars()
    work_dir = Path(work_dir)
    setup = _setup_unsloth if backend == "unsloth" else _setup_hf
    model, tok, n_fq = setup(Path(base_dir), settings, log)
    from trl import SFTConfig, SFTTrainer  # after unsloth's import when that backend is used

    _, bf16 = _dtype_for_device()
    warmup = settings.warmup_steps if settings.warmup_steps is not None else settings.max_steps // 20
    do_eval = settings.eval_rows > 0 and bool(eval_rows)
    args = SFTConfig(
        output_dir=str(work_dir),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=max(settings.batch_size, 16),
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        lr_scheduler_type=settings.scheduler,
        warmup_steps=warmup,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        optim="adamw_torch",
        logging_steps=1,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # NaN/inf losses must reach the divergence check
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=None,
        save_only_model=False,
        eval_strategy="steps" if do_eval else "no",
        eval_steps=settings.save_steps if do_eval else None,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=bf16,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=settings.max_len,
        packing=False,
        assistant_only_loss=False,  # labels are pre-masked by qatforge.chat.encode_for_training
        completion_only_loss=False,
        gradient_checkpointing=False,
        remove_unused_columns=True,
        save_safetensors=True,
        loss_type=_loss_type(model),
    )
    trainer_cls, extra = SFTTrainer, {}
    if settings.distill:
        from qatforge.distill import kd_trainer_class
        from qatforge.model import load_causal_lm

        teacher = load_causal_lm(base_dir, dtype=_dtype_for_device()[0]).eval()
        teacher.requires_grad_(False)
        trainer_cls = kd_trainer_class(SFTTrainer)
        extra = {"teacher": teacher, "alpha": settings.kd_alpha, "temperature": settings.kd_temperature,
                 "positions": settings.kd_positions}
        log(f"distilling from the teacher {base_dir} (alpha {settings.kd_alpha}, T {settings.kd_temperature}, "
            f"{settings.kd_positions} positions); the student starts from it with a zero adapter")
    trainer = trainer_cls(
        **extra,
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if do_eval else None,
        processing_class=tok,
        callbacks=[_make_callback(work_dir / LOSS_CSV, settings, log)],
    )
    trainer.remove_callback(PrinterCallback)  # our callback logs; no raw dicts on stdout
    return trainer, n_fq


def _train_once(
    base_dir: Path,
    train_rows: list[dict],
    eval_rows: list[dict],
    work_dir: Path,
    settings: TrainSettings,
    backend: str,
    resume: Path | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    trainer, n_fq = build_trainer(base_dir, train_rows, eval_rows, work_dir, settings, backend=backend, log=log)
    t0 = time.perf_counter()
    start_step = checkpoint_step(resume) if resume else 0
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    state = trainer.state
    done = complete_checkpoints(work_dir)
    if not done or checkpoint_step(done[-1]) != state.global_step:  # HF saves the last step itself
        raise TrainingError(f"{work_dir}: no complete checkpoint of the final step {state.global_step}")
    state.save_to_json(str(work_dir / "trainer_state.json"))
    steps_run = state.global_step - start_step
    return {
        "global_step": state.global_step,
        "steps_this_process": steps_run,
        "train_seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / steps_run, 4) if steps_run else None,
        "final_loss": result.training_loss if steps_run else None,
        "fake_quantized_modules": n_fq,
        "adapted_modules": adapted_modules(trainer.model, settings.target_modules),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def train_run(
    base_dir: str | os.PathLike,
    train_parquet: str | os.PathLike,
    eval_parquet: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: TrainSettings,
    *,
    work_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune LoRA adapters on ``train_parquet``; write checkpoints, state and loss.csv to ``out_dir``.

    ``work_dir`` (default: ``.<out_dir name>-work`` beside ``out_dir``) holds the in-progress run;
    a rerun with the same inputs and settings resumes from its last complete checkpoint. On an
    out-of-memory error the run restarts from its last checkpoint with half the per-device batch
    and twice the gradient accumulation (same effective batch), recorded in ``train.json``.
    Returns the summary also written to ``out_dir/train.json``.
    """
    import torch

    from qatforge.data import read_conversations
    from qatforge.io import atomic_dir, package_versions, write_json
    from qatforge.qat_schemes import detect_cuda_capability, device_support

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    train_parquet, eval_parquet = Path(train_parquet), Path(eval_parquet)
    work_dir = Path(work_dir) if work_dir else out_dir.parent / f".{out_dir.name}-work"
    settings = dataclasses.replace(settings)  # OOM retries change the copy, never the caller's
    if settings.qat_scheme:
        ok, reason = device_support(settings.qat_scheme, detect_cuda_capability())
        if not ok:
            raise TrainingError(reason)
    torch.set_num_threads(settings.threads)
    backend = resolve_backend(settings.backend)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers/trl/peft are imported, so its patches apply)
    log(f"training backend: {backend} (asked: {settings.backend}); qat_scheme: {settings.qat_scheme}")

    fingerprint = _fingerprint(base_dir, train_parquet, eval_parquet, settings)
    resume = _prepare_work_dir(work_dir, fingerprint, log)
    if resume is not None:
        log(f"resuming from {resume.name} in {work_dir}")
        _trim_loss_csv(work_dir / LOSS_CSV, checkpoint_step(resume))
    elif (work_dir / LOSS_CSV).exists():
        (work_dir / LOSS_CSV).unlink()
    resumed_from = checkpoint_step(resume) if resume else None

    from qatforge.model import load_tokenizer

    tok = load_tokenizer(base_dir)
    train_rows = tokenize_split(tok, read_conversations(train_parquet), settings.max_len, str(train_parquet))
    eval_rows = tokenize_split(tok, read_conversations(eval_parquet), settings.max_len, str(eval_parquet))
    eval_rows = eval_rows[: settings.eval_rows]

    oom_retries: list[dict] = []
    t0 = time.perf_counter()
    while True:
        try:
            info = _train_once(base_dir, train_rows, eval_rows, work_dir, settings, backend, resume, log)
            break
        except TrainingError:
            raise
        except Exception as e:  # noqa: BLE001 - only OOM is retried, everything else re-raised
            if not _is_oom(e) or settings.batch_size <= 1:
                raise
            done = complete_checkpoints(work_dir)
            resume = done[-1] if done else None
            step = checkpoint_step(resume) if resume else 0
            if resume is not None:
                _trim_loss_csv(work_dir / LOSS_CSV, step)
            retry = {"error": f"{type(e).__name__}: {str(e)[:200]}", "batch_size": settings.batch_size // 2,
                     "grad_accum": settings.grad_accum * 2, "resume_step": step}
            oom_retries.append(retry)
            log(f"out of memory at batch {settings.batch_size}: retrying from step {step} with batch "
                f"{retry['batch_size']} x grad_accum {retry['grad_accum']}")
            settings.batch_size, settings.grad_accum = retry["batch_size"], retry["grad_accum"]
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    checkpoints = complete_checkpoints(work_dir)
    summary = {
        **info,
        "backend": backend,
        "settings": settings.to_dict(),
        "resumed_from_step": resumed_from,
        "oom_retries": oom_retries,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "checkpoints": [p.name for p in checkpoints],
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "versions": package_versions("torch", "transformers", "trl", "peft", "torchao", "accelerate", "unsloth"),
    }
    with atomic_dir(out_dir) as tmp:
        for ckpt in checkpoints:
            os.replace(ckpt, tmp / ckpt.name)
        for name in ("trainer_state.json", LOSS_CSV):
            if (work_dir / name).is_file():
                os.replace(work_dir / name, tmp / name)
        write_json(tmp / "train.json", summary)
    shutil.rmtree(work_dir, ignore_errors=True)
    log(f"trained {summary['global_step']} steps in {summary['wall_seconds']} s; checkpoints: {summary['checkpoints']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m qatforge.train BASE TRAIN EVAL OUT [--work-dir D] [--settings JSON]``."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("base_dir")
    p.add_argument("train_parquet")
    p.add_argument("eval_parquet")
    p.add_argument("out_dir")
    p.add_argument("--work-dir")
    p.add_argument("--settings", default="{}", help="TrainSettings fields as a JSON object")
    a = p.parse_args(argv)
    settings = TrainSettings(**json.loads(a.settings))
    summary = train_run(a.base_dir, a.train_parquet, a.eval_parquet, a.out_dir, settings,
                        work_dir=a.work_dir, log=lambda m: print(m, flush=True))
    json.dump({k: summary[k] for k in ("global_step", "resumed_from_step", "checkpoints")}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

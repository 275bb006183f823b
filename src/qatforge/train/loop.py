"""The training loop: the configured SFTTrainer, one training attempt, and ``train_run`` (OOM retries, output)."""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from qatforge.train.callbacks import make_callback
from qatforge.train.data import tokenize_split
from qatforge.train.resume import checkpoint_step, complete_checkpoints, fingerprint, prepare_work_dir, trim_loss_csv
from qatforge.train.settings import LOSS_CSV, TrainingError, TrainSettings, resolve_backend
from qatforge.train.setup import adapted_modules, dtype_for_device, setup_hf, setup_unsloth


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
    ``nll`` where that path would compute something else:

    * it cannot find the decoder: it runs ``base_model``, which is the causal LM itself for classes
      whose ``base_model_prefix`` names no attribute (e.g. ``Gemma3ForCausalLM`` on transformers 4.x:
      "language_model" vs ``.model``);
    * the LM head is fake-quantized (a QAT scheme that quantizes ``lm_head``): the chunked path
      multiplies by ``lm_head.weight`` itself, so it would skip the head's fake quantizers and train
      against a float head the export then quantizes.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    if inner.base_model is inner or (head is not None and "FakeQuantized" in type(head).__name__):
        return "nll"
    return "chunked_nll"


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
    setup = setup_unsloth if backend == "unsloth" else setup_hf
    model, tok, n_fq = setup(Path(base_dir), settings, log)
    from trl import SFTConfig, SFTTrainer  # after unsloth's import when that backend is used

    _, bf16 = dtype_for_device()
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
        loss_type=_loss_type(model),
    )
    trainer_cls, extra = SFTTrainer, {}
    if settings.distill:
        from qatforge.distill import kd_trainer_class, share_frozen_tensors
        from qatforge.model import load_causal_lm

        teacher = load_causal_lm(base_dir, dtype=dtype_for_device()[0]).eval()
        teacher.requires_grad_(False)
        shared = share_frozen_tensors(teacher, model)
        log(f"the teacher shares {shared / 2**20:,.1f} MiB of frozen weights with the student (bitwise equal)")
        trainer_cls = kd_trainer_class(SFTTrainer)
        extra = {"teacher": teacher, "alpha": settings.kd_alpha, "temperature": settings.kd_temperature,
                 "positions": settings.kd_positions}
        log(f"distilling from the teacher {base_dir} (alpha {settings.kd_alpha}, T {settings.kd_temperature}, "
            f"{settings.kd_positions} positions); the student starts from it with a zero adapter")
    if settings.sampling == "group_by_length":
        from qatforge.train.sampling import length_grouped

        trainer_cls = length_grouped(trainer_cls)
    trainer = trainer_cls(
        **extra,
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if do_eval else None,
        processing_class=tok,
        callbacks=[make_callback(work_dir / LOSS_CSV, settings, log)],
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
    from qatforge.spec.schemes import detect_cuda_capability, device_support

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

    resume = prepare_work_dir(work_dir, fingerprint(base_dir, train_parquet, eval_parquet, settings), log)
    if resume is not None:
        log(f"resuming from {resume.name} in {work_dir}")
        trim_loss_csv(work_dir / LOSS_CSV, checkpoint_step(resume))
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
                trim_loss_csv(work_dir / LOSS_CSV, step)
            retry = {"error": f"{type(e).__name__}: {str(e)[:200]}", "batch_size": settings.batch_size // 2,
                     "grad_accum": settings.grad_accum * 2, "resume_step": step}
            oom_retries.append(retry)
            log(f"out of memory at batch {settings.batch_size}: retrying from step {step} with batch "
                f"{retry['batch_size']} x grad_accum {retry['grad_accum']}")
            settings.batch_size, settings.grad_accum = retry["batch_size"], retry["grad_accum"]
        # Outside the except clause: only here are `e` and its traceback dropped, and with them the
        # failed attempt's trainer, model and activations, whose reference cycles need a collection.
        # Collected inside the clause, they would stay alive while the retry loads its model.
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

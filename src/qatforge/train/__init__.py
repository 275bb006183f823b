"""LoRA (and QAT LoRA) fine-tuning with trl's SFTTrainer: resumable, watched, atomic.

Layout: the trainer writes into ``work_dir`` (outside the declared Snakemake output, so it
survives Snakemake's deletion of a failed job's outputs); a rerun resumes from the last complete
``checkpoint-{step}``; on success every checkpoint, ``trainer_state.json``, ``loss.csv`` and
``train.json`` are moved into ``out_dir`` atomically and ``work_dir`` is removed.

Modules: ``settings`` (TrainSettings, errors, constants, backend), ``data`` (tokenized rows),
``resume`` (work dir, checkpoints), ``callbacks`` (loss.csv, divergence), ``setup`` (LoRA model,
QAT), ``loop`` (trainer, ``train_run``), ``cli`` (``python -m qatforge.train``).
torch/transformers/trl/peft are imported inside functions; unsloth only for ``backend: unsloth``.
"""

from qatforge.train.callbacks import make_callback
from qatforge.train.cli import main
from qatforge.train.data import tokenize_split
from qatforge.train.loop import build_trainer, train_run
from qatforge.train.resume import checkpoint_step, complete_checkpoints
from qatforge.train.settings import (
    ALL_LINEAR,
    BACKENDS,
    CHECKPOINT_FILES,
    DEFAULT_TARGETS,
    LOSS_CSV,
    LOSS_FIELDS,
    TrainingDiverged,
    TrainingError,
    TrainSettings,
    cuda_available,
    resolve_backend,
)
from qatforge.train.setup import adapted_modules, apply_qat

__all__ = [
    "ALL_LINEAR", "BACKENDS", "CHECKPOINT_FILES", "DEFAULT_TARGETS", "LOSS_CSV", "LOSS_FIELDS",
    "TrainSettings", "TrainingDiverged", "TrainingError", "adapted_modules", "apply_qat", "build_trainer",
    "checkpoint_step", "complete_checkpoints", "cuda_available", "main", "make_callback", "resolve_backend",
    "tokenize_split", "train_run",
]

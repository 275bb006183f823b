"""Settings of one LoRA run (``TrainSettings``), its errors, constants and backend choice."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Mapping

ALL_LINEAR = "all-linear"  # peft's own option: every linear layer except the output head
DEFAULT_TARGETS = ALL_LINEAR
BACKENDS = ("auto", "hf", "unsloth")
SAMPLINGS = ("random", "group_by_length")  # train.sampling (qatforge.train.sampling)
LOSS_CSV = "loss.csv"
LOSS_FIELDS = ("step", "loss", "grad_norm", "lr", "tokens_per_s", "elapsed_s")
CHECKPOINT_FILES = ("adapter_config.json", "trainer_state.json")
# train.gradient_checkpointing: auto turns it on from this many base parameters. Measured at Qwen3-0.6B's
# shape (batch 16 x ~55 tokens, float32): the activations a decoder layer keeps for backward are ~150 MiB,
# ~170 KB a token (~42 floats per hidden unit), so ~1 GiB at the default batch once hidden x layers
# reaches ~6,000 (e.g. hidden 512 x 12 layers, ~40M parameters; 4 GiB at 0.6B's 28 layers): past the
# 1 GiB margin over the weights; auto starts at half that size, as longer chats scale it up. The tiny
# default (3.5M, hidden 256 x 4) keeps ~0.15 GiB: off, recomputing would cost ~30 % compute for nothing.
GC_AUTO_PARAMS = 20_000_000


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
    block_scales: str = "format"  # learned: Q4_0 block scales trained with the adapter (qatforge.learned_scales)
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
    gradient_checkpointing: str | bool = "auto"  # auto: on from GC_AUTO_PARAMS base parameters
    sampling: str = "random"  # or group_by_length: batches of rows of similar length (less padding)

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
        gc = self.gradient_checkpointing
        if isinstance(gc, str) and gc.lower() in ("true", "false"):
            self.gradient_checkpointing = gc = gc.lower() == "true"
        if not (gc == "auto" or isinstance(gc, bool)):
            raise ValueError(f"train.gradient_checkpointing must be auto, true or false, got {gc!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"train.sampling {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"train.backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.qat_scheme is not None:
            from qatforge.spec.schemes import canonical

            self.qat_scheme = canonical(self.qat_scheme)
        from qatforge.distill import POSITIONS
        from qatforge.qat_lora import MODES

        if self.qat_mode not in MODES:
            raise ValueError(f"qat.mode {self.qat_mode!r} is not one of {', '.join(MODES)}")
        if self.block_scales not in ("format", "learned"):
            raise ValueError(f"qat.block_scales {self.block_scales!r} is not one of format, learned")
        if self.kd_positions not in POSITIONS:
            raise ValueError(f"qat.kd_positions {self.kd_positions!r} is not one of {', '.join(POSITIONS)}")
        if not (0.0 <= self.kd_alpha <= 1.0) or not self.kd_temperature > 0:
            raise ValueError(f"qat.kd_alpha must be in [0, 1] and qat.kd_temperature > 0, got "
                             f"{self.kd_alpha!r}, {self.kd_temperature!r}")

    @classmethod
    def from_config(cls, train: Mapping[str, Any], **extra: Any) -> "TrainSettings":
        """From ``qatforge.spec.config.train_settings(config, run)`` (nested ``lora:``); unknown keys ignored."""
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


def use_gradient_checkpointing(setting: str | bool, n_params: int) -> bool:
    """Whether a run checkpoints its decoder layers: ``true``/``false`` as set; ``auto`` from
    ``GC_AUTO_PARAMS`` base parameters (recomputing the layers costs ~30 % more compute, worth it
    only where their activations outgrow the memory margin)."""
    if setting == "auto":
        return n_params >= GC_AUTO_PARAMS
    return bool(setting)


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


"""The LoRA model of a run: LoRA config, dtype, hf and Unsloth setup, QAT preparation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from qatforge.train.settings import ALL_LINEAR, TrainingError, TrainSettings, use_gradient_checkpointing


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


def dtype_for_device() -> tuple[Any, bool]:
    """(load dtype, bf16 flag): fp32 on CPU (bf16 is 3-7x slower here), bf16 on CUDA that supports it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16, True
    return torch.float32, False


def _checkpointing(model: Any, settings: TrainSettings, log: Callable[[str], None]) -> bool:
    """Whether this run checkpoints its decoder layers (``settings.gradient_checkpointing``), logged."""
    n = sum(p.numel() for p in model.parameters())
    on = use_gradient_checkpointing(settings.gradient_checkpointing, n)
    if on and not getattr(model, "supports_gradient_checkpointing", True):
        if settings.gradient_checkpointing is True:
            raise TrainingError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
        on = False
    log(f"gradient checkpointing {'on' if on else 'off'} ({settings.gradient_checkpointing}; {n / 1e6:.1f}M parameters)")
    return on


# Merged QAT layers keep their fake-quantized weights for backward up to this size in all (the
# tiny default's are 12 MiB; Qwen3-0.6B's 1.7 GiB): keeping them saves rebuilding every weight in
# backward, measured at 12 % of a distilled int8-int4 step of the default (1.70x -> 1.50x a plain
# LoRA step at r 64).
KEEP_FQ_WEIGHTS_BYTES = 256 * 2**20


def _qat_weight_recompute(model: Any, checkpointed: bool, log: Callable[[str], None]) -> None:
    """Merged QAT layers recompute their fake-quantized weight in backward unless the layers are
    checkpointed (then the layer's own recomputation rebuilds it, one layer at a time) or all those
    weights together fit in ``KEEP_FQ_WEIGHTS_BYTES`` (then they are kept from the forward)."""
    from qatforge.qat_lora import lora_linears

    layers = list(lora_linears(model).values())
    size = sum(m.get_base_layer().weight.numel() * m.get_base_layer().weight.element_size() for m in layers)
    on = not checkpointed and size > KEEP_FQ_WEIGHTS_BYTES
    for m in layers:
        m._qat_recompute = on
    if layers and getattr(layers[0], "_qat_weight_fq", None) is not None:
        how = ("rebuilt by the checkpointed layers" if checkpointed else "recomputed in backward" if on
               else "kept for backward")
        log(f"fake-quantized merged weights ({size / 2**20:,.0f} MiB): {how}")


def setup_hf(base_dir: Path, settings: TrainSettings, log: Callable[[str], None]) -> tuple[Any, Any, int]:
    from peft import get_peft_model
    from transformers import set_seed

    from qatforge.model import load_causal_lm, load_tokenizer

    dtype, _ = dtype_for_device()
    tok = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir, dtype=dtype)
    model.config.use_cache = False
    gc = _checkpointing(model, settings, log)
    if gc:  # non-reentrant: no input that requires grad needed, saved tensors dropped and recomputed
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_seed(settings.seed)
    model = get_peft_model(model, _lora_config(settings))
    log(f"LoRA adapts {adapted_modules(model, settings.target_modules)}")
    n_fq = apply_qat(model, settings, log)
    _qat_weight_recompute(model, gc, log)
    return model, tok, n_fq


def apply_qat(model: Any, settings: TrainSettings, log: Callable[[str], None]) -> int:
    """Prepare a PEFT model for the run's QAT (``settings.qat_mode``); the number of fake-quantized modules."""
    from qatforge.merge import STORAGE_DTYPE
    from qatforge.qat import prepare_qat
    from qatforge.qat_lora import prepare_merged_qat
    from qatforge.spec.schemes import parse_scheme

    if not settings.qat_scheme:
        return 0
    scheme = parse_scheme(settings.qat_scheme)
    if settings.qat_mode == "merged":
        info = prepare_merged_qat(model, scheme, storage_dtype=STORAGE_DTYPE,
                                  learned_scales=settings.block_scales == "learned", log=log)
        return len(info["merged_linears"]) + info["fake_quantized_other"]
    return prepare_qat(model, scheme, log=log)


def setup_unsloth(base_dir: Path, settings: TrainSettings, log: Callable[[str], None]) -> tuple[Any, Any, int]:
    """Unsloth's FastLanguageModel path (not run in CI here: needs unsloth, normally a CUDA GPU)."""
    from unsloth import FastLanguageModel  # must come before transformers/trl patch points are used

    from qatforge.qat import count_fake_quantized
    from qatforge.spec.schemes import parse_scheme

    dtype, _ = dtype_for_device()
    model, tok = FastLanguageModel.from_pretrained(
        model_name=str(base_dir),
        max_seq_length=settings.max_len,
        dtype=dtype,
        load_in_4bit=False,
        full_finetuning=False,
        trust_remote_code=False,
    )
    gc = _checkpointing(model, settings, log)
    # merged mode: Unsloth's PEFT model gets the same merged-forward modules as the hf backend
    unsloth_scheme = (settings.qat_scheme if settings.qat_scheme and parse_scheme(settings.qat_scheme).unsloth
                      and settings.qat_mode == "unsloth" else None)
    model = FastLanguageModel.get_peft_model(
        model,
        r=settings.lora_r,
        target_modules=settings.target_modules if settings.target_modules == ALL_LINEAR else list(settings.target_modules),
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        bias="none",
        use_gradient_checkpointing="unsloth" if gc else False,  # unsloth's offloaded checkpointing
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
    _qat_weight_recompute(model, gc, log)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok, n_fq

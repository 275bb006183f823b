"""Loading a base model / tokenizer through the real ``from_pretrained`` path, with clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class ModelError(ValueError):
    """A model or tokenizer source that cannot be used as a chat causal LM."""


def _is_local(path_or_id: str | os.PathLike) -> bool:
    s = str(path_or_id)
    return Path(s).expanduser().exists() or s.startswith(("/", "./", "../", "~")) or s.count("/") > 1


def _check_local_dir(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"model path {path} is not a directory (expected an HF checkpoint directory)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")


def _check_causal_lm_config(path_or_id: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    local = Path(str(path_or_id)).expanduser()
    if local.is_dir():
        raw = json.loads((local / "config.json").read_text())
        archs = raw.get("architectures") or []
        if archs and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
            raise ModelError(
                f"{path_or_id}: config.json architectures {archs} is not a causal language model"
            )
    try:
        config = AutoConfig.from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(
            f"cannot load the config of {path_or_id} (not a local directory, not in the HF cache): {e}"
        ) from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelError(
            f"{path_or_id}: model_type {config.model_type!r} has no causal-LM class in transformers"
        )
    return config


def check_chat_tokenizer(tokenizer: Any, source: str) -> None:
    """Raise ``ModelError`` unless ``tokenizer`` has a chat template and an eos token."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"tokenizer of {source} has no chat template (chat_template is empty)")
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer of {source} has no eos token")


def auto_tokenizer(path_or_id: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` that tokenizes as the checkpoint's tokenizer.json says.

    transformers 5 rebuilds the normalizer, pre-tokenizer and decoder of some classes from their
    own settings instead of reading them from tokenizer.json (``LlamaTokenizer``: a Metaspace from
    ``legacy``, which TinyLlama-style files set false while their tokenizer.json prepends "▁" after
    every special token). llama.cpp's converter, ONNX Runtime GenAI and ``tokenizers`` read the
    file, and it is what the checkpoint was trained with: the file's pipeline is put back."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path_or_id), **kwargs)
    file = Path(str(path_or_id)).expanduser() / "tokenizer.json"
    backend = getattr(tok, "backend_tokenizer", None)
    if file.is_file() and backend is not None:
        from tokenizers import Tokenizer

        written = Tokenizer.from_file(str(file))
        for part in ("normalizer", "pre_tokenizer", "decoder"):
            setattr(backend, part, getattr(written, part))
    return tok


def load_tokenizer(path_or_id: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained`` plus chat checks; pad falls back to eos when missing."""
    if _is_local(path_or_id):
        _check_local_dir(Path(str(path_or_id)).expanduser())
    try:
        tok = auto_tokenizer(path_or_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {path_or_id}: {e}") from e
    check_chat_tokenizer(tok, str(path_or_id))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def record_add_bos(tokenizer_dir: str | os.PathLike, add_bos: bool) -> None:
    """Write the BOS rule (:func:`qatforge.chat.bos_policy`) as ``add_bos_token`` into
    ``tokenizer_dir/tokenizer_config.json``, where llama.cpp's converter (over the tokenizer.json
    post-processor) and ONNX Runtime GenAI read it.

    transformers 5 no longer writes ``add_bos_token`` there (its tokenizers keep the rule in
    tokenizer.json's post-processor, and it ignores the key when loading a tokenizer.json), so
    qatforge records it itself."""
    from qatforge.io import read_json, write_json

    path = Path(tokenizer_dir) / "tokenizer_config.json"
    cfg = read_json(path)
    if cfg.get("add_bos_token") is not add_bos:
        write_json(path, {**cfg, "add_bos_token": add_bos})


# The tokenizer files of a checkpoint, kept byte for byte from the folder a tokenizer was loaded
# from: transformers 5 re-saves only some of them and drops what other tools read (tokenizer.model,
# which llama.cpp's converter reads for the SentencePiece families; tokenizer_config.json's
# added_tokens_decoder, which tells it the control tokens; add_bos_token).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


def save_tokenizer(tokenizer: Any, out_dir: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(out_dir)``, then the :data:`TOKENIZER_FILES` of the local folder
    the tokenizer was loaded from copied over it unchanged, then the BOS rule recorded as
    ``add_bos_token`` in tokenizer_config.json (:func:`record_add_bos`)."""
    import shutil

    from qatforge.chat import bos_policy

    tokenizer.save_pretrained(str(out_dir))
    source = Path(str(getattr(tokenizer, "name_or_path", "") or "")).expanduser()
    if source.is_dir() and source.resolve() != Path(out_dir).resolve():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, Path(out_dir) / name)
    record_add_bos(out_dir, bos_policy(tokenizer)["add_bos"])


def load_causal_lm(path_or_id: str | os.PathLike, *, dtype: Any = None, trust_remote_code: bool = False) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` (safetensors preferred) after checking the config."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    local = _is_local(path_or_id)
    if local:
        _check_local_dir(Path(str(path_or_id)).expanduser())
    _check_causal_lm_config(str(path_or_id), trust_remote_code)
    use_st = None
    if local:
        d = Path(str(path_or_id)).expanduser()
        use_st = True if any(d.glob("*.safetensors")) else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path_or_id), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=use_st
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a causal LM from {path_or_id}: {e}") from e
    model.eval()
    return model


def stored_dtype(path: str | os.PathLike) -> Any:
    """The torch dtype a local checkpoint's ``config.json`` says its weights are stored in (or None)."""
    import torch

    cfg = Path(str(path)).expanduser() / "config.json"
    if not cfg.is_file():
        return None
    raw = json.loads(cfg.read_text())
    name = raw.get("dtype") or raw.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def cast_parameters(model: Any, dtype: Any) -> None:
    """Cast parameters (what is saved) in place, one at a time, so that at most one tensor exists
    in both dtypes. Buffers such as RoPE ``inv_freq`` keep the dtype ``from_pretrained`` gave them."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    model.config.dtype = dtype


def load_upcast(path: str | os.PathLike, *, dtype: Any = None, trust_remote_code: bool = False) -> Any:
    """:func:`load_causal_lm` at ``dtype`` (float32 by default) of a checkpoint stored in 16 bits,
    loaded in its stored dtype and then upcast parameter by parameter. The values are the same as
    ``from_pretrained(dtype=float32)`` (a 16-bit to float32 cast is exact) with less transient
    memory (measured at 500M parameters: about the 16-bit file plus the float32 copy)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    stored = stored_dtype(path)
    if stored is None or stored == dtype or not stored.is_floating_point or stored.itemsize >= dtype.itemsize:
        return load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)
    model = load_causal_lm(path, dtype=stored, trust_remote_code=trust_remote_code)
    if any(b.is_floating_point() and b.dtype != dtype for b in model.buffers()):
        del model  # a buffer computed at init in the stored dtype: only a full-precision load is exact
        return load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)
    cast_parameters(model, dtype)
    return model


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op
    elsewhere). Freed weights otherwise stay in the process's heap and the next stage's peak RSS
    stacks on top of them (measured: a quantized 50M model kept its float32 weights' 176 MiB)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)

"""Where the installed llama.cpp lives and what its loader accepts: light enough for Snakefile parse time.

Only the standard library; :mod:`qatforge.llamacpp` (the installer and the converter) re-exports these.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

ENV_DIR = "QATFORGE_LLAMA_CPP_DIR"
PRE_TOKENIZERS = "pre_tokenizers.json"  # the names llama.cpp's loader accepts (src/llama-vocab.cpp)
ARCHITECTURES = "architectures.json"  # the HF architectures convert_hf_to_gguf.py has a model class for


def share_dir() -> Path:
    """Directory holding the vendored converter: ``$QATFORGE_LLAMA_CPP_DIR`` or ``<sys.prefix>/share/llama.cpp``."""
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else Path(sys.prefix) / "share" / "llama.cpp"


def pre_tokenizer_names(vocab_cpp: str | os.PathLike) -> list[str]:
    """The ``tokenizer.ggml.pre`` names llama.cpp's loader accepts, read from its ``llama-vocab.cpp``
    (every ``tokenizer_pre == "<name>"`` comparison)."""
    text = Path(vocab_cpp).read_text(encoding="utf-8")
    names = sorted(set(re.findall(r'tokenizer_pre\s*==\s*"([^"]+)"', text)))
    if not names:
        raise ValueError(f"{vocab_cpp}: no pre-tokenizer names found")
    return names


def known_pre_tokenizers() -> list[str] | None:
    """The installed llama.cpp's pre-tokenizer names (written by ``install``), None if not installed."""
    path = share_dir() / PRE_TOKENIZERS
    return json.loads(path.read_text()) if path.is_file() else None


def converter_architectures(converter_root: str | os.PathLike) -> list[str]:
    """The HF ``architectures`` names the converter registers (``@ModelBase.register("...")`` in
    ``convert_hf_to_gguf.py`` and its ``conversion/`` package)."""
    root = Path(converter_root)
    files = [root / "convert_hf_to_gguf.py", *sorted((root / "conversion").glob("*.py"))]
    names: set[str] = set()
    for f in files:
        if f.is_file():
            for args in re.findall(r"ModelBase\.register\(([^)]*)\)", f.read_text(encoding="utf-8")):
                names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
    if not names:
        raise ValueError(f"{root}: no ModelBase.register(...) architectures found")
    return sorted(names)


def known_architectures() -> list[str] | None:
    """The installed converter's architectures (written by ``install``), None if not installed."""
    path = share_dir() / ARCHITECTURES
    return json.loads(path.read_text()) if path.is_file() else None

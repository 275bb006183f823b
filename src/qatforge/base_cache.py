"""Per-machine cache of the builtin base, keyed by its full recipe.

The builtin base is deterministic in its recipe (on CPU, same seeds), so a checkpoint built once on
a machine stands in for every later build of the same recipe there. The key is the sha256 of the
recipe (config values, seed, sequence length), the versions of the libraries that train it and the
source of the modules that build it; any change is a new entry. An entry records the sha256 of its
files and is checked on every use; a damaged entry is removed and rebuilt.

Location: ``$QATFORGE_CACHE/base/<key>/`` (default ``~/.cache/qatforge``, shared with the llama.cpp
build); ``QATFORGE_BASE_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from qatforge.io import atomic_dir, package_versions, read_json, sha256_path, write_json

ENTRY = "cache-entry.json"
# The modules whose code decides the builtin base's weights and tokenizer.
SOURCES = ("tiny.py", "datagen.py", "chat.py", "base.py")
VERSIONED = ("torch", "transformers", "tokenizers")


def enabled() -> bool:
    return os.environ.get("QATFORGE_BASE_CACHE", "1").lower() not in ("0", "false", "off", "no")


def root() -> Path:
    return Path(os.environ.get("QATFORGE_CACHE") or Path.home() / ".cache" / "qatforge") / "base"


def recipe_key(recipe: Mapping[str, Any]) -> str:
    """sha256 of the recipe, the training libraries' versions and the building modules' source."""
    pkg = Path(__file__).resolve().parent
    sources = {name: hashlib.sha256((pkg / name).read_bytes()).hexdigest() for name in SOURCES}
    blob = json.dumps({"recipe": recipe, "versions": package_versions(*VERSIONED), "sources": sources},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def fetch(key: str, out_dir: str | os.PathLike, log: Callable[[str], None] = print) -> bool:
    """Copy the cached base of ``key`` to ``out_dir`` (atomically); False when there is none."""
    entry = root() / key
    if not enabled() or not (entry / ENTRY).is_file():
        return False
    want = read_json(entry / ENTRY)["sha256"]
    got = sha256_path(entry, exclude=(ENTRY,))
    if got != want:
        log(f"cached base {entry} is damaged (sha256 {got} != recorded {want}); removing it and rebuilding")
        shutil.rmtree(entry, ignore_errors=True)
        return False
    with atomic_dir(out_dir) as tmp:
        for f in entry.iterdir():
            if f.name != ENTRY:
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
    log(f"base taken from the machine cache {entry} (sha256 {got[:12]}, checked)")
    return True


def store(key: str, src_dir: str | os.PathLike, log: Callable[[str], None] = print) -> None:
    """Put a freshly built base into the cache under ``key`` (atomically, with its sha256)."""
    if not enabled():
        return
    src = Path(src_dir)
    with atomic_dir(root() / key) as tmp:
        for f in src.iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        write_json(tmp / ENTRY, {"sha256": sha256_path(tmp, exclude=(ENTRY,))})
    log(f"base stored in the machine cache {root() / key}")

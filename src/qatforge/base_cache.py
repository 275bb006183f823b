"""Per-machine cache of the builtin base, keyed by its full recipe.

The builtin base is deterministic in its recipe (on CPU, same seeds), so a checkpoint built once on
a machine stands in for every later build of the same recipe there. The key is the sha256 of the
recipe (config values, seed, sequence length), the versions of the libraries that train it and the
source of the modules that build it; any change is a new entry. An entry records the sha256 of its
files and is checked on every use; a damaged entry is removed and rebuilt.

Location: ``$QATFORGE_CACHE/base/<key>/`` (default ``~/.cache/qatforge``, shared with the llama.cpp
build); ``QATFORGE_BASE_CACHE=0`` turns the cache off.

The project also ships the builtin base of the default recipe (``assets/builtin/tiny-qwen3``):
its files and ``shipped.json``, the recipe and the sha256 of each file. ``copy_shipped`` checks
every hash and refuses a missing or altered file; ``ship`` writes such a directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from qatforge.io import atomic_dir, package_versions, read_json, sha256_file, sha256_path, write_json

ENTRY = "cache-entry.json"
# The modules whose code decides the builtin base's weights and tokenizer.
SOURCES = ("tiny.py", "datagen.py", "chat.py", "base.py")
VERSIONED = ("torch", "transformers", "tokenizers")
SHIPPED_RECORD = "shipped.json"
# Files whose bytes a rebuild reproduces (warmup.json also holds wall times).
REPRODUCIBLE = ("chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                "tokenizer.json", "tokenizer_config.json")
REBUILD = "python -m qatforge.base --ship assets/builtin/tiny-qwen3"


class ShippedBaseError(RuntimeError):
    """The shipped builtin base is damaged (a file missing or not the recorded bytes)."""


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


def shipped_recipe(shipped_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The recipe of the base shipped in ``shipped_dir`` (from its record), None when there is none."""
    record = Path(shipped_dir) / SHIPPED_RECORD
    return read_json(record)["recipe"] if record.is_file() else None


def file_hashes(directory: str | os.PathLike) -> dict[str, str]:
    """sha256 of each file directly in ``directory`` (by name, sorted), the record aside."""
    d = Path(directory)
    return {f.name: sha256_file(f) for f in sorted(d.iterdir()) if f.is_file() and f.name != SHIPPED_RECORD}


def hash_mismatches(directory: str | os.PathLike, want: Mapping[str, str]) -> list[str]:
    """What differs between ``directory`` and the recorded ``want`` (name -> sha256), one line per file."""
    d = Path(directory)
    out = []
    for name, sha in sorted(want.items()):
        f = d / name
        got = sha256_file(f) if f.is_file() else None
        if got != sha:
            out.append(f"{f}: {'missing' if got is None else f'sha256 {got}'}, recorded {sha}")
    return out


def copy_shipped(shipped_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Copy the shipped base to ``out_dir`` (atomically) after checking the copy of every recorded
    file against its sha256; raise ``ShippedBaseError`` naming a missing or altered file. Returns
    the record."""
    src = Path(shipped_dir)
    record = read_json(src / SHIPPED_RECORD)
    with atomic_dir(out_dir) as tmp:
        for name in record["files"]:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        bad = hash_mismatches(tmp, record["files"])
        if bad:
            raise ShippedBaseError(
                "the shipped builtin base is damaged: " + "; ".join(b.replace(str(tmp), str(src)) for b in bad)
                + f" (restore it with `git checkout -- {src}`, or rebuild it: {REBUILD})")
    versions = package_versions(*VERSIONED)
    note = "" if versions == record["versions"] else f"; built with {record['versions']}, installed {versions}"
    log(f"base copied from the shipped {src} (sha256 of {len(record['files'])} files checked{note})")
    return record


def ship(built_dir: str | os.PathLike, shipped_dir: str | os.PathLike, recipe: Mapping[str, Any],
         threads: int) -> dict[str, Any]:
    """Make ``shipped_dir`` the shipped base: the files of ``built_dir`` (a fresh build of
    ``recipe``) and ``shipped.json`` (recipe, versions, threads, sha256 of each file). Returns the record."""
    src = Path(built_dir)
    with atomic_dir(shipped_dir) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name != SHIPPED_RECORD:
                shutil.copyfile(f, tmp / f.name)
        files = file_hashes(tmp)
        record = {"recipe": dict(recipe), "versions": package_versions(*VERSIONED), "threads": threads,
                  "files": files, "size_bytes": sum((tmp / n).stat().st_size for n in files),
                  "rebuild": REBUILD}
        write_json(tmp / SHIPPED_RECORD, record)
    return record

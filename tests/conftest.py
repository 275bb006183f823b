"""Session fixtures: one real build of the tiny pipeline (smoke config), copied per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# What a runnable copy of the workflow needs (bench/perf.py keeps its own list for `make bench`).
PROJECT_FILES = ("Snakefile", "rules", "scripts", "config", "data", "envs", "report", "profiles", "assets")
SMOKE = ROOT / "tests" / "smoke_config.yaml"


def deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("quants",):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def copy_project(dest: Path) -> Path:
    """A fresh project directory at ``dest`` with the smoke config as its config.yaml."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    cfg = deep_update(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()), yaml.safe_load(SMOKE.read_text()))
    write_config(dest, cfg)
    (dest / "results").mkdir()
    return dest


def snakemake(workdir: Path, *args: str, timeout: int = 3600, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real snakemake CLI of this interpreter in ``workdir``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def read_config(workdir: Path) -> dict:
    return yaml.safe_load((workdir / "config" / "config.yaml").read_text())


def write_config(workdir: Path, cfg: dict) -> None:
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture(scope="session")
def pipeline_build(tmp_path_factory) -> Path:
    """The tiny pipeline built once per test session with the smoke config (all targets)."""
    work = copy_project(tmp_path_factory.mktemp("pipeline") / "project")
    snakemake(work, "--cores", "2")
    return work


def clone_workdir(src: Path, dest: Path) -> Path:
    """Copy a built workdir (results, .snakemake metadata, mtimes preserved)."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


@pytest.fixture
def built_workdir(pipeline_build, tmp_path) -> Path:
    """A private copy of the built pipeline, safe to edit and rebuild."""
    return clone_workdir(pipeline_build, tmp_path / "project")


def tiny_qwen3_base(tmp_path_factory) -> tuple[Path, object, list]:
    """A random 1-layer Qwen3 (hidden 256) with a BPE tokenizer trained on the first 300 shipped
    conversations, saved under a fresh temp dir: ``(dir, tokenizer, conversations)``."""
    import json

    import torch

    from qatforge import tiny as tiny_mod

    torch.set_num_threads(1)
    rows = [json.loads(line)["messages"] for line in (ROOT / "data/chat.jsonl").read_text().splitlines()[:300]]
    tok = tiny_mod.build_tokenizer((m["role"] + "\n" + m["content"] for c in rows for m in c), vocab_size=300)
    model = tiny_mod.build_model(tok, layers=1, intermediate=256, seed=3)
    d = tmp_path_factory.mktemp("tinybase") / "base"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, tok, rows


@pytest.fixture(scope="session")
def family_replicas(tmp_path_factory) -> dict[str, Path]:
    """The seeded replica of every model family (tests/families.py), built once per session.
    Read-only: copy one before changing it."""
    from families import FAMILIES, build

    root = tmp_path_factory.mktemp("replicas")
    return {name: build(name, root / name) for name in FAMILIES}

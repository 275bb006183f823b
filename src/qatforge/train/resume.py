"""The work dir of a run: its fingerprint, complete checkpoints, resume point and loss.csv trim."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

from qatforge.train.settings import CHECKPOINT_FILES, LOSS_FIELDS, TrainSettings


def fingerprint(base_dir: Path, train_parquet: Path, eval_parquet: Path, settings: TrainSettings) -> str:
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


def prepare_work_dir(work_dir: Path, fingerprint: str, log: Callable[[str], None]) -> Path | None:
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


def trim_loss_csv(path: Path, last_step: int) -> None:
    """Drop loss rows after ``last_step`` (they are recomputed when resuming from it)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= last_step]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOSS_FIELDS)
        w.writeheader()
        w.writerows(rows)

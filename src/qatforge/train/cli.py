"""CLI of a training run."""

from __future__ import annotations

import argparse
import json
import sys

from qatforge.train.loop import train_run
from qatforge.train.settings import TrainSettings


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m qatforge.train BASE TRAIN EVAL OUT [--work-dir D] [--settings JSON]``."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("base_dir")
    p.add_argument("train_parquet")
    p.add_argument("eval_parquet")
    p.add_argument("out_dir")
    p.add_argument("--work-dir")
    p.add_argument("--settings", default="{}", help="TrainSettings fields as a JSON object")
    a = p.parse_args(argv)
    settings = TrainSettings(**json.loads(a.settings))
    summary = train_run(a.base_dir, a.train_parquet, a.eval_parquet, a.out_dir, settings,
                        work_dir=a.work_dir, log=lambda m: print(m, flush=True))
    json.dump({k: summary[k] for k in ("global_step", "resumed_from_step", "checkpoints")}, sys.stdout)
    print()
    return 0

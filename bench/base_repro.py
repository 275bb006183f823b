"""``make bench``: the shipped builtin base is what its rebuild tool makes, byte for byte.

``python bench/base_repro.py [--shipped assets/builtin/tiny-qwen3] [--out results/perf]`` (from the
project root; ~8 min of CPU) rebuilds the recipe of ``<shipped>/shipped.json`` with the code that
shipped it (``qatforge.base.ship_builtin``, no cache) and compares the sha256 of every reproducible
file (weights, config, tokenizer, chat template; ``warmup.json`` holds wall times) with the record.
When a file's bytes differ, the weights are compared too (largest absolute difference per tensor),
so a mismatch says whether the weights moved or only the serialisation. Writes
``<out>/base_repro.json``; exits 1 on any difference. A stack other than the record's (see
``versions``) is reported: bytes are only promised on the pinned one (constraints.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import qatforge.quiet  # noqa: F401
from qatforge import base, base_cache
from qatforge.io import package_versions, read_json, write_json


def weight_diffs(a: Path, b: Path) -> dict[str, float]:
    """Largest absolute difference of each tensor of two safetensors files that differs (a missing
    or reshaped tensor counts as inf)."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    out = {}
    for name in sorted(set(x) | set(y)):
        if name not in x or name not in y or x[name].shape != y[name].shape:
            out[name] = float("inf")
        elif not x[name].equal(y[name]):
            out[name] = float((x[name].float() - y[name].float()).abs().max())
    return out


def reproduce(shipped: Path, *, threads: int | None = None) -> dict[str, Any]:
    """Rebuild the shipped base's recipe in a temporary directory and compare it with the record."""
    record = read_json(shipped / base_cache.SHIPPED_RECORD)
    threads = threads or record.get("threads", 2)
    with tempfile.TemporaryDirectory(prefix="base-repro-") as work:
        t0 = time.perf_counter()
        rebuilt = base.ship_builtin(Path(work) / "tiny-qwen3", record["recipe"], threads=threads)
        seconds = time.perf_counter() - t0
        differ = [n for n in base_cache.REPRODUCIBLE if rebuilt["files"].get(n) != record["files"].get(n)]
        weights = (weight_diffs(shipped / "model.safetensors", Path(work) / "tiny-qwen3" / "model.safetensors")
                   if "model.safetensors" in differ else {})
    versions = package_versions(*base_cache.VERSIONED)
    return {
        "shipped": str(shipped),
        "same_bytes": not differ,
        "files_differing": differ,
        "same_weights": not weights,
        "weight_max_abs_diff": weights,
        "rebuild_seconds": round(seconds, 1),
        "threads": threads,
        "versions": versions,
        "record_versions": record["versions"],
        "same_stack": versions == record["versions"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/base_repro.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shipped", type=Path, default=Path("assets/builtin/tiny-qwen3"))
    p.add_argument("--out", type=Path, default=Path("results/perf"))
    p.add_argument("--threads", type=int, help="torch threads (default: the record's)")
    a = p.parse_args(argv)
    res = reproduce(a.shipped, threads=a.threads)
    write_json(a.out / "base_repro.json", res)
    print(json.dumps(res, indent=2, sort_keys=True))
    return 0 if res["same_bytes"] else 1


if __name__ == "__main__":
    sys.exit(main())

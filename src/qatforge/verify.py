"""Recheck every artifact's recorded sha256 under a results directory (``make verify``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qatforge.io import MANIFEST, read_json, sha256_path


def manifests(results: Path) -> list[tuple[Path, Path]]:
    """(artifact, manifest) pairs: ``export.json`` inside directories, ``<file>.json`` beside files."""
    pairs = []
    for m in sorted(results.rglob("*.json")):
        if m.name == MANIFEST and m.parent != results:
            pairs.append((m.parent, m))
        elif m.name.endswith(".json") and (m.parent / m.name[: -len(".json")]).is_file():
            pairs.append((m.parent / m.name[: -len(".json")], m))
    return pairs


def verify(results: str | Path) -> tuple[list[str], list[str]]:
    """Return (ok, problems) over every recorded artifact under ``results``."""
    ok, problems = [], []
    for artifact, manifest in manifests(Path(results)):
        want = read_json(manifest).get("sha256")
        if want is None:
            continue
        got = sha256_path(artifact)
        (ok if got == want else problems).append(
            f"{artifact}" if got == want else f"{artifact}: sha256 {got[:16]}… != recorded {want[:16]}… ({manifest})"
        )
    return ok, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results", nargs="?", default="results")
    args = ap.parse_args(argv)
    ok, problems = verify(args.results)
    for p in problems:
        print(f"TAMPERED OR CORRUPT: {p}", file=sys.stderr)
    print(f"verified {len(ok)} artifacts, {len(problems)} mismatches")
    return 1 if problems or not ok else 0


if __name__ == "__main__":
    sys.exit(main())

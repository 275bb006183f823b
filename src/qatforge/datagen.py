"""Seeded generator of the shipped synthetic chat dataset.

Five small deterministic tasks whose answers can be checked exactly and that a ~4M-parameter
model learns: letter reversal, digit sorting, uppercasing words, the largest digit of a list and
metric unit conversion (a number times a power of ten). Measured: key lookup in a short dict (two-
digit values) stayed at 5 % after 1300 warm-up steps, reversal of 6-7 letters and uppercasing of
4 words were error-prone, so those were dropped or shortened. Letters are space separated and digits are
split one per token by the Qwen2 pre-tokenizer regex, so a tiny BPE keeps them as single tokens.

Each row carries the ``task`` of its last exchange. Exact-match prompts are no longer generated:
prepare_data takes them from its dev and test splits. One problem in ``RESERVED_BUCKET`` (by a hash
of its user text, the former eval side) is never generated, so the shipped file stays reproducible.

    python -m qatforge.datagen --out data/ [--seed 0] [--n 4000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import string
from pathlib import Path
from typing import Callable

SYSTEM_PROMPT = "Reply with the answer only."

WORDS = (
    "apple bird blue cake cat cloud coin dog door fish frog gold green hat king lamp leaf lion "
    "moon milk nest note owl pear pink rain red ring road rose salt sand ship shoe snow star "
    "stone sun tea tree wolf wind"
).split()

UNITS = [  # (from, to, factor)
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("cm", "mm", 10),
    ("kg", "g", 1000),
    ("l", "ml", 1000),
]

TASKS = ("reverse", "sort", "uppercase", "largest", "convert")
RESERVED_BUCKET = 8  # one problem in RESERVED_BUCKET (by hash of its user text) is never generated


def _letters(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi))]


def _reverse(rng: random.Random) -> tuple[str, str]:
    xs = _letters(rng, 3, 5)
    q = rng.choice(["Reverse the letters: {}", "Reverse: {}"]).format(" ".join(xs))
    return q, " ".join(reversed(xs))


def _sort(rng: random.Random) -> tuple[str, str]:
    xs = [rng.choice(string.digits) for _ in range(rng.randint(3, 7))]
    q = rng.choice(["Sort the digits: {}", "Sort ascending: {}"]).format(" ".join(xs))
    return q, " ".join(sorted(xs))


def _uppercase(rng: random.Random) -> tuple[str, str]:
    ws = [rng.choice(WORDS) for _ in range(rng.randint(2, 3))]
    q = rng.choice(["Uppercase: {}", "Write in capitals: {}"]).format(" ".join(ws))
    return q, " ".join(ws).upper()


def _largest(rng: random.Random) -> tuple[str, str]:
    xs = [rng.choice(string.digits) for _ in range(rng.randint(3, 7))]
    q = rng.choice(["Largest digit: {}", "Which digit is largest: {}"]).format(" ".join(xs))
    return q, max(xs)


def _convert(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(UNITS)
    x = rng.randint(1, 999)
    q = rng.choice(["Convert {x} {s} to {d}.", "How many {d} is {x} {s}?"]).format(x=x, s=src, d=dst)
    return q, str(x * factor)


MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "uppercase": _uppercase,
    "largest": _largest,
    "convert": _convert,
}


def is_reserved(user_text: str) -> bool:
    """Whether a problem is in the never-generated bucket (a stable hash of its user text)."""
    return int(hashlib.sha256(user_text.encode()).hexdigest(), 16) % RESERVED_BUCKET == 0


def _problems(rng: random.Random, task: str):
    """Endless stream of (question, answer) for ``task``, reserved problems skipped."""
    while True:
        q, a = MAKERS[task](rng)
        if not is_reserved(q):
            yield q, a


def generate(seed: int, n: int, multi_turn_fraction: float = 0.1) -> list[dict]:
    """``n`` conversations ``{"messages": [system, user, assistant, ...], "task"}``.

    Tasks are spread evenly (round robin); about ``multi_turn_fraction`` of the conversations hold
    two exchanges; ``task`` is that of the last one. Deterministic in ``seed``.
    """
    rng = random.Random(f"qatforge-train-{seed}")
    streams = {t: _problems(random.Random(f"{seed}-{t}"), t) for t in TASKS}
    rows = []
    for i in range(n):
        turns = 2 if rng.random() < multi_turn_fraction else 1
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
        for j in range(turns):
            task = TASKS[(i + j) % len(TASKS)] if j == 0 else rng.choice(TASKS)
            q, a = next(streams[task])
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": msgs, "task": task})
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSON lines, atomically."""
    from qatforge.io import atomic_file

    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data", help="output directory (chat.jsonl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=4000, help="conversations")
    a = p.parse_args(argv)
    out = Path(a.out)
    write_jsonl(out / "chat.jsonl", generate(a.seed, a.n))
    print(f"wrote {a.n} conversations to {out / 'chat.jsonl'}")


if __name__ == "__main__":
    main()

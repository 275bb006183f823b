"""Seeded generators of the builtin base's warm-up corpus and of the shipped fine-tuning dataset.

Small deterministic tasks whose answers can be checked exactly, on letters, digits and words that
a tiny byte-level BPE keeps as single tokens (the Qwen2 pre-tokenizer regex splits digits one per
token). Two sets:

* ``BASE_TASKS`` (letter reversal, digit sorting, uppercasing, the largest digit, metric unit
  conversion by multiplication): what the builtin base learns in its warm-up (``base_corpus``).
* ``NEW_TASKS`` (the smallest digit, the last letter, counting letters, unit conversion by
  division): what only the fine-tuning dataset teaches. Similar prompts to the base tasks, other
  answers, so the base gets them wrong (measured: 0 % on each) and LoRA can learn them.

The shipped dataset (``generate``) mixes one share of each base task with three shares of each new
task (``DATASET_MIX``), so the base scores about a third of its test prompts and fine-tuning has
the rest to teach. Problems are split between the two by a hash of the user text
(``is_base_problem``): no question of the dataset occurs in the base's warm-up corpus.

    python -m qatforge.datagen --out data/ [--seed 0] [--n 4000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import string
from pathlib import Path
from typing import Callable, Sequence

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

BASE_TASKS = ("reverse", "sort", "uppercase", "largest", "convert")
NEW_TASKS = ("smallest", "last", "count", "convert_back")
TASKS = BASE_TASKS + NEW_TASKS
# The dataset's round-robin task order: each base task once, each new task three times.
DATASET_MIX = BASE_TASKS + tuple(t for t in NEW_TASKS for _ in range(3))
BASE_BUCKETS = 2  # a problem belongs to the base corpus iff hash(user text) % BASE_BUCKETS == 0


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


def _smallest(rng: random.Random) -> tuple[str, str]:
    xs = [rng.choice(string.digits) for _ in range(rng.randint(3, 7))]
    q = rng.choice(["Smallest digit: {}", "Which digit is smallest: {}"]).format(" ".join(xs))
    return q, min(xs)


def _last(rng: random.Random) -> tuple[str, str]:
    xs = _letters(rng, 3, 6)
    q = rng.choice(["Last letter: {}", "Which letter comes last: {}"]).format(" ".join(xs))
    return q, xs[-1]


def _count(rng: random.Random) -> tuple[str, str]:
    xs = _letters(rng, 2, 8)
    q = rng.choice(["How many letters: {}", "Count the letters: {}"]).format(" ".join(xs))
    return q, str(len(xs))


def _convert_back(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(UNITS)
    x = rng.randint(1, 99)
    q = rng.choice(["Convert {v} {d} to {s}.", "How many {s} is {v} {d}?"]).format(v=x * factor, s=src, d=dst)
    return q, str(x)


MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "uppercase": _uppercase,
    "largest": _largest,
    "convert": _convert,
    "smallest": _smallest,
    "last": _last,
    "count": _count,
    "convert_back": _convert_back,
}


def is_base_problem(user_text: str) -> bool:
    """Whether a problem belongs to the base's warm-up corpus (a stable hash of its user text)."""
    return int(hashlib.sha256(user_text.encode()).hexdigest(), 16) % BASE_BUCKETS == 0


def _problems(rng: random.Random, task: str, base_side: bool):
    """Endless stream of (question, answer) for ``task`` on one side of the base/dataset split."""
    while True:
        q, a = MAKERS[task](rng)
        if is_base_problem(q) == base_side:
            yield q, a


def _conversations(seed: int, n: int, mix: Sequence[str], base_side: bool, multi_turn_fraction: float,
                   salt: str) -> list[dict]:
    rng = random.Random(f"qatforge-{salt}-{seed}")
    streams = {t: _problems(random.Random(f"{salt}-{seed}-{t}"), t, base_side) for t in set(mix)}
    rows = []
    for i in range(n):
        turns = 2 if rng.random() < multi_turn_fraction else 1
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
        for j in range(turns):
            task = mix[(i + j) % len(mix)] if j == 0 else rng.choice(mix)
            q, a = next(streams[task])
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": msgs, "task": task})
    return rows


def generate(seed: int, n: int, multi_turn_fraction: float = 0.1) -> list[dict]:
    """``n`` dataset conversations ``{"messages": [system, user, assistant, ...], "task"}``.

    Tasks follow ``DATASET_MIX`` round robin; about ``multi_turn_fraction`` of the conversations
    hold two exchanges; ``task`` is that of the last one. Deterministic in ``seed``.
    """
    return _conversations(seed, n, DATASET_MIX, False, multi_turn_fraction, "train")


def base_corpus(seed: int, n: int) -> list[dict]:
    """``n`` warm-up conversations of the builtin base: ``BASE_TASKS`` only, disjoint from ``generate``."""
    return _conversations(seed, n, BASE_TASKS, True, 0.1, "base")


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

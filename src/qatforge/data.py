"""Loading, validating and splitting chat datasets (``messages`` format) into train/eval Parquet."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Sequence

ROLES = ("system", "user", "assistant")
ACCEPTED = "JSONL (.jsonl/.ndjson, or .json lines or array), Parquet (.parquet) or a local `datasets` save_to_disk directory"
CHARS_PER_TOKEN = 4  # bound used for the over-length check when no tokenizer is given
MESSAGE_OVERHEAD_TOKENS = 4  # role header + end-of-turn tokens per message (ChatML)


class DataError(ValueError):
    """A dataset file or row that cannot be used; the message names the file and the row."""


def _load_with_locations(path: str | os.PathLike) -> tuple[list[Any], list[str]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: dataset not found")
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                or (path / "state.json").exists()):
            raise DataError(f"{path}: directory is not a `datasets` save_to_disk directory; accepted: {ACCEPTED}")
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        rows = ds.to_list()
        return rows, [f"row {i + 1}" for i in range(len(rows))]
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from e
        return rows, [f"item {i + 1}" for i in range(len(rows))]
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows, locs = [], []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from e
                locs.append(f"line {lineno}")
        return rows, locs
    if suffix == ".parquet":
        import polars as pl

        try:
            rows = pl.read_parquet(path).to_dicts()
        except Exception as e:  # polars raises several error types for corrupt files
            raise DataError(f"{path}: cannot read Parquet ({e})") from e
        return rows, [f"row {i + 1}" for i in range(len(rows))]
    raise DataError(f"{path}: unsupported dataset format {suffix or '(no suffix)'!r}; accepted: {ACCEPTED}")


def load_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file, a Parquet file or a local ``datasets`` save directory."""
    return _load_with_locations(path)[0]


def _row_problem(row: Any, max_chars: int | None, tokenizer: Any, max_tokens: int | None) -> str | None:
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, not an object"
    msgs = row.get("messages")
    if msgs is None:
        return "missing 'messages'"
    if not isinstance(msgs, (list, tuple)):
        return f"'messages' is a {type(msgs).__name__}, not a list"
    if not msgs:
        return "empty 'messages'"
    for j, m in enumerate(msgs, start=1):
        if not isinstance(m, dict):
            return f"message {j} is not an object"
        role = m.get("role")
        if role not in ROLES:
            return f"message {j} has unknown role {role!r} (allowed: {', '.join(ROLES)})"
        if not isinstance(m.get("content"), str):
            return f"message {j} ({role}) content is {type(m.get('content')).__name__}, not a string"
    if msgs[-1]["role"] != "assistant":
        return f"conversation ends with a {msgs[-1]['role']!r} turn, not an assistant turn"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        return "no non-empty assistant turn"
    if tokenizer is not None and max_tokens is not None:
        from qatforge.chat import render

        n = len(tokenizer(render(tokenizer, msgs, False), add_special_tokens=False)["input_ids"])
        if n > max_tokens:
            return f"over-length: {n} tokens > data.max_tokens={max_tokens}"
    elif max_chars is not None:
        n = sum(len(m["content"]) for m in msgs) + CHARS_PER_TOKEN * MESSAGE_OVERHEAD_TOKENS * len(msgs)
        if n > max_chars:
            return f"over-length: about {n} characters > {max_chars} (data.max_tokens x {CHARS_PER_TOKEN})"
    return None


def validate_rows(
    rows: Sequence[Any],
    source: str,
    max_tokens_chars: int | None = None,
    on_bad_rows: str = "error",
    *,
    locations: Sequence[str] | None = None,
    tokenizer: Any = None,
    max_tokens: int | None = None,
) -> tuple[list[dict], list[dict]]:
    """Check every row; raise ``DataError`` on the first bad row, or drop bad rows.

    With ``on_bad_rows="drop"`` returns ``(good_rows, problems)`` where each problem is
    ``{"location": "line 7", "problem": "..."}``. Over-length is judged in tokens when a tokenizer
    and ``max_tokens`` are given, else in characters against ``max_tokens_chars``.
    """
    if on_bad_rows not in ("error", "drop"):
        raise ValueError(f"on_bad_rows must be 'error' or 'drop', not {on_bad_rows!r}")
    if locations is None:
        locations = [f"row {i + 1}" for i in range(len(rows))]
    good, problems = [], []
    for row, loc in zip(rows, locations):
        problem = _row_problem(row, max_tokens_chars, tokenizer, max_tokens)
        if problem is None:
            good.append({"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]})
        elif on_bad_rows == "error":
            raise DataError(f"{source}: {loc}: {problem} (set data.on_bad_rows: drop to skip bad rows)")
        else:
            problems.append({"location": loc, "problem": problem})
    return good, problems


def _messages_frame(convs: Sequence[dict]) -> Any:
    import polars as pl

    dtype = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
    return pl.DataFrame({"messages": [c["messages"] for c in convs]}, schema={"messages": dtype})


def _write_parquet(df: Any, path: str | os.PathLike) -> None:
    from qatforge.io import atomic_file

    with atomic_file(path) as tmp:
        df.write_parquet(tmp)


def prepare(
    path: str | os.PathLike,
    train_out: str | os.PathLike,
    eval_out: str | os.PathLike,
    *,
    seed: int,
    eval_fraction: float,
    max_tokens: int,
    on_bad_rows: str = "error",
    min_eval: int = 1,
    tokenizer: Any = None,
) -> dict:
    """Validate a dataset and write a seeded, deterministic train/eval split as Parquet.

    Returns a summary (counts, dropped problems, seed). Writes nothing when validation fails.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    rows, locs = _load_with_locations(path)
    if not rows:
        raise DataError(f"{path}: dataset is empty")
    good, problems = validate_rows(
        rows, str(path), max_tokens * CHARS_PER_TOKEN, on_bad_rows,
        locations=locs, tokenizer=tokenizer, max_tokens=max_tokens,
    )
    n = len(good)
    n_eval = max(min_eval, round(eval_fraction * n))
    if n - n_eval < 1:
        raise DataError(
            f"{path}: {n} usable rows ({len(problems)} dropped) are too few for {n_eval} eval rows "
            f"plus at least one training row"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = sorted(order[:n_eval])
    train_idx = sorted(order[n_eval:])
    _write_parquet(_messages_frame([good[i] for i in train_idx]), train_out)
    _write_parquet(_messages_frame([good[i] for i in eval_idx]), eval_out)
    return {
        "source": str(path),
        "rows_read": len(rows),
        "rows_kept": n,
        "rows_dropped": len(problems),
        "problems": problems,
        "train_rows": len(train_idx),
        "eval_rows": len(eval_idx),
        "seed": seed,
        "eval_fraction": eval_fraction,
        "max_tokens": max_tokens,
    }


def read_conversations(parquet_path: str | os.PathLike) -> list[list[dict]]:
    """The ``messages`` column of a prepared Parquet file as plain lists of dicts."""
    import polars as pl

    path = Path(parquet_path)
    if not path.is_file():
        raise DataError(f"{path}: prepared data not found")
    df = pl.read_parquet(path)
    if "messages" not in df.columns:
        raise DataError(f"{path}: no 'messages' column (columns: {df.columns})")
    return df["messages"].to_list()


def load_eval_prompts(path: str | os.PathLike, n: int) -> list[dict]:
    """The first ``n`` eval prompts ``{"messages": [..., user], "answer": str, "task"?}``."""
    rows, locs = _load_with_locations(path)
    if len(rows) < n:
        raise DataError(f"{path}: {len(rows)} eval prompts, but {n} were asked for (eval.n_prompts)")
    out = []
    for row, loc in zip(rows[:n], locs[:n]):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{path}: {loc}: missing or empty 'messages'")
        for j, m in enumerate(msgs, start=1):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise DataError(f"{path}: {loc}: message {j} has no valid role (allowed: {', '.join(ROLES)})")
            if not isinstance(m.get("content"), str):
                raise DataError(f"{path}: {loc}: message {j} content is not a string")
        if msgs[-1]["role"] != "user":
            raise DataError(f"{path}: {loc}: prompt must end with a user turn, not {msgs[-1]['role']!r}")
        if not isinstance(row.get("answer"), str):
            raise DataError(f"{path}: {loc}: missing string 'answer'")
        out.append({
            "messages": [{"role": m["role"], "content": m["content"]} for m in msgs],
            "answer": row["answer"],
            "task": row.get("task", ""),
        })
    return out

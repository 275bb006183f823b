"""Loading, validating and splitting chat datasets into train/dev/test Parquet of ``messages``.

Rows may be ``messages``, ShareGPT or Alpaca (one format per file, :mod:`qatforge.data_formats`);
each is normalised to ``messages`` before it is checked.

A conversation's split follows from a sha256 of its final user message (the question it answers),
so a question lands in the same split whatever the row order or seed. Train fits the model, dev
selects the checkpoint, test gives every number in the report.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from qatforge import data_formats

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "dev", "test")
ACCEPTED = "JSONL (.jsonl/.ndjson, or .json lines or array), Parquet (.parquet) or a local `datasets` save_to_disk directory"
CHARS_PER_TOKEN = 4  # bound used for the over-length check when no tokenizer is given
MESSAGE_OVERHEAD_TOKENS = 4  # role header + end-of-turn tokens per message (ChatML)
DROP_REASONS = ("malformed", "over-length")


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


def _row_problem(row: dict) -> str | None:
    """What makes a ``messages`` row unusable (None: nothing)."""
    msgs = row.get("messages")
    if msgs is None:
        return "missing 'messages'"
    if not isinstance(msgs, (list, tuple)):
        return f"'messages' is a {type(msgs).__name__}, not a list"
    if not msgs:
        return "empty 'messages'"
    if not isinstance(row.get("task", ""), (str, type(None))):
        return f"'task' is {type(row['task']).__name__}, not a string"
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
    return None


def _length_problem(msgs: Sequence[dict], max_chars: int | None, tokenizer: Any, max_tokens: int | None) -> str | None:
    """Over-length in tokens (with a tokenizer and ``max_tokens``) or else in characters (None: fits)."""
    if tokenizer is not None and max_tokens is not None:
        from qatforge.chat import encode, render

        n = len(encode(tokenizer, render(tokenizer, msgs, False)))
        if n > max_tokens:
            return f"over-length: {n} tokens > data.max_tokens={max_tokens}"
    elif max_chars is not None:
        n = sum(len(m["content"]) for m in msgs) + CHARS_PER_TOKEN * MESSAGE_OVERHEAD_TOKENS * len(msgs)
        if n > max_chars:
            return f"over-length: about {n} characters > {max_chars} (data.max_tokens x {CHARS_PER_TOKEN})"
    return None


def _check(row: Any, fmt: data_formats.Format, max_chars: int | None, tokenizer: Any,
           max_tokens: int | None) -> tuple[dict | None, str | None, str | None]:
    """``(conversation, reason, problem)``: the row as ``{"messages", "task"?}``, or the reason
    (``malformed`` or ``over-length``) and the problem that makes it unusable."""
    try:
        row = fmt.normalise(row)
    except data_formats.RowError as e:
        return None, "malformed", str(e)
    problem = _row_problem(row)
    if problem is not None:
        return None, "malformed", problem
    msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    problem = _length_problem(msgs, max_chars, tokenizer, max_tokens)
    if problem is not None:
        return None, "over-length", problem
    conv = {"messages": msgs}
    if "task" in row:
        conv["task"] = row["task"] or ""
    return conv, None, None


def detect_format(rows: Sequence[Any], source: str, data_format: str = data_formats.AUTO,
                  locations: Sequence[str] | None = None) -> str:
    """The one format (``data_formats.FORMATS``) of a file's rows, or ``data_format`` when forced;
    ``DataError`` naming the file and the first row of another or unknown shape."""
    if locations is None:
        locations = [f"row {i + 1}" for i in range(len(rows))]
    try:
        return data_formats.detect(rows, locations, data_format)
    except data_formats.FormatError as e:
        raise DataError(f"{source}: {e}") from e


def validate_rows(
    rows: Sequence[Any],
    source: str,
    max_tokens_chars: int | None = None,
    on_bad_rows: str = "error",
    *,
    locations: Sequence[str] | None = None,
    tokenizer: Any = None,
    max_tokens: int | None = None,
    data_format: str = data_formats.AUTO,
) -> tuple[list[dict], list[dict]]:
    """Normalise every row to ``messages`` and check it; raise ``DataError`` on the first bad row,
    or drop bad rows.

    The file's format is ``detect_format`` (a row of another or unknown shape always raises). With
    ``on_bad_rows="drop"`` returns ``(good_rows, problems)`` where each problem is
    ``{"location": "line 7", "reason": "malformed" | "over-length", "problem": "..."}``. A row's
    optional ``task`` (a string) is kept. Over-length is judged in tokens when a tokenizer and
    ``max_tokens`` are given, else in characters against ``max_tokens_chars``.
    """
    if on_bad_rows not in ("error", "drop"):
        raise ValueError(f"on_bad_rows must be 'error' or 'drop', not {on_bad_rows!r}")
    if locations is None:
        locations = [f"row {i + 1}" for i in range(len(rows))]
    fmt = data_formats.FORMATS[detect_format(rows, source, data_format, locations)]
    good, problems = [], []
    for row, loc in zip(rows, locations):
        conv, reason, problem = _check(row, fmt, max_tokens_chars, tokenizer, max_tokens)
        if conv is not None:
            good.append(conv)
        elif on_bad_rows == "error":
            raise DataError(f"{source}: {loc}: {problem} (set data.on_bad_rows: drop to skip bad rows)")
        else:
            problems.append({"location": loc, "reason": reason, "problem": problem})
    return good, problems


def dropped_by_reason(problems: Sequence[dict]) -> dict[str, int]:
    """Count of dropped rows per reason (every reason listed, 0 when none)."""
    return {reason: sum(p["reason"] == reason for p in problems) for reason in DROP_REASONS}


def _messages_frame(convs: Sequence[dict], with_task: bool = False) -> Any:
    import polars as pl

    dtype = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
    cols, schema = {"messages": [c["messages"] for c in convs]}, {"messages": dtype}
    if with_task:
        cols["task"], schema["task"] = [c.get("task", "") for c in convs], pl.String
    return pl.DataFrame(cols, schema=schema)


def _write_parquet(df: Any, path: str | os.PathLike) -> None:
    from qatforge.io import atomic_file

    with atomic_file(path) as tmp:
        df.write_parquet(tmp)


def final_question(messages: Sequence[dict]) -> str:
    """The content of the last user turn ("" when there is none): the question being answered."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def _finals(convs: Sequence[dict]) -> set[str]:
    return {final_question(c["messages"]) for c in convs}


def _without(convs: Sequence[dict], questions: set[str]) -> list[dict]:
    """``convs`` minus those with a user turn in ``questions``."""
    return [c for c in convs if not any(m["role"] == "user" and m["content"] in questions for m in c["messages"])]


def split_of(question: str, dev_fraction: float, test_fraction: float) -> str:
    """``test``, ``dev`` or ``train`` by a sha256 of ``question`` (unsalted: stable everywhere)."""
    u = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "dev" if u < test_fraction + dev_fraction else "train"


def prepare(
    path: str | os.PathLike,
    train_out: str | os.PathLike,
    dev_out: str | os.PathLike,
    test_out: str | os.PathLike,
    *,
    dev_fraction: float,
    test_fraction: float,
    max_tokens: int,
    on_bad_rows: str = "error",
    n_prompts: int | None = None,
    n_nll: int | None = None,
    tokenizer: Any = None,
    data_format: str = data_formats.AUTO,
) -> dict:
    """Validate a dataset and write its train/dev/test split (``split_of`` the final question).

    The rows are normalised to ``messages`` from the file's one format (``detect_format``, or
    ``data_format`` when not ``auto``). Leakage is removed after the split: train and dev lose
    every conversation with a user turn that is a test conversation's final question, train also
    those with a dev one. Raises
    ``DataError`` when a split is empty or the test split holds fewer than ``n_prompts``
    (eval.n_prompts) or ``n_nll`` (eval.n_nll) conversations. Writes nothing when it fails.
    Returns a summary (format, counts per split, rows dropped as bad (by reason) or for leakage).
    """
    for key, f in (("dev_fraction", dev_fraction), ("test_fraction", test_fraction)):
        if not 0 < f < 1:
            raise ValueError(f"data.{key} must be in (0, 1), got {f}")
    if dev_fraction + test_fraction >= 1:
        raise ValueError(f"data.dev_fraction + data.test_fraction must be < 1, got {dev_fraction} + {test_fraction}")
    rows, locs = _load_with_locations(path)
    if not rows:
        raise DataError(f"{path}: dataset is empty")
    fmt = detect_format(rows, str(path), data_format, locs)
    good, problems = validate_rows(
        rows, str(path), max_tokens * CHARS_PER_TOKEN, on_bad_rows,
        locations=locs, tokenizer=tokenizer, max_tokens=max_tokens, data_format=fmt,
    )
    split: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for conv in good:
        split[split_of(final_question(conv["messages"]), dev_fraction, test_fraction)].append(conv)
    n_before = {name: len(split[name]) for name in SPLITS}
    test_qs = _finals(split["test"])
    split["dev"] = _without(split["dev"], test_qs)
    split["train"] = _without(split["train"], test_qs | _finals(split["dev"]))
    leaked = {name: n_before[name] - len(split[name]) for name in ("train", "dev")}
    counts = {name: len(split[name]) for name in SPLITS}
    why = (f"{len(good)} usable rows ({len(problems)} bad rows dropped, {leaked['train']} train and "
           f"{leaked['dev']} dev rows dropped for leakage, data.dev_fraction={dev_fraction}, "
           f"data.test_fraction={test_fraction})")
    for name in SPLITS:
        if not counts[name]:
            raise DataError(f"{path}: too few rows: the {name} split is empty; {why}")
    for key, n in (("n_prompts", n_prompts), ("n_nll", n_nll)):
        if n is not None and counts["test"] < n:
            raise DataError(
                f"{path}: too few rows: the test split has {counts['test']} conversations but eval.{key} "
                f"asks for {n}; lower eval.{key} or raise data.test_fraction; {why}"
            )
    with_task = any("task" in c for c in good)
    for name, out in zip(SPLITS, (train_out, dev_out, test_out)):
        _write_parquet(_messages_frame(split[name], with_task), out)
    return {
        "source": str(path),
        "format": fmt,
        "rows_read": len(rows),
        "rows_kept": len(good),
        "rows_dropped": len(problems),
        "dropped_by_reason": dropped_by_reason(problems),
        "problems": problems,
        **{f"{name}_rows": counts[name] for name in SPLITS},
        "leakage_dropped": leaked,
        "split_by": "sha256 of the final user message",
        "dev_fraction": dev_fraction,
        "test_fraction": test_fraction,
        "max_tokens": max_tokens,
    }


def _read_split(parquet_path: str | os.PathLike) -> Any:
    import polars as pl

    path = Path(parquet_path)
    if not path.is_file():
        raise DataError(f"{path}: prepared data not found")
    df = pl.read_parquet(path)
    if "messages" not in df.columns:
        raise DataError(f"{path}: no 'messages' column (columns: {df.columns})")
    return df


def read_conversations(parquet_path: str | os.PathLike) -> list[list[dict]]:
    """The ``messages`` column of a prepared Parquet file as plain lists of dicts."""
    return _read_split(parquet_path)["messages"].to_list()


def as_prompt(messages: Sequence[dict], task: str | None = "") -> dict:
    """An exact-match prompt ``{"messages", "answer", "task"}``: the turns before the last
    assistant turn, whose content is the answer."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages[:last]],
        "answer": messages[last]["content"],
        "task": task or "",
    }


def prompts_from_parquet(parquet_path: str | os.PathLike, n: int | None = None) -> list[dict]:
    """Exact-match prompts (``as_prompt``) of the first ``n`` conversations of a split (None: all)."""
    df = _read_split(parquet_path)
    if n is not None and df.height < n:
        raise DataError(
            f"{parquet_path}: the {Path(parquet_path).stem} split has {df.height} conversations, "
            f"but eval.n_prompts asks for {n} prompts"
        )
    df = df.head(n) if n is not None else df
    tasks = df["task"].to_list() if "task" in df.columns else [""] * df.height
    return [as_prompt(m, t) for m, t in zip(df["messages"].to_list(), tasks)]

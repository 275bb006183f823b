"""The chat dataset row formats ``prepare_data`` accepts, each normalised to ``messages`` rows.

One table, :data:`FORMATS`: a format's detecting keys (a row holding all of them, not null, has
that shape), what a row must look like (for errors) and its normaliser. A file holds one format,
decided from its rows (:func:`detect`) or forced by ``data.format``.

- ``messages``: ``{"messages": [{"role", "content"}, ...]}``, kept as it is.
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...]}``; ``from`` human/user -> user,
  gpt/assistant/model -> assistant, system -> system; an optional top-level ``system`` string
  becomes a leading system turn.
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?}``: one user turn (the instruction,
  then a blank line and the input when the input is not empty) and one assistant turn (the output),
  after the system turn when ``system`` is not empty.

A row's optional ``task`` string is carried over in every format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

AUTO = "auto"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}
ALPACA_SEPARATOR = "\n"  # between the instruction and a non-empty input in the user turn (as LLaMA-Factory joins them)


class RowError(ValueError):
    """A row of the file's format that cannot be normalised (a bad row: dropped or refused per
    ``data.on_bad_rows``)."""


class FormatError(ValueError):
    """A row of another or unknown shape: the file is not one format (always refused)."""


@dataclass(frozen=True)
class Format:
    """A row format: the keys that detect it, what a row must hold, its normaliser."""

    name: str
    keys: tuple[str, ...]
    expects: str
    normalise: Callable[[dict], dict]


def _text(row: dict, key: str, where: str = "") -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise RowError(f"{where}{key!r} is {type(value).__name__}, not a string")
    return value


def _optional_text(row: dict, key: str) -> str:
    return "" if row.get(key) is None else _text(row, key)


def _with_task(row: dict, conv: dict) -> dict:
    if "task" in row:
        conv["task"] = row["task"]
    return conv


def _system(row: dict) -> list[dict]:
    system = _optional_text(row, "system")
    return [{"role": "system", "content": system}] if system else []


def from_messages(row: dict) -> dict:
    """A ``messages`` row as it is (``data._row_problem`` checks its turns)."""
    return row


def from_sharegpt(row: dict) -> dict:
    """A ShareGPT row as ``messages`` (roles mapped by :data:`SHAREGPT_ROLES`)."""
    turns = row["conversations"]
    if not isinstance(turns, (list, tuple)):
        raise RowError(f"'conversations' is a {type(turns).__name__}, not a list")
    msgs = _system(row)
    for j, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RowError(f"turn {j} of 'conversations' is not an object")
        who = turn.get("from")
        if who not in SHAREGPT_ROLES:
            raise RowError(f"turn {j} of 'conversations' has unknown 'from' {who!r} "
                           f"(allowed: {', '.join(SHAREGPT_ROLES)})")
        msgs.append({"role": SHAREGPT_ROLES[who], "content": _text(turn, "value", f"turn {j} ({who}) ")})
    return _with_task(row, {"messages": msgs})


def from_alpaca(row: dict) -> dict:
    """An Alpaca row as a system (when given), user and assistant turn."""
    instruction, extra = _text(row, "instruction"), _optional_text(row, "input")
    user = instruction + ALPACA_SEPARATOR + extra if extra else instruction
    msgs = [*_system(row), {"role": "user", "content": user},
            {"role": "assistant", "content": _text(row, "output")}]
    return _with_task(row, {"messages": msgs})


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("messages", ("messages",), "a 'messages' list of role/content turns", from_messages),
    Format("sharegpt", ("conversations",), "a 'conversations' list of from/value turns", from_sharegpt),
    Format("alpaca", ("instruction", "output"), "'instruction' and 'output' strings (optional 'input', 'system')",
           from_alpaca),
)}
NAMES = (AUTO, *FORMATS)


def _fits(row: Any) -> list[str]:
    if not isinstance(row, dict):
        return []
    return [f.name for f in FORMATS.values() if all(row.get(k) is not None for k in f.keys)]


def shape_of(row: Any) -> str | None:
    """The one format whose detecting keys the row holds (not null), else None."""
    fits = _fits(row)
    return fits[0] if len(fits) == 1 else None


def _expected(names: Sequence[str]) -> str:
    return "; ".join(f"{n}: {FORMATS[n].expects}" for n in names)


def _describe(row: Any) -> str:
    if not isinstance(row, dict):
        return f"a {type(row).__name__}, not an object"
    keys = ", ".join(repr(k) for k, v in row.items() if v is not None) or "(none)"
    fits = _fits(row)
    return f"keys {keys}" + (f", fits several formats: {', '.join(fits)}" if len(fits) > 1 else "")


def detect(rows: Sequence[Any], locations: Sequence[str], forced: str = AUTO) -> str:
    """The format of a file's rows: ``forced``, or the first row's shape when ``auto``.

    Raises :class:`FormatError` naming the first row (its location) of another or unknown shape.
    """
    if forced not in NAMES:
        raise ValueError(f"data.format must be one of {', '.join(NAMES)}, not {forced!r}")
    name, first = (None if forced == AUTO else forced), None
    for row, loc in zip(rows, locations):
        shape = shape_of(row)
        if shape is None:
            expected = _expected([name] if name else list(FORMATS))
            raise FormatError(f"{loc}: row of unknown shape ({_describe(row)}); expected {expected}")
        if name is None:
            name, first = shape, loc
        elif shape != name:
            why = f"the format of {first}" if first else f"data.format: {name}"
            raise FormatError(f"{loc}: {shape}-format row in a file of {name} rows ({why}); one file holds "
                              f"one format: {_expected([name])}")
    return name or "messages"

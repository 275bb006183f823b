"""Tokenized training rows from conversations (assistant-only labels)."""

from __future__ import annotations

from typing import Any

from qatforge.train.settings import TrainingError


def tokenize_split(tokenizer: Any, conversations: list, max_len: int, source: str) -> list[dict]:
    """Pre-tokenized rows {input_ids, labels} (assistant-only labels); rows without targets dropped."""
    from qatforge.chat import IGNORE_INDEX, encode_for_training

    rows = []
    for i, conv in enumerate(conversations):
        try:
            r = encode_for_training(tokenizer, conv, max_len)
        except (ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"{source}: row {i}: cannot encode conversation: {e}") from e
        if any(x != IGNORE_INDEX for x in r["labels"][1:]):
            rows.append(r)
    if not rows:
        raise TrainingError(f"{source}: no conversation has assistant tokens within max_len={max_len}")
    return rows

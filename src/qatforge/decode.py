"""Greedy decoding behind the runtime interface, shared by the reference builder and the evaluation.

``Runtime`` is what every runtime (transformers, llama.cpp, onnxruntime) implements. No torch
import here: GGUF and ONNX evaluations import this module without torch.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, Sequence

import numpy as np


class Runtime(Protocol):
    """What greedy decoding and the evaluation loop need from a runtime."""

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def special_ids(self) -> dict[str, Any]: ...
    def logits(self, ids: Sequence[int]) -> np.ndarray: ...
    def start(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Reset the KV cache, run the prompt, return the last position's logits."""
    def advance(self, token: int) -> np.ndarray:
        """Append one token to the cache, return its logits."""


def greedy(
    rt: Runtime, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: set[int], ignore_stop: bool = False
) -> tuple[list[int], float, float, int]:
    """Argmax decoding with ``rt``'s KV cache; returns (ids, prompt_s, decode_s, decode_steps)."""
    gen: list[int] = []
    steps = 0
    t0 = time.perf_counter()
    nxt = int(rt.start(prompt_ids).argmax())
    t1 = time.perf_counter()
    while len(gen) < max_new_tokens and (ignore_stop or nxt not in stop_ids):
        gen.append(nxt)
        if len(gen) == max_new_tokens:
            break
        nxt = int(rt.advance(nxt).argmax())
        steps += 1
    return gen, t1 - t0, time.perf_counter() - t1, steps

"""Evaluation of a GGUF file with llama.cpp (llama-cpp-python), without torch or transformers.

The chat template comes from the GGUF metadata (``tokenizer.chat_template``) and is rendered by
llama-cpp-python's own Jinja2 chat formatter; llama.cpp tokenizes the text (``special=True``,
BOS only when the model asks for one). The context uses an F32 KV cache (``type_k=0,
type_v=0``) so that F32/F16 files can match the reference exactly; logits of every position
come from evaluating the reference token ids (``logits_all=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qatforge.formats import check_gguf

GGML_TYPE_F32 = 0


class LlamaCppRuntime:
    """A GGUF model in llama.cpp behind the evaluator's runtime interface."""

    def __init__(self, gguf_file: str | Path, *, n_ctx: int, threads: int = 1):
        self.path = Path(gguf_file)
        check_gguf(self.path)  # a clear error before llama.cpp touches a foreign/truncated file
        from llama_cpp import Llama

        self.n_ctx = n_ctx
        self.llm = Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            n_ubatch=min(n_ctx, 512),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            type_k=GGML_TYPE_F32,
            type_v=GGML_TYPE_F32,
            verbose=False,
        )
        self.metadata = dict(self.llm.metadata)
        self.n_vocab = self.llm.n_vocab()
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        self.bos_id = bos if bos is not None and bos >= 0 else None
        self.eos_id = eos if eos is not None and eos >= 0 else None
        self.add_bos = self._add_bos()
        self.template = self.metadata.get("tokenizer.chat_template")
        self._formatter = None
        if self.template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(
                template=self.template,
                eos_token=self._piece(self.eos_id),
                bos_token=self._piece(self.bos_id),
                add_generation_prompt=True,
            )

    def _add_bos(self) -> bool:
        meta = self.metadata.get("tokenizer.ggml.add_bos_token")
        if meta is not None:
            return str(meta).lower() in ("true", "1")
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        return bool(llama_cpp.llama_vocab_get_add_bos(vocab))

    def _piece(self, tok: int | None) -> str:
        if tok is None:
            return ""
        return self.llm.detokenize([tok], special=True).decode("utf-8", errors="replace")

    # --- tokenizer side -------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        if self._formatter is None:
            raise ValueError(f"{self.path}: no tokenizer.chat_template in the GGUF metadata")
        text = self._formatter(messages=list(messages)).prompt
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids), special=False).decode("utf-8", errors="replace")

    def special_ids(self) -> dict[str, Any]:
        return {
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "add_bos": self.add_bos,
            "chat_template": self.template,
        }

    # --- model side -----------------------------------------------------------------------
    def _eval(self, ids: Sequence[int]) -> None:
        if self.llm.n_tokens + len(ids) > self.n_ctx:
            raise ValueError(f"sequence of {self.llm.n_tokens + len(ids)} tokens exceeds n_ctx={self.n_ctx}")
        self.llm.eval(list(ids))

    def _last_logits(self) -> np.ndarray:
        return self.llm.scores[self.llm.n_tokens - 1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self.llm.reset()
        self._eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32, copy=True)

    def start(self, prompt_ids: Sequence[int]) -> np.ndarray:
        self.llm.reset()
        self._eval(prompt_ids)
        return self._last_logits()

    def advance(self, token: int) -> np.ndarray:
        self._eval([token])
        return self._last_logits()


def open_runtime(artifact_path: str | Path, ref: Any, *, format: str, threads: int,
                 max_new_tokens: int) -> tuple[LlamaCppRuntime, dict[str, Any]]:
    """A GGUF file in llama.cpp, with a context that fits the reference's longest sequence."""
    from qatforge.io import package_versions

    longest_prompt = max(len(p) for p in ref.prompt_ids)
    need = max(ref.meta["max_seq_len"], longest_prompt + max(max_new_tokens, ref.meta["max_new_tokens"]))
    n_ctx = int(-(-(need + 8) // 64) * 64)
    rt = LlamaCppRuntime(artifact_path, n_ctx=n_ctx, threads=threads)
    return rt, {"runtime": "llama.cpp", "n_ctx": n_ctx, "kv_cache_type": "f32",
                "gguf_file_type": rt.metadata.get("general.file_type"),
                "runtime_versions": package_versions("llama_cpp_python", "numpy", "jinja2")}

"""Evaluation of a GGUF file with llama.cpp (llama-cpp-python), without torch or transformers.

The chat template comes from the GGUF metadata (``tokenizer.chat_template``) and is rendered by
llama-cpp-python's own Jinja2 chat formatter; llama.cpp tokenizes the text (``special=True``,
BOS only when the model asks for one). The parity context uses an F32 KV cache (``type_k=0,
type_v=0``) so that F32/F16 files can match the reference exactly; logits of every position
come from evaluating the reference token ids (``logits_all=True``).

The speed context (``deployment=True``) keeps the bindings' defaults (KV cache type, batch, flash
attention, only the last logits) and generates with llama.cpp's own greedy sampler, timed by
llama.cpp's perf counters (``llama_perf_context``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qatforge.chat import strip_bos_text
from qatforge.spec.formats import check_gguf

GGML_TYPE_F32 = 0


class LlamaCppRuntime:
    """A GGUF model in llama.cpp behind the evaluator's runtime interface."""

    def __init__(self, gguf_file: str | Path, *, n_ctx: int, threads: int = 1, deployment: bool = False):
        self.path = Path(gguf_file)
        check_gguf(self.path)  # a clear error before llama.cpp touches a foreign/truncated file
        from llama_cpp import Llama

        self.n_ctx = n_ctx
        parity = {} if deployment else dict(
            n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512), logits_all=True,
            type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
        )
        self.llm = Llama(
            model_path=str(self.path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
            **parity,
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
        if self.add_bos:  # llama.cpp's chat rule: the vocabulary's BOS replaces the template's
            text = strip_bos_text(text, self._piece(self.bos_id))
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

    def timed_generate(self, prompt_ids: Sequence[int], n: int) -> tuple[float, float, int, int]:
        """``n`` tokens by llama.cpp's greedy sampler, EOS ignored, from an empty cache.

        Returns (prompt_s, gen_s, prompt_tokens, gen_steps) from llama.cpp's perf counters.
        """
        import llama_cpp

        if len(prompt_ids) + n > self.n_ctx:
            raise ValueError(f"sequence of {len(prompt_ids) + n} tokens exceeds n_ctx={self.n_ctx}")
        self.llm.reset()  # no prefix reuse from the previous run
        llama_cpp.llama_perf_context_reset(self.llm.ctx)
        tokens = self.llm.generate(list(prompt_ids), temp=0.0, repeat_penalty=1.0)
        for _ in zip(range(n), tokens):  # generate() itself never stops at EOS
            pass
        tokens.close()
        perf = llama_cpp.llama_perf_context(self.llm.ctx)
        return perf.t_p_eval_ms / 1e3, perf.t_eval_ms / 1e3, perf.n_p_eval, perf.n_eval


def _n_ctx(ref: Any, max_new_tokens: int) -> int:
    """A context that fits the reference's longest sequence and prompt + generation, in steps of 64."""
    longest_prompt = max(len(p) for p in ref.prompt_ids)
    need = max(ref.meta["max_seq_len"], longest_prompt + max(max_new_tokens, ref.meta["max_new_tokens"]))
    return int(-(-(need + 8) // 64) * 64)


def open_runtime(artifact_path: str | Path, ref: Any, *, format: str, threads: int,
                 max_new_tokens: int) -> tuple[LlamaCppRuntime, dict[str, Any]]:
    """A GGUF file in llama.cpp, with a context that fits the reference's longest sequence."""
    from qatforge.io import package_versions

    n_ctx = _n_ctx(ref, max_new_tokens)
    rt = LlamaCppRuntime(artifact_path, n_ctx=n_ctx, threads=threads)
    return rt, {"runtime": "llama.cpp", "n_ctx": n_ctx, "kv_cache_type": "f32",
                "gguf_file_type": rt.metadata.get("general.file_type"),
                "runtime_versions": package_versions("llama_cpp_python", "numpy", "jinja2")}


def open_speed_runtime(artifact_path: str | Path, ref: Any, *, format: str, threads: int,
                       max_new_tokens: int) -> tuple[LlamaCppRuntime, dict[str, Any]]:
    """The same file in a deployment context: the bindings' defaults, ``threads`` for both phases."""
    import llama_cpp

    rt = LlamaCppRuntime(artifact_path, n_ctx=_n_ctx(ref, max_new_tokens), threads=threads, deployment=True)
    cp = rt.llm.context_params
    kv = {v: k.removeprefix("GGML_TYPE_").lower() for k, v in vars(llama_cpp).items() if k.startswith("GGML_TYPE_")}
    return rt, {"runtime": "llama.cpp", "n_ctx": rt.llm.n_ctx(), "n_batch": cp.n_batch, "n_ubatch": cp.n_ubatch,
                "n_threads": cp.n_threads, "n_threads_batch": cp.n_threads_batch, "logits_all": False,
                "kv_cache_type_k": kv.get(cp.type_k, cp.type_k), "kv_cache_type_v": kv.get(cp.type_v, cp.type_v),
                "flash_attn": {-1: "auto", 0: "off", 1: "on"}.get(cp.flash_attn_type),
                "sampler": "llama.cpp greedy (temp 0), EOS ignored", "timing": "llama_perf_context (t_p_eval_ms, t_eval_ms)"}

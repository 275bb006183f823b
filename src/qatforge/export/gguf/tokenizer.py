"""Tokenizer parity between the HF tokenizer and llama.cpp's, and the texts it is checked on.

llama_cpp and transformers load inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence


def tokenizer_parity(
    gguf_file: str | os.PathLike, tokenizer_dir: str | os.PathLike, texts: Sequence[str], *, max_report: int = 5
) -> dict[str, Any]:
    """Tokenize ``texts`` with llama.cpp (``Llama(vocab_only=True)``) and with the HF tokenizer.

    Both parse special-token text and follow the one BOS rule (:func:`qatforge.chat.bos_policy`):
    HF through :func:`qatforge.chat.encode`, llama.cpp with the GGUF's ``add_bos`` after dropping a
    leading BOS text, as its chat code does. Returns
    ``{"n": N, "identical": k, "add_bos": bool, "mismatches": [{"index", "text", "hf", "llama"}...]}``.
    """
    import llama_cpp
    from qatforge.model import auto_tokenizer

    from qatforge.chat import encode, strip_bos_text

    hf = auto_tokenizer(tokenizer_dir)
    llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
    try:
        mismatches, same = [], 0
        for i, text in enumerate(texts):
            ids_hf = encode(hf, text)
            ll_text = strip_bos_text(text, hf.bos_token) if add_bos else text
            ids_ll = list(llm.tokenize(ll_text.encode("utf-8"), add_bos=add_bos, special=True)) if text else []
            if ids_hf == ids_ll:
                same += 1
            elif len(mismatches) < max_report:
                mismatches.append({"index": i, "text": text[:200], "hf": ids_hf[:64], "llama": ids_ll[:64]})
    finally:
        llm.close()
    return {"n": len(texts), "identical": same, "add_bos": add_bos, "mismatches": mismatches}


def default_parity_texts(tokenizer_dir: str | os.PathLike) -> list[str]:
    """A small built-in corpus: edge-case strings plus a rendered multi-turn chat."""
    from qatforge.model import auto_tokenizer

    tok = auto_tokenizer(tokenizer_dir)
    texts = [
        "Hello, world!", "  two  spaces and a tab\t", "line one\nline two\r\n\n", "123 4567 89.5 1,000",
        "don't can't I'll we've", "Ünïcödé café — 日本語 🚀🦙", "", " ", "a" * 300,
    ]
    chat = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And 7 * 6?"},
    ]
    if getattr(tok, "chat_template", None):  # the edge cases also as a runtime sees them: in a chat
        texts += [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                  for t in texts if t.strip()]
        texts.append(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    return texts


def parity_texts_from_parquet(
    parquet: str | os.PathLike, tokenizer_dir: str | os.PathLike, *, limit: int = 1000
) -> list[str]:
    """Tokenizer-parity corpus: up to ``limit`` rendered chats of a prepared split, plus edge cases."""
    from qatforge.model import auto_tokenizer

    from qatforge.data import read_conversations

    tok = auto_tokenizer(tokenizer_dir)
    convs = read_conversations(parquet)[:limit]
    texts = [tok.apply_chat_template(list(c), tokenize=False) for c in convs]
    return texts + default_parity_texts(tokenizer_dir)


def prefix_space_rule(tokenizer_dir: str | os.PathLike) -> dict[str, Any] | None:
    """What llama.cpp must be told so that it splits chats like HF, when it can be told.

    A SentencePiece tokenizer with ``legacy: false`` (a ``Metaspace`` pre-tokenizer with
    ``prepend_scheme: "first"``) prepends "▁" only at the very start of a text, never after a
    special token; llama.cpp's SentencePiece tokenizer prepends it at the start *and* after every
    special token (``tokenizer.ggml.add_space_prefix`` true) or nowhere (false). When the chat
    template starts with a special token, no chat text gets the prefix in HF, so ``false`` makes the
    two agree on every chat; raw text that starts with ordinary characters still differs in its
    first piece. Returns ``{"add_space_prefix": False, "reason"}`` for that case, else None.
    """
    import json

    from qatforge.model import auto_tokenizer

    from qatforge.chat import render

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        return None

    def first_only(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                return True
            return any(first_only(v) for v in node.values())
        return isinstance(node, list) and any(first_only(v) for v in node)

    spec = json.loads(path.read_text(encoding="utf-8"))
    if not first_only([spec.get("pre_tokenizer"), spec.get("normalizer")]):
        return None
    tok = auto_tokenizer(tokenizer_dir)
    if not getattr(tok, "chat_template", None):
        return None
    probe = render(tok, [{"role": "user", "content": "x"}], add_generation_prompt=True)
    if not starts_with_special(probe, tok):
        return None
    return {"add_space_prefix": False,
            "reason": "HF prepends '▁' only at a text's start (Metaspace prepend_scheme 'first', legacy: false) and "
                      "the chat template starts with a special token, so no chat text gets it; llama.cpp "
                      "would add it after every special token"}


def starts_with_special(text: str, tokenizer: Any) -> bool:
    """Whether ``text`` begins with the text of one of the tokenizer's special tokens."""
    return any(t and text.startswith(t) for t in tokenizer.all_special_tokens)

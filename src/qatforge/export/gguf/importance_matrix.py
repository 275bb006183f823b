"""Importance matrices with ``llama-imatrix``: on a calibration text, or on the training split rendered
with the chat template."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from qatforge.export.gguf.read import imatrix_info
from qatforge.export.gguf.tools import run_tool, tool_info
from qatforge.export.record import as_log, write_export_record
from qatforge.io import atomic_file


def write_calibration_text(
    conversations: Iterable[Sequence[Mapping[str, str]]], tokenizer_dir: str | os.PathLike, out_file: str | os.PathLike
) -> dict[str, Any]:
    """Render chats with the model's chat template into one calibration text file (atomically)."""
    from qatforge.model import auto_tokenizer

    tok = auto_tokenizer(tokenizer_dir)
    n, chars = 0, 0
    with atomic_file(out_file) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for conv in conversations:
            text = tok.apply_chat_template(list(conv), tokenize=False)
            f.write(text)
            n, chars = n + 1, chars + len(text)
    if n == 0:
        Path(out_file).unlink(missing_ok=True)
        raise ValueError("no conversations to render into the calibration text")
    return {"conversations": n, "chars": chars}


def imatrix_from_parquet(
    model_gguf: str | os.PathLike,
    train_parquet: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    chunks: int = 32,
    ctx: int = 256,
    seed: int = 0,
    threads: int = 1,
    tokenizer_dir: str | os.PathLike | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """``imatrix`` on the training split: conversations shuffled with ``seed``, rendered with the chat
    template (of ``tokenizer_dir``, default the merged dir recorded for ``model_gguf``) into a
    temporary calibration text beside ``out_file``."""
    import hashlib
    import json
    import random

    from qatforge.data import read_conversations
    from qatforge.io import manifest_path

    model_gguf, out_file = Path(model_gguf), Path(out_file)
    if tokenizer_dir is None:
        rec = manifest_path(model_gguf)
        merged = json.loads(rec.read_text())["provenance"]["source"].get("merged_dir") if rec.is_file() else None
        if not merged:
            raise ValueError(f"no tokenizer_dir given and {rec} does not name the merged checkpoint")
        tokenizer_dir = merged
    convs = read_conversations(train_parquet)
    random.Random(seed).shuffle(convs)
    calib = out_file.with_name(f".{out_file.name}.calibration.txt")
    try:
        stats = write_calibration_text(convs, tokenizer_dir, calib)
        digest = hashlib.sha256(calib.read_bytes()).hexdigest()
        src = {"train": str(train_parquet), "conversations": stats["conversations"], "seed": seed,
               "calibration_sha256": digest, "gguf": model_gguf.name}
        return imatrix(model_gguf, calib, out_file, chunks=chunks, ctx=ctx, threads=threads, source=src, log=log)
    finally:
        calib.unlink(missing_ok=True)


def imatrix(
    model_gguf: str | os.PathLike,
    calibration_text: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    chunks: int = 32,
    ctx: int = 256,
    threads: int = 1,
    source: Mapping[str, Any] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Compute an importance matrix (GGUF format) with ``llama-imatrix``; write ``<out_file>.json``.

    Special tokens in the text (chat markup) are parsed as tokens. The text must hold at least
    ``2 * ctx`` tokens; at most ``chunks`` windows of ``ctx`` tokens are processed.
    """
    from qatforge import llamacpp

    log = as_log(log)
    model_gguf, calibration_text, out_file = Path(model_gguf), Path(calibration_text), Path(out_file)
    for p in (model_gguf, calibration_text):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found")
    tool = llamacpp.find_tool("llama-imatrix")
    started = time.perf_counter()
    with atomic_file(out_file) as tmp:
        # Run beside the calibration text and name it relatively: the dataset name llama-imatrix
        # records (and llama-quantize copies into every quant) is then path-independent.
        cmd = [tool, "-m", model_gguf.resolve(), "-f", calibration_text.name, "-o", tmp.resolve(),
               "--output-format", "gguf", "--chunks", str(chunks), "-c", str(ctx), "-b", str(ctx),
               "-t", str(threads), "--parse-special"]
        out = run_tool(cmd, log, cwd=calibration_text.parent, what=f"llama-imatrix on {model_gguf.name}")
        if not tmp.stat().st_size:
            raise RuntimeError(f"llama-imatrix wrote nothing to {tmp}:\n{out[-2000:]}")
        im = imatrix_info(tmp)
    # Running perplexity per chunk ("[1]505.85,[2]477.57,..."); the last value covers all chunks.
    ppl = re.findall(r"\[(\d+)\]([0-9]+(?:\.[0-9]+)?)", out)
    settings = {"chunks": chunks, "ctx": ctx, "threads": threads, "calibration_text": calibration_text.name}
    extra = {"entries": im["entries"], "chunks_processed": im["chunks"],
             "perplexity": float(ppl[-1][1]) if ppl else None}
    src = dict(source) if source else {}
    src.setdefault("gguf", model_gguf.name)
    record = write_export_record(out_file, source=src, tool=tool_info() | {"executable": str(tool)},
                                 settings=settings, started=started, **extra)
    log(f"wrote {out_file}: {extra}")
    return record["provenance"] | {"size_bytes": record["size_bytes"], "sha256": record["sha256"]}

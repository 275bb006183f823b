"""Reading GGUF files with gguf-py (imported inside the functions): metadata, tensor types, the
embedding tie, what an imatrix file holds. Nothing is modified."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable


def gguf_metadata(gguf_file: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """Scalar/string metadata of a GGUF file (arrays are summarised by their length)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(gguf_file))
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or (keys is not None and name not in keys):
            continue
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            out[name] = f"<array of {len(field.data)}>"
        else:
            value = field.contents()
            out[name] = value.item() if hasattr(value, "item") else value
    return out


def tensor_type_histogram(gguf_file: str | os.PathLike) -> dict[str, int]:
    """Number of tensors per ggml type in ``gguf_file``, e.g. ``{"F32": 9, "Q4_K": 12, "Q6_K": 4}``."""
    from gguf import GGUFReader

    hist: dict[str, int] = {}
    for t in GGUFReader(str(gguf_file)).tensors:
        hist[t.tensor_type.name] = hist.get(t.tensor_type.name, 0) + 1
    return dict(sorted(hist.items()))


def tensor_types(gguf_file: str | os.PathLike) -> dict[str, str]:
    """``{tensor name: ggml type}`` of every tensor in ``gguf_file``."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(gguf_file)).tensors}


def embedding_tie(gguf_file: str | os.PathLike, hf_dir: str | os.PathLike) -> dict[str, Any]:
    """Whether the GGUF keeps the HF checkpoint's embedding tie: llama.cpp writes no ``output.weight``
    for a tied model (the output layer reads ``token_embd.weight``)."""
    from qatforge.export.record import hf_tied_embeddings

    source_tied = hf_tied_embeddings(hf_dir)
    has_output = "output.weight" in tensor_types(gguf_file)
    return {"source_tied": source_tied, "output_tensor": has_output, "tied": not has_output}


def imatrix_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a GGUF imatrix file holds: entry count, datasets, chunks (read with gguf-py, never modified)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    names = [t.name[: -len(".in_sum2")] for t in reader.tensors if t.name.endswith(".in_sum2")]
    if not names:
        raise ValueError(f"{path}: not a GGUF imatrix file (no '*.in_sum2' tensors)")

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    return {"file": Path(path).name, "entries": len(names), "chunks": field("imatrix.chunk_count"),
            "chunk_size": field("imatrix.chunk_size"), "datasets": list(field("imatrix.datasets") or [])}

"""The pre-CLI quantizer, kept only as a test reference: ``llama_model_quantize`` through the
llama_cpp bindings, with the imatrix read and normalised in Python and passed with the metadata
llama-quantize records. ``qatforge.export.gguf.quantize`` (the ``llama-quantize`` tool) must write
byte-identical files.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


def _imatrix_entries(path: Path) -> tuple[dict[str, np.ndarray], list[str], int | None]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sums = {t.name[: -len(".in_sum2")]: np.asarray(t.data, np.float32).reshape(-1)
            for t in reader.tensors if t.name.endswith(".in_sum2")}
    counts = {t.name[: -len(".counts")]: np.rint(np.asarray(t.data, np.float32).reshape(-1))
              for t in reader.tensors if t.name.endswith(".counts")}
    entries = {}
    for name, s in sums.items():
        c = counts[name][:, None]
        entries[name] = np.ascontiguousarray(
            np.where(c > 0, s.reshape(len(c), -1) / np.maximum(c, 1), 1.0).astype(np.float32).reshape(-1))
    field = reader.fields.get("imatrix.datasets")
    chunks = reader.fields.get("imatrix.chunk_count")
    return entries, list(field.contents()) if field else [], int(chunks.contents()) if chunks else None


def quantize_with_bindings(src: Path, out: Path, qtype: str, imatrix: Path | None = None, threads: int = 2) -> None:
    import llama_cpp

    from qatforge.spec.quant_types import QUANT_FTYPES

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype = threads, QUANT_FTYPES[qtype]
    keep = []
    if imatrix is not None:
        entries, datasets, chunks = _imatrix_entries(imatrix)
        arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        for i, (name, vals) in enumerate(sorted(entries.items())):
            buf = ctypes.create_string_buffer(name.encode())
            keep += [buf, vals]
            arr[i].name = ctypes.cast(buf, ctypes.c_char_p)
            arr[i].data = vals.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = vals.size
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        kv = [("quantize.imatrix.file", imatrix.name)]
        kv += [("quantize.imatrix.dataset", datasets[0])] if datasets else []
        kv += [("quantize.imatrix.entries_count", len(entries))]
        kv += [("quantize.imatrix.chunks_count", chunks)] if chunks else []
        kvo = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
        for i, (key, value) in enumerate(kv):
            kvo[i].key = key.encode()
            if isinstance(value, str):
                kvo[i].tag, kvo[i].value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
            else:
                kvo[i].tag, kvo[i].value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, int(value)
        kvo[len(kv)].key = b""
        keep += [arr, kvo]
        params.kv_overrides = ctypes.cast(kvo, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")

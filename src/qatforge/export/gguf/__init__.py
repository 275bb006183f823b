"""GGUF export with llama.cpp's own tools: converter, ``llama-quantize`` and ``llama-imatrix``.

* ``conversion``: HF checkpoint -> GGUF with the vendored converter, refused unless llama.cpp
  tokenizes like HF (``tokenizer``);
* ``quantization``: ``llama-quantize``, with shape fallbacks reported or refused;
* ``block_scales``: a QAT run's learned Q4_0 block scales written into ``llama-quantize``'s file;
* ``importance_matrix``: ``llama-imatrix``;
* ``read``: what a GGUF file holds; ``tools``: running the tools, their provenance;
* ``precheck``: the checks of the base before any training.

All tools come from one build of the pinned llama.cpp sources (``make install``). Every artifact
is written atomically and gets a ``<file>.json`` record (``write_export_record``). Only
``quant_types`` data is needed at import; llama_cpp/gguf/transformers load inside functions.
This package re-exports the public names of its modules (not ``precheck``).
"""

from __future__ import annotations

from qatforge.export.gguf.conversion import convert, convert_checked
from qatforge.export.gguf.importance_matrix import imatrix, imatrix_from_parquet, write_calibration_text
from qatforge.export.gguf.quantization import (GGUF_PROJECTIONS, QK_K, FallbackError, check_trained_types,
                                               find_fallbacks, planned_types, quantize, quantize_command)
from qatforge.export.gguf.read import embedding_tie, gguf_metadata, imatrix_info, tensor_type_histogram, tensor_types
from qatforge.export.gguf.tokenizer import (default_parity_texts, parity_texts_from_parquet, prefix_space_rule,
                                            starts_with_special, tokenizer_parity)
from qatforge.export.gguf.tools import run_tool, tool_info

__all__ = [
    "FallbackError", "GGUF_PROJECTIONS", "QK_K", "check_trained_types", "convert", "convert_checked",
    "default_parity_texts", "embedding_tie", "find_fallbacks", "gguf_metadata", "imatrix", "imatrix_from_parquet",
    "imatrix_info", "parity_texts_from_parquet", "planned_types", "prefix_space_rule", "quantize",
    "quantize_command", "run_tool", "starts_with_special", "tensor_type_histogram", "tensor_types",
    "tokenizer_parity", "tool_info", "write_calibration_text",
]

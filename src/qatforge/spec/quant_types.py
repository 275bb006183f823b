"""llama.cpp's quantization types, GGUF output types and llama-quantize options, and the check of a
quant against them: standard library only (the config validator imports this at parse time).

The names and ftype numbers are those of llama.cpp's ``llama.h`` (``LLAMA_FTYPE_MOSTLY_*``) in the
pinned llama-cpp-python 0.3.36; ``tests/test_export_gguf.py`` checks them against the installed
``llama_cpp`` bindings and gguf reader.
"""

from __future__ import annotations

from typing import Any, Mapping

QUANT_FTYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21,
    "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27,
    "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36,
    "TQ2_0": 37, "MXFP4_MOE": 38, "NVFP4": 39, "Q1_0": 40, "Q2_0": 41,
}
QUANT_NAMES: tuple[str, ...] = tuple(QUANT_FTYPES)

# Types that llama-quantize refuses (or that are useless) without an importance matrix.
NEEDS_IMATRIX: frozenset[str] = frozenset(
    {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"}
)

# ggml tensor types (name -> GGML_TYPE_* of the vendored ggml.h). The llama_cpp bindings omit some
# (BF16, TQ*) and PyPI's gguf 0.19.0 lacks Q2_0, so this table is static; a test checks it against both.
GGML_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9, "Q2_K": 10,
    "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15, "IQ2_XXS": 16, "IQ2_XS": 17,
    "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23, "I8": 24,
    "I16": 25, "I32": 26, "I64": 27, "F64": 28, "IQ1_M": 29, "BF16": 30, "TQ1_0": 34, "TQ2_0": 35,
    "MXFP4": 39, "NVFP4": 40, "Q1_0": 41, "Q2_0": 42,
}
# Types valid for output_tensor_type / token_embedding_type (storage types, not internal ones).
TENSOR_TYPE_NAMES: tuple[str, ...] = tuple(
    n for n in GGML_TYPES if n not in ("Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64")
)

# The converter's --outtype values (gguf.outtype): the unquantized GGUF, named by its upper-cased type.
OUTTYPES: tuple[str, ...] = ("f32", "f16", "bf16")
FULL_PRECISION_TYPES: frozenset[str] = frozenset(t.upper() for t in OUTTYPES)

# llama-quantize's options, the keys of a gguf.quants entry besides type and imatrix: option -> (flag,
# kind). Kinds: "switch" (the flag alone, when true), "type" (flag <ggml type>), "tensor_types" (flag
# <name pattern>=<ggml type> per entry) and "kv" (flag <key>=<value type>:<value> per entry).
QUANT_OPTIONS: dict[str, tuple[str, str]] = {
    "pure": ("--pure", "switch"),
    "leave_output_tensor": ("--leave-output-tensor", "switch"),
    "output_tensor_type": ("--output-tensor-type", "type"),
    "token_embedding_type": ("--token-embedding-type", "type"),
    "allow_requantize": ("--allow-requantize", "switch"),
    "tensor_type": ("--tensor-type", "tensor_types"),
    "override_kv": ("--override-kv", "kv"),
}


def check_quant(qtype: str, has_imatrix: bool = False, options: Mapping[str, Any] | None = None) -> None:
    """Raise ``ValueError`` for an unknown type (listing the valid ones), a missing imatrix or a bad
    option (None values are unset)."""
    if qtype not in QUANT_FTYPES:
        raise ValueError(f"unknown llama.cpp quantization type {qtype!r}; valid types: {', '.join(QUANT_NAMES)}")
    if qtype in NEEDS_IMATRIX and not has_imatrix:
        raise ValueError(f"type {qtype} needs an importance matrix; set imatrix: true")
    for key, value in (options or {}).items():
        if key not in QUANT_OPTIONS:
            raise ValueError(f"unknown quantization option {key!r}; valid options: {', '.join(QUANT_OPTIONS)}")
        kind = QUANT_OPTIONS[key][1]
        if value is None or kind == "switch":
            continue
        if kind == "type" and value not in TENSOR_TYPE_NAMES:
            raise ValueError(f"{key}: unknown ggml tensor type {value!r}; valid: {', '.join(TENSOR_TYPE_NAMES)}")
        if kind == "tensor_types":
            if not isinstance(value, Mapping):
                raise ValueError(f"{key} must map tensor-name patterns to ggml types, got {value!r}")
            for pattern, ttype in value.items():
                if not pattern or "=" in pattern or ttype not in TENSOR_TYPE_NAMES:
                    raise ValueError(f"{key}: {pattern!r}: {ttype!r} is not '<pattern>: <ggml type>'; "
                                     f"valid types: {', '.join(TENSOR_TYPE_NAMES)}")
        if kind == "kv":
            if not isinstance(value, Mapping):
                raise ValueError(f"{key} must map GGUF metadata keys to values, got {value!r}")
            for k, v in value.items():
                if not k or "=" in k or len(k) >= 128 or not isinstance(v, (str, int, float, bool)) \
                        or (isinstance(v, str) and len(v.encode()) >= 128):
                    raise ValueError(f"{key}: {k!r}: {v!r} is not a metadata key (< 128 bytes, no '=') "
                                     f"with a str (< 128 bytes), int, float or bool value")

"""QAT / torchao scheme names, parsing and device support: pure, no torch import.

Imported by the config validator at Snakefile parse time and by jobs whose env has no torch, so
everything here must answer from the scheme name, the given CUDA capability and
``importlib.util.find_spec`` alone. Each scheme names its torchao config class;
:func:`qatforge.qat.torchao_configs` builds it from the scheme's fields.

Names are Unsloth's (``_prepare_model_for_qat``, torchao 0.18): ``int4``, ``int8-int4`` (alias
``phone-deployment``), ``fp8-int4``, ``fp8-fp8``, ``int8``; plus explicit weight-only specs
``int<bits>-w<group>`` (e.g. ``int2-w128``; also written ``w2g128`` or as a mapping
``{weight_dtype: int2, group_size: 128}``) mapped to ``IntxWeightOnlyConfig(int<bits>, PerGroup(group))``.
Format-targeted schemes train merge-exact against another runtime's own quantizer and ship in its
format: ``gguf-q4_0`` / ``gguf-q8_0`` (llama.cpp, :class:`GGUFRecipe`) and ``onnx-int4`` (ONNX
Runtime's MatMulNBits as the GenAI builder writes it, :class:`ONNXRecipe`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping

ALIASES = {"phone-deployment": "int8-int4"}
SPEC_FORMS = "int<bits>-w<group> (e.g. int2-w128), w<bits>g<group>, or {weight_dtype: int<bits>, group_size: <group>}"
CPU_SCHEMES_HINT = "int8-int4, int8 or a weight-only spec such as int4-w32 / int2-w128"
FP8_MIN_CAPABILITY = (8, 9)

_SPEC = re.compile(r"^int([1-8])-w([1-9][0-9]*)$")
_SPEC_SHORT = re.compile(r"^w([1-8])g([1-9][0-9]*)$")


@dataclass(frozen=True)
class GGUFRecipe:
    """What a GGUF-targeted scheme trains under and ``llama-quantize`` writes: llama.cpp's own QAT
    target (``causal-quantize-qat-Q4_0``, PR #15588): the block projections at ``weights``, the token
    embedding and the output at their own types. Weights are fake-quantized bit-identically to
    llama.cpp's reference quantizer of each type (``qatforge.gguf_fake_quant``); activations as
    ggml's CPU dot product quantizes them for these weight types (Q8_0 blocks of 32)."""

    weights: str  # the LoRA-targeted linears (blk.<i>.attn_q, ffn_down, ...)
    token_embedding: str  # token_embd.weight
    output: str  # output.weight; with tied embeddings token_embd is the output and takes this type
    activations: str = "Q8_0"

    def quant_spec(self) -> dict[str, str]:
        """The ``gguf.quants`` entry that writes this mix (llama-quantize's own flags)."""
        return {"type": self.weights, "token_embedding_type": self.token_embedding, "output_tensor_type": self.output}

    def embedding_type(self, tied: bool) -> str:
        """The type ``token_embd`` is written in: llama-quantize gives a tied one the output's type."""
        return self.output if tied else self.token_embedding


@dataclass(frozen=True)
class ONNXRecipe:
    """What an ONNX-targeted scheme trains under and the ONNX Runtime GenAI builder writes: every
    projection and the LM head as symmetric ``MatMulNBits`` of ``bits`` in blocks of ``block_size``
    along the input dimension, weights fake-quantized bit-identically to the builder's quantizer
    (``qatforge.onnx_fake_quant``); activations as ``accuracy_level`` 4 computes (int8 per block,
    the builder's CPU default). The token embedding stays float unless tied to the LM head."""

    bits: int
    block_size: int

    @property
    def variant(self) -> str:
        """The ``onnx.variants`` entry the run ships as (named after its precision)."""
        return f"int{self.bits}"

    def builder_settings(self) -> dict[str, Any]:
        """The ``onnx.variants`` settings that write this recipe (the builder's own options)."""
        return {"precision": f"int{self.bits}", "block_size": self.block_size}


@dataclass(frozen=True)
class Scheme:
    """A parsed scheme. ``group_size`` None means per-output-channel (per-axis) weights."""

    name: str  # canonical name (aliases resolved, specs normalised to int<bits>-w<group>)
    weight_bits: int | str  # 8, 4, 2, ... or "fp8"
    group_size: int | None
    activation: str | None  # None (weight-only), "int8" or "fp8" dynamic activations
    embedding: bool  # the input embedding is quantized too (int8 per row)
    unsloth: bool  # one of Unsloth's names
    min_cuda_capability: tuple[int, int] | None  # None: runs on CPU
    kernel_package: str | None  # extra package whose kernels the real quantization needs
    torchao: str | None  # the linears' torchao config class (built by qatforge.qat); None: GGUF-targeted
    gguf: GGUFRecipe | None = None  # GGUF-targeted: trained merge-exact only, ships as that GGUF quant
    onnx: ONNXRecipe | None = None  # ONNX-targeted: trained merge-exact only, ships as that ONNX variant

    @property
    def target(self) -> str:
        """The format the scheme's QAT file ships in: ``gguf``, ``onnx`` or ``torchao``."""
        return "gguf" if self.gguf else "onnx" if self.onnx else "torchao"

    @property
    def weight_only(self) -> bool:
        return self.activation is None

    def scale_grid(self, weight_type: str | None = None) -> str | None:
        """The block grid whose per-block scales a merge-exact run can learn and its file store
        (``qat.block_scales: learned``; ``qatforge.learned_scales.GRIDS``), for a linear written as
        ``weight_type`` (GGUF; default the recipe's projection type), or None: GGUF Q4_0, ONNX
        MatMulNBits int4 in blocks of 32, and TorchAO int8-int4 (int4 weights in groups of 32)."""
        if self.gguf:
            return "Q4_0" if (weight_type or self.gguf.weights) == "Q4_0" else None
        if self.onnx and (self.onnx.bits, self.onnx.block_size) == (4, 32):
            return "MatMulNBits int4"
        if self.torchao == "Int8DynamicActivationIntxWeightConfig" and (self.weight_bits, self.group_size) == (4, 32):
            return "torchao int4"
        return None


SchemeLike = str | Mapping[str, Any] | Scheme  # a name, alias or spec as configured, or a parsed Scheme

_TABLE = {s.name: s for s in (
    Scheme("int4", 4, 128, None, False, True, (0, 0), "mslk", "Int4WeightOnlyConfig"),
    Scheme("int8-int4", 4, 32, "int8", True, True, None, None, "Int8DynamicActivationIntxWeightConfig"),
    Scheme("fp8-int4", 4, 128, "fp8", False, True, FP8_MIN_CAPABILITY, "mslk",
           "Float8DynamicActivationInt4WeightConfig"),
    Scheme("fp8-fp8", "fp8", None, "fp8", False, True, FP8_MIN_CAPABILITY, None,
           "Float8DynamicActivationFloat8WeightConfig"),
    Scheme("int8", 8, None, None, False, True, None, None, "IntxWeightOnlyConfig"),
    Scheme("gguf-q4_0", 4, 32, "q8_0", True, False, None, None, None, GGUFRecipe("Q4_0", "Q8_0", "Q8_0")),
    Scheme("gguf-q8_0", 8, 32, "q8_0", True, False, None, None, None, GGUFRecipe("Q8_0", "Q8_0", "Q8_0")),
    Scheme("onnx-int4", 4, 32, "int8", False, False, None, None, None, onnx=ONNXRecipe(4, 32)),
)}
UNSLOTH_SCHEMES = tuple(name for name, s in _TABLE.items() if s.unsloth)
SCHEMES = tuple(_TABLE) + tuple(ALIASES)


def _weight_only(bits: int, group: int) -> Scheme:
    return Scheme(f"int{bits}-w{group}", bits, group, None, False, False, None, None, "IntxWeightOnlyConfig")


def parse_scheme(scheme: SchemeLike) -> Scheme:
    """Parse a scheme name, alias or explicit weight-only spec (a ``Scheme`` is returned as it is);
    ``ValueError`` lists the valid forms."""
    if isinstance(scheme, Scheme):
        return scheme
    if isinstance(scheme, Mapping):
        unknown = set(scheme) - {"weight_dtype", "group_size"}
        if unknown:
            raise ValueError(f"qat scheme mapping has unknown keys {sorted(unknown)}; expected weight_dtype, group_size")
        dtype, group = scheme.get("weight_dtype"), scheme.get("group_size")
        m = re.fullmatch(r"(?:torch\.)?int([1-8])", str(dtype))
        if not m:
            raise ValueError(f"qat scheme weight_dtype {dtype!r} is not one of int1..int8")
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"qat scheme group_size {group!r} is not a positive integer")
        return _weight_only(int(m.group(1)), group)
    if not isinstance(scheme, str):
        raise ValueError(f"qat scheme must be a name or a mapping, got {type(scheme).__name__}")
    name = ALIASES.get(scheme, scheme)
    if name in _TABLE:
        return _TABLE[name]
    m = _SPEC.match(scheme) or _SPEC_SHORT.match(scheme)
    if m:
        return _weight_only(int(m.group(1)), int(m.group(2)))
    raise ValueError(
        f"unknown qat scheme {scheme!r}; valid: {', '.join(SCHEMES)}, or a weight-only spec {SPEC_FORMS}"
    )


def gguf_type(scheme: SchemeLike) -> str | None:
    """The llama.cpp type a GGUF-targeted scheme trains its projections for (``Q4_0``), None for torchao schemes."""
    recipe = parse_scheme(scheme).gguf
    return recipe.weights if recipe else None


def gguf_recipe(scheme: SchemeLike) -> GGUFRecipe | None:
    """The GGUF mix a GGUF-targeted scheme trains under and ships as, None for torchao schemes."""
    return parse_scheme(scheme).gguf


def matched_artifact(scheme: SchemeLike) -> tuple[str, str]:
    """The (format, variant) a QAT run of ``scheme`` trains for: its TorchAO checkpoint, for a GGUF
    scheme the GGUF quant named after its type (``gguf.quants.Q4_0``), for an ONNX scheme the ONNX
    variant named after its precision (``onnx.variants.int4``)."""
    s = parse_scheme(scheme)
    if s.gguf:
        return "gguf", s.gguf.weights
    if s.onnx:
        return "onnx", s.onnx.variant
    return "torchao", s.name


def canonical(scheme: SchemeLike) -> str:
    """The canonical (file-name safe) name of a scheme: aliases resolved, specs normalised."""
    return parse_scheme(scheme).name


def _has_package(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def device_support(
    scheme: SchemeLike, cuda_capability: tuple[int, int] | None = None
) -> tuple[bool, str]:
    """Whether ``scheme`` can be trained and really quantized on a device, and why not.

    ``cuda_capability`` is the GPU's (major, minor) compute capability, None for CPU only (see
    :func:`detect_cuda_capability`). Pure: no torch import.
    """
    try:
        s = parse_scheme(scheme)
    except ValueError as e:
        return False, str(e)
    if s.min_cuda_capability is not None:
        if cuda_capability is None:
            what = "fp8 dynamic activations need" if s.activation == "fp8" else "its int4 kernels need"
            return False, (
                f"scheme {s.name!r} cannot run on this CPU-only machine: {what} a CUDA GPU"
                + (f" of compute capability >= {s.min_cuda_capability[0]}.{s.min_cuda_capability[1]}"
                   if s.min_cuda_capability > (0, 0) else "")
                + (f" and the {s.kernel_package!r} kernel package" if s.kernel_package else "")
                + f"; use {CPU_SCHEMES_HINT} instead"
            )
        if tuple(cuda_capability) < s.min_cuda_capability:
            need = ".".join(map(str, s.min_cuda_capability))
            have = ".".join(map(str, cuda_capability))
            return False, (
                f"scheme {s.name!r} needs CUDA compute capability >= {need} (fp8), this GPU has {have}; "
                f"use int4, {CPU_SCHEMES_HINT} instead"
            )
    if s.kernel_package and not _has_package(s.kernel_package):
        return False, (
            f"scheme {s.name!r}: torchao 0.18's int4 tensors need the {s.kernel_package!r} kernel package, "
            f"which is not installed; install it or use {CPU_SCHEMES_HINT} instead"
        )
    return True, "ok"


def problems(scheme: SchemeLike, cuda_capability: tuple[int, int] | None = None) -> list[str]:
    """Config-validator form of :func:`device_support`: an empty list when the scheme is usable."""
    ok, reason = device_support(scheme, cuda_capability)
    return [] if ok else [reason]


def detect_cuda_capability() -> tuple[int, int] | None:
    """The first CUDA GPU's compute capability, or None; torch-free, for Snakefile parse time.

    ``QATFORGE_CUDA_CAPABILITY`` (``8.9`` or ``none``) overrides the probe; otherwise
    ``nvidia-smi`` is asked when it is on PATH (no GPU driver → None).
    """
    env = os.environ.get("QATFORGE_CUDA_CAPABILITY")
    if env is not None:
        return _parse_capability(env, "QATFORGE_CUDA_CAPABILITY")
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return _parse_capability(lines[0], "nvidia-smi") if lines else None


def _parse_capability(text: str, source: str) -> tuple[int, int] | None:
    text = text.strip().lower()
    if text in ("", "none", "cpu"):
        return None
    m = re.fullmatch(r"(\d+)\.(\d+)", text)
    if not m:
        raise ValueError(f"{source}: compute capability {text!r} is not of the form 8.9 (or 'none')")
    return int(m.group(1)), int(m.group(2))

"""The artifact formats, one record each, and the results layout; also the GGUF header check.

The one place these facts live: a new format is a :class:`Format` in :data:`FORMATS` (plus its
exporter, its runtime, its rules and its config section). Imported at Snakefile parse time, so the
standard library only: exporters, runtimes and capability checks are named here and imported by
their users (:func:`resolve`).
"""

from __future__ import annotations

import importlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from qatforge.spec.quant_types import FULL_PRECISION_TYPES

# The base model, built by the build_base rule; each run's files live under run_dir(run).
BASE_DIR = "results/base"


def run_dir(run: str, *parts: str) -> str:
    """``results/runs/<run>[/<part>...]``; ``run`` may be the wildcard ``{run}``."""
    return "/".join((f"results/runs/{run}", *parts))


@dataclass(frozen=True)
class Format:
    """Everything the pipeline and the report know of one artifact format."""

    name: str
    # (config, the run's qat_scheme or None) -> the run's variants, in order
    variants: Callable[[Mapping[str, Any], str | None], list[str]]
    # where an artifact lives: a pattern of {run_dir}, {variant} and {model} (the model name)
    path: str
    exporter: str  # the module that writes the artifacts
    runtime: str  # the module that evaluates them: open_runtime, open_speed_runtime
    # least memory (MB) of one evaluation job (its runtime's libraries): the floor under what
    # qatforge.spec.resources computes for it from the model size (its evaluate_<name> record)
    eval_mem_mb: int
    # default parity thresholds per variant, "default" for any other (parity.thresholds_for)
    thresholds: Mapping[str, Mapping[str, float]]
    # the deployment target the report recommends an artifact of this format for (None: none), and
    # its place among the targets
    label: str | None = None
    rank: int = 0
    qat_path: str | None = None  # where a QAT run's artifact lives, if not at `path`
    unquantized: frozenset[str] = frozenset()  # variants that quantize nothing (any case)
    # "module:function" (capabilities.BaseInfo, Facts) -> why the base cannot be exported to this
    # format, or None (the parse-time check of formats.on_unsupported)
    support: str | None = None
    also_skipped: str | None = None  # what is left out with the format when it is skipped


# The base model (results/base), evaluated as a row of the baseline run (config.baseline_run): the
# fine-tuning gain, and how the report knows that run. Every run's merged model is (hf, merged).
BASE_ARTIFACT = ("hf", "base")
MERGED_ARTIFACT = ("hf", "merged")
# (format, variant) rows that are evaluated but are no export of the run's merged model, with the
# reason: parity does not apply to them (no verdict, no gate, never recommended).
REFERENCE_ONLY = {BASE_ARTIFACT: "the base is not an export of the merged model"}


def is_deployment_artifact(fmt: str, variant: str) -> bool:
    """Whether (format, variant) is an export of the run's merged model, so that parity applies."""
    return (fmt, variant) not in REFERENCE_ONLY


def outtype_name(config: Mapping[str, Any]) -> str:
    """The GGUF variant name of the unquantized conversion, e.g. ``BF16``."""
    return config["gguf"]["outtype"].upper()


def _torchao_variants(config: Mapping[str, Any], scheme: str | None) -> list[str]:
    """PTQ schemes for a baseline run, a QAT run's own scheme (none for a GGUF- or ONNX-targeted one,
    whose artifact is in that format)."""
    from qatforge.spec.schemes import parse_scheme

    if scheme is None:
        return list(config["torchao"]["schemes"])
    return [scheme] if parse_scheme(scheme).target == "torchao" else []


# Default parity thresholds (Format.thresholds), in this one place. ``kld_mean``/``kld_max`` are
# upper bounds, ``top1_agree``/``gen_match`` lower bounds; the tokenizer checks (prompt ids,
# BOS/EOS, no double BOS, chat template) are always required, except that an entry with
# ``token_parity: false`` accepts prompt ids that differ from the reference's.
# Anchors: llama.cpp tools/perplexity/README.md, LLaMA-3-8B vs FP16 — BF16 vs F16 KLD 2.5e-5 /
# same-top-p 99.74 %; Q8_0 0.0014 / 97.7 %; Q6_K 0.0055 / 96.0 %; Q5_K_M 0.011; Q4_K_M 0.031 /
# 91.9 %; IQ4_XS (imatrix) 0.036; Q4_0 0.072. Rule: KLD bound ~3x the anchor, top-1 bound ~3
# points under it (~0.5 for lossless formats); gen_match (no anchor) set under what was measured.
# Measured (KLD / top-1 / gen_match) on the builtin tiny Qwen3 (3.5M, 1300 warm-up steps, 1209
# logit tokens, 100 prompts) against its fp32 reference; every value passes with margin, so only
# Q5_K_M's top-1 moved (see there). Those figures pooled every position of the 32 conversations;
# their answer positions (``parity.answer_positions``, ~200 of the 1209) are what is scored now, so
# the top-1 standard errors are ~2.5x the ones quoted. config/config.yaml (report.thresholds) holds
# overrides only; ``parity.thresholds_for`` merges them over these.
#
# Every artifact the report lists is of one of these formats (results/eval/<run>/<format>/<variant>.json),
# in this order (its rows and plots).
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format(
        name="hf", variants=lambda config, scheme: [MERGED_ARTIFACT[1]], path="{run_dir}/merged",
        exporter="qatforge.merge", runtime="qatforge.evaluate.hf", eval_mem_mb=1500,
        thresholds={
            "merged": {"kld_mean": 1e-5, "top1_agree": 0.999, "gen_match": 0.99},  # measured 0 / 1 / 1
            "default": {"kld_mean": 1e-3, "top1_agree": 0.98, "gen_match": 0.9},
        },
        unquantized=frozenset({MERGED_ARTIFACT[1]}),
    ),
    Format(
        name="torchao", variants=_torchao_variants, path="{run_dir}/torchao/{variant}",
        qat_path="{run_dir}/qat_converted",  # qatforge.qat.qat_convert of the fake-quantized model
        exporter="qatforge.export.torchao", runtime="qatforge.evaluate.hf", eval_mem_mb=1500,
        thresholds={
            "int8": {"kld_mean": 0.005, "top1_agree": 0.95, "gen_match": 0.85},  # as Q8_0; 8.0e-5 / 0.996 / 0.97
            # 4-bit weights (group 32) + int8 dynamic activations, as Q4_K_M; PTQ 1.9e-2 / 0.920 / 0.93
            "int8-int4": {"kld_mean": 0.1, "top1_agree": 0.88, "gen_match": 0.6},
            "default": {"kld_mean": 0.1, "top1_agree": 0.88, "gen_match": 0.6},
        },
        label="torchao", rank=2,
    ),
    Format(
        name="gguf", variants=lambda config, scheme: [outtype_name(config), *config["gguf"]["quants"]],
        path="{run_dir}/gguf/{model}-{variant}.gguf",
        exporter="qatforge.export.gguf", runtime="qatforge.evaluate.gguf", eval_mem_mb=1000,
        thresholds={
            "F32": {"kld_mean": 1e-5, "top1_agree": 0.999, "gen_match": 0.98},  # 2.7e-12 / 1 / 1 (F32 KV cache)
            "F16": {"kld_mean": 1e-4, "top1_agree": 0.995, "gen_match": 0.95},
            "BF16": {"kld_mean": 1e-4, "top1_agree": 0.995, "gen_match": 0.95},  # 2.7e-5 / 0.9992 / 1.00
            "Q8_0": {"kld_mean": 0.005, "top1_agree": 0.95, "gen_match": 0.85},  # 2.9e-4 / 0.993 / 0.99
            "Q6_K": {"kld_mean": 0.015, "top1_agree": 0.93, "gen_match": 0.8},  # 1.7e-3 / 0.987 / 0.97
            # top-1 0.90, not the ~0.91 the rule gives: measured 0.945 is only ~2.5 standard errors
            # (1209 tokens) above 0.93; 5.8e-3 / 0.945 / 0.93
            "Q5_K_M": {"kld_mean": 0.03, "top1_agree": 0.90, "gen_match": 0.7},
            "Q4_K_M": {"kld_mean": 0.1, "top1_agree": 0.88, "gen_match": 0.6},  # 2.3e-2 / 0.925 / 0.93
            "IQ4_XS": {"kld_mean": 0.1, "top1_agree": 0.88, "gen_match": 0.6},
            "Q4_0": {"kld_mean": 0.2, "top1_agree": 0.85, "gen_match": 0.5},  # 3.3e-2 / 0.908 / 0.91
            "default": {"kld_mean": 0.2, "top1_agree": 0.85, "gen_match": 0.5},
        },
        label="llama.cpp / Ollama", rank=1, unquantized=frozenset(FULL_PRECISION_TYPES),
        support="qatforge.spec.capabilities:gguf_reason", also_skipped="the Ollama Modelfile",
    ),
    Format(
        name="onnx", variants=lambda config, scheme: list(config["onnx"]["variants"]), path="{run_dir}/onnx/{variant}",
        exporter="qatforge.export.onnx", runtime="qatforge.evaluate.onnx", eval_mem_mb=1500,
        thresholds={
            "fp32": {"kld_mean": 1e-5, "top1_agree": 0.999, "gen_match": 0.98},
            # MatMulNBits 8-bit weights (block 32) with int8 activations (CPU accuracy level 4), as Q8_0
            "int8": {"kld_mean": 0.005, "top1_agree": 0.95, "gen_match": 0.85},
            # MatMulNBits 4-bit weights (block 32, RTN) with int8 activations, as torchao int8-int4
            "int4": {"kld_mean": 0.1, "top1_agree": 0.88, "gen_match": 0.6},
            "default": {"kld_mean": 0.1, "top1_agree": 0.88, "gen_match": 0.6},
        },
        label="ONNX Runtime GenAI", rank=3, unquantized=frozenset({"fp32"}), support="qatforge.spec.capabilities:onnx_reason",
    ),
)}


def lookup(name: str) -> Format:
    """The format called ``name``; ValueError naming it if there is none."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(FORMATS)}") from None


def artifact_path(run: str, fmt: str, variant: str, *, model: str = "", qat: bool = False) -> str:
    """Where the artifact (run, format, variant) lives; ``qat``: the run is a QAT run, ``model``
    the model name (``config.model_name``)."""
    if (fmt, variant) == BASE_ARTIFACT:
        return BASE_DIR
    f = lookup(fmt)
    pattern = f.qat_path if qat and f.qat_path else f.path
    return pattern.format(run_dir=run_dir(run), variant=variant, model=model)


def merged_dir(run: str) -> str:
    """A run's merged model, the source of truth every export is built from."""
    return artifact_path(run, *MERGED_ARTIFACT)


def resolve(ref: str) -> Any:
    """The module ``module``, or the object ``module:name``, that a record names (imported now)."""
    module, _, name = ref.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, name) if name else mod


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)


class ArtifactError(ValueError):
    """A file that is truncated, foreign or of an unsupported version."""


def check_gguf(path: str | Path) -> int:
    """Validate a GGUF header (magic, version, counts) and return the version."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: GGUF file does not exist")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        raise ArtifactError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(head) < 24:
        raise ArtifactError(f"{path}: truncated GGUF file ({len(head)} bytes, header needs 24)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in GGUF_VERSIONS:
        raise ArtifactError(f"{path}: unsupported GGUF version {version} (supported: {GGUF_VERSIONS})")
    if n_tensors == 0 or n_kv == 0:
        raise ArtifactError(f"{path}: GGUF file has {n_tensors} tensors and {n_kv} metadata keys")
    return version


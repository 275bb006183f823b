"""Which export formats the configured base can reach, answered at Snakefile parse time.

Facts about the installed exporters are written once at install (``python -m qatforge.capabilities
write``, :mod:`qatforge.capabilities.install`, run by ``make install``) so that parsing stays free
of torch/transformers/onnxruntime-genai (this module imports the standard library only, even lazily):

* GGUF: llama.cpp's converter needs a model class for one of ``config.json``'s ``architectures``
  (``architectures.json``, written by ``qatforge.llamacpp install``) and the tokenizer files its
  ``set_vocab`` reads: :data:`SENTENCEPIECE_JSON` (next to it) lists the architectures whose
  ``set_vocab`` reads ``tokenizer.model`` with no fallback, derived from the converter's own
  classes; every other vocabulary path loads ``tokenizer.json`` (or converts ``tokenizer.model``).
* ONNX: ONNX Runtime GenAI's model builder dispatches on ``config.json``'s first architecture; the
  architectures it builds are read off its own dispatch (:data:`ONNX_JSON` in
  ``<sys.prefix>/share/qatforge``).

A fact file that is absent, or (ONNX) written for another onnxruntime-genai, means "not checked",
never a failure; ``qatforge.llamacpp install`` replaces the converter's directory as a whole, so its
file is either derived from that converter or absent. TorchAO needs torch to count the modules a
scheme quantizes: :mod:`qatforge.capabilities.torchao`, run by the build_base job.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from qatforge.spec import llamacpp_paths, onnx_archs
from qatforge.spec.builtin import BUILTIN_PREFIX
from qatforge.spec.formats import FORMATS, resolve

SENTENCEPIECE_JSON = "sentencepiece_architectures.json"  # in llamacpp_paths.share_dir()
ONNX_JSON = "onnx_architectures.json"  # in share_dir()
ONNX_TOOL = "onnxruntime-genai"  # the distribution whose model builder writes the ONNX exports
SPM_FILE = "tokenizer.model"
# What the converter's other vocabulary paths load (AutoTokenizer): a fast tokenizer file, a
# SentencePiece model, or a BPE vocabulary pair (which qatforge's base rule re-saves as tokenizer.json).
TOKENIZER_SOURCES = (("tokenizer.json",), (SPM_FILE,), ("vocab.json", "merges.txt"))


def share_dir() -> Path:
    """``<sys.prefix>/share/qatforge``: qatforge's own install-time facts."""
    return Path(sys.prefix) / "share" / "qatforge"


@dataclass(frozen=True)
class BaseInfo:
    """What parse time reads of a local base: ``config.json`` and the tokenizer files present."""

    architectures: tuple[str, ...]
    model_type: str | None
    tokenizer_class: str | None
    files: frozenset[str]

    @property
    def family(self) -> str:
        """``model_type (Arch, ...)``, the name error messages give the base."""
        return family({"model_type": self.model_type, "architectures": list(self.architectures)})


@dataclass(frozen=True)
class Facts:
    """The installed exporters' facts; None: not known (not installed, or written for other versions)."""

    architectures: frozenset[str] | None
    sentencepiece: Mapping[str, Mapping[str, Any]] | None
    onnx_architectures: frozenset[str] | None
    onnx_tool: str = ONNX_TOOL
    onnx_versions: Mapping[str, str | None] = field(default_factory=dict)  # what the ONNX facts were read off


def family(hf_config: Mapping[str, Any]) -> str:
    """``phi3 (Phi3ForCausalLM)``: a base's ``model_type`` and ``architectures``, as messages name it."""
    archs = ", ".join(hf_config.get("architectures") or []) or "no architectures"
    return f"{hf_config.get('model_type') or 'no model_type'} ({archs})"


def base_info(config: dict, workdir: str | Path = ".") -> BaseInfo | None:
    """The local base's :class:`BaseInfo`; None for the builtin, a hub id or a directory without
    ``config.json`` (``config.check`` reports those)."""
    base = config["model"]["base"]
    if base.startswith(BUILTIN_PREFIX):
        return None
    path = Path(base).expanduser()
    path = path if path.is_absolute() else Path(workdir) / path
    if not (path / "config.json").is_file():
        return None
    cfg = json.loads((path / "config.json").read_text())
    tok_cfg = path / "tokenizer_config.json"
    tok = json.loads(tok_cfg.read_text()) if tok_cfg.is_file() else {}
    names = {n for group in TOKENIZER_SOURCES for n in group}
    return BaseInfo(tuple(cfg.get("architectures") or ()), cfg.get("model_type"), tok.get("tokenizer_class"),
                    frozenset(n for n in names if (path / n).is_file()))


def gguf_reason(info: BaseInfo, facts: Facts) -> str | None:
    """Why llama.cpp's converter cannot convert the base (the missing piece), or None."""
    archs = list(info.architectures)
    if facts.architectures is not None:
        archs = [a for a in archs if a in facts.architectures]
        if not archs:
            return (f"{info.family}: llama.cpp's converter has no model class for {list(info.architectures)}, so "
                    "its GGUF export would fail after training")
    if not any(set(group) <= info.files for group in TOKENIZER_SOURCES):
        return (f"{info.family}: the base has no tokenizer.json, no {SPM_FILE} and no vocab.json + merges.txt: "
                "llama.cpp's converter builds the GGUF vocabulary from one of them")
    for arch in archs:
        need = (facts.sentencepiece or {}).get(arch)
        if need is None or SPM_FILE in info.files or info.tokenizer_class in need["unless_tokenizer_class"]:
            continue
        unless = need["unless_tokenizer_class"]
        return (f"{info.family}: llama.cpp's converter reads {SPM_FILE} (SentencePiece) for {arch} "
                f"({need['class']}.set_vocab, no tokenizer.json fallback"
                + (f" unless tokenizer_class is {' or '.join(unless)}" if unless else "")
                + f") and the base has no {SPM_FILE}")
    return None


def onnx_reason(info: BaseInfo, facts: Facts) -> str | None:
    """Why ONNX Runtime GenAI's model builder cannot build the base (its first architecture, or the
    multimodal one it registers a text model under: ``onnx_archs``), or None."""
    if facts.onnx_architectures is None:
        return None
    if not info.architectures:
        return f"{info.family}: config.json has no architectures, which the ONNX model builder dispatches on"
    arch = info.architectures[0]
    target = arch if arch in facts.onnx_architectures else onnx_archs.builder_architecture(arch)
    if target not in facts.onnx_architectures:
        return (f"{info.family}: {facts.onnx_tool}'s model builder has no exporter for {arch} "
                "(it dispatches on config.json's first architecture)")
    failure = onnx_archs.BUILDER_FAILURES.get((facts.onnx_versions.get(ONNX_TOOL) or "", target))
    if failure:
        return f"{info.family}: {facts.onnx_tool}'s model builder fails on {target}: {failure}"
    return None


def unsupported(info: BaseInfo, facts: Facts) -> dict[str, str]:
    """``{format: reason}`` of the formats the base cannot be exported to, by each format's check
    (``formats.Format.support``; pure)."""
    reasons = {f.name: resolve(f.support)(info, facts) for f in FORMATS.values() if f.support}
    return {fmt: r for fmt, r in reasons.items() if r}


def unsupported_formats(config: dict, workdir: str | Path = ".", facts: Facts | None = None) -> dict[str, str]:
    """``{format: reason}`` for the configured base with the installed facts (``{}`` when nothing is
    known against it: the builtin, a hub id, or no fact files)."""
    info = base_info(config, workdir)
    return {} if info is None else unsupported(info, installed_facts() if facts is None else facts)


# --------------------------------------------------------------------------------------------
# reading the install-time facts (parse time: standard library only)
# --------------------------------------------------------------------------------------------
def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def onnx_versions() -> dict[str, str | None]:
    """The installed onnxruntime-genai version (None: not installed)."""
    return {ONNX_TOOL: _version(ONNX_TOOL)}


def installed_facts(llama_cpp_dir: str | Path | None = None, onnx_dir: str | Path | None = None) -> Facts:
    """The facts in ``llama_cpp_dir`` (default: the converter's share directory: architectures.json,
    :data:`SENTENCEPIECE_JSON`) and ``onnx_dir`` (default :func:`share_dir`); each None when absent,
    the ONNX one also when recorded for another onnxruntime-genai."""
    gguf = Path(llama_cpp_dir or llamacpp_paths.share_dir())
    arch = _read(gguf / llamacpp_paths.ARCHITECTURES)
    spm = _read(gguf / SENTENCEPIECE_JSON)
    onnx = _read(Path(onnx_dir or share_dir()) / ONNX_JSON)
    if onnx is not None and onnx.get("versions") != onnx_versions():
        onnx = None
    tool = ", ".join(f"{k} {v}" for k, v in (onnx or {}).get("versions", {}).items() if v) or ONNX_TOOL
    return Facts(
        architectures=None if arch is None else frozenset(arch),
        sentencepiece=None if spm is None else spm["architectures"],
        onnx_architectures=None if onnx is None else frozenset(onnx["architectures"]),
        onnx_tool=tool,
        onnx_versions=(onnx or {}).get("versions", {}),
    )



"""Quantizing a GGUF file with ``llama-quantize`` and its own flags (``--imatrix`` and those of
``quant_types.QUANT_OPTIONS``); afterwards the tensor-type histogram is read back and silent shape
fallbacks (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, IQ*->IQ4_NL, ...) are reported (warn) or refused
(fail). Also the types a quant would write (``--dry-run``) and the check that a GGUF-targeted QAT
run's tensors are written in the types they were trained under.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from qatforge.export.gguf.read import imatrix_info, tensor_type_histogram, tensor_types
from qatforge.export.gguf.tools import run_tool, tool_info
from qatforge.export.record import as_log, write_export_record
from qatforge.io import atomic_file, check_free_space
from qatforge.spec.quant_types import FULL_PRECISION_TYPES, QUANT_OPTIONS, check_quant


QK_K = 256  # super-block size of the K- and most IQ-quants
# The types llama.cpp's tensor_type_fallback() substitutes when a row does not fit the block size.
_FALLBACK_TARGETS = {"Q4_0", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "F16"}
_LEGACY_FTYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"}


class FallbackError(RuntimeError):
    """Quantization silently substituted another tensor type and ``on_fallback`` is ``fail``."""


# HF projection names → llama.cpp tensor names (blk.<i>.<name>.weight), for GGUF-targeted QAT runs
# (Phi-3's fused qkv_proj and gate_up_proj are written as attn_qkv and ffn_up).
GGUF_PROJECTIONS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
                    "qkv_proj": "attn_qkv", "gate_up_proj": "ffn_up"}


def check_trained_types(tensors: Mapping[str, str], scheme: str, target_modules: str | Iterable[str]) -> dict[str, Any]:
    """That every tensor a GGUF-targeted QAT run of ``scheme`` trained under a fake quantizer is
    stored in that type: the LoRA projections at the recipe's weight type, ``token_embd`` and
    ``output`` at theirs (a tied ``token_embd`` at the output's, as llama-quantize writes it).
    Returns ``{scheme, trained: {tensor: type}, other, unmapped_targets}``; raises ``ValueError``
    naming the tensors written in another type."""
    from qatforge.spec.schemes import gguf_recipe

    recipe = gguf_recipe(scheme)
    if recipe is None:
        raise ValueError(f"scheme {scheme!r} is not GGUF-targeted")
    targets = list(GGUF_PROJECTIONS) if target_modules == "all-linear" else list(target_modules)
    names = {GGUF_PROJECTIONS[t] for t in targets if t in GGUF_PROJECTIONS}
    unmapped = sorted(t for t in targets if t not in GGUF_PROJECTIONS)
    tied = "output.weight" not in tensors
    expected = {n: recipe.weights for n in tensors
                if n.startswith("blk.") and n.endswith(".weight") and n.split(".")[2] in names}
    if not expected:
        raise ValueError(f"no tensor of the file matches the run's LoRA targets {targets}")
    if "token_embd.weight" in tensors:
        expected["token_embd.weight"] = recipe.embedding_type(tied)
    if not tied:
        expected["output.weight"] = recipe.output
    wrong = {n: (tensors[n], t) for n, t in expected.items() if tensors[n] != t}
    if wrong:
        raise ValueError(f"tensors trained under {scheme}'s fake quantizers were written as another type: "
                         + ", ".join(f"{n}={got} (trained as {t})" for n, (got, t) in sorted(wrong.items())[:8]))
    other = {n: t for n, t in tensors.items() if n not in expected and t != "F32"}
    return {"scheme": scheme, "trained": dict(sorted(expected.items())), "other": other, "unmapped_targets": unmapped}


def find_fallbacks(gguf_file: str | os.PathLike, qtype: str) -> list[dict[str, Any]]:
    """Tensors of a ``qtype`` file that llama.cpp demoted because their rows do not fit the block size.

    For K/IQ file types (256-value super-blocks) a 2-D tensor stored in one of the fallback types
    (Q4_0, Q5_0, Q5_1, Q8_0, IQ4_NL, F16) with a row length not divisible by 256 is a fallback;
    for the 32-block types only an F16 tensor whose rows are not a multiple of 32 is.
    """
    from gguf import GGUFReader

    check_quant(qtype, has_imatrix=True)
    if qtype in FULL_PRECISION_TYPES:
        return []
    block = 32 if qtype in _LEGACY_FTYPES else QK_K
    out = []
    for t in GGUFReader(str(gguf_file)).tensors:
        if len(t.shape) < 2:
            continue
        ncols, tname = int(t.shape[0]), t.tensor_type.name
        if tname in _FALLBACK_TARGETS and ncols % block and (block == QK_K or tname == "F16"):
            out.append({"tensor": t.name, "type": tname, "row_length": ncols})
    return out


_FALLBACK_LOG = re.compile(
    r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+\d+ \(required for type\s+(\S+)\).*?"
    r"-> falling back to\s+(\S+)", re.S)


def _logged_fallbacks(text: str) -> list[dict[str, Any]]:
    """Fallbacks as llama.cpp reports them in its quantization log."""
    return [{"tensor": m.group(1), "type": m.group(4).upper(), "row_length": int(m.group(2)),
             "wanted": m.group(3).upper()}
            for m in _FALLBACK_LOG.finditer(text)]


def quantize_command(
    src_gguf: Path, out_file: Path | None, qtype: str, *, imatrix: Path | None, options: Mapping[str, Any],
    threads: int,
) -> list[str]:
    """The ``llama-quantize`` command line for one quant (``imatrix`` is passed by file name: run it
    in the imatrix's directory, so the file name llama-quantize records is path-independent);
    without ``out_file``, its ``--dry-run`` (the types it would write, nothing written)."""
    from qatforge import llamacpp

    cmd = [str(llamacpp.find_tool("llama-quantize"))] + (["--dry-run"] if out_file is None else [])
    for key, (flag, kind) in QUANT_OPTIONS.items():
        value = options.get(key)
        if kind == "switch" and value:
            cmd.append(flag)
        elif kind == "type" and value is not None:
            cmd += [flag, str(value)]
        elif kind == "tensor_types":
            for pattern, ttype in sorted((value or {}).items()):
                cmd += [flag, f"{pattern}={ttype}"]
        elif kind == "kv":
            for k, v in sorted((value or {}).items()):
                vtype = "bool" if isinstance(v, bool) else "int" if isinstance(v, int) else \
                    "float" if isinstance(v, float) else "str"
                cmd += [flag, f"{k}={vtype}:{str(v).lower() if vtype == 'bool' else v}"]
    if imatrix is not None:
        cmd += ["--imatrix", imatrix.name]
    if out_file is None:
        return cmd + [str(src_gguf.resolve()), qtype]
    return cmd + [str(src_gguf.resolve()), str(out_file.resolve()), qtype, str(threads)]


# One line per tensor of llama-quantize's log: "[  3/ 21] token_embd.weight - [ 256, 1024, 1, 1], type =   bf16,
# size = 0.50 MiB -> 0.27 MiB (q8_0)"; a tensor it keeps has no "->".
_PLANNED = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+),.*?(?:->.*\((\S+)\))?\s*$", re.M)


def planned_types(src_gguf: str | os.PathLike, qtype: str, options: Mapping[str, Any] | None = None,
                  log: Any = None) -> dict[str, str]:
    """``{tensor: ggml type}`` that ``llama-quantize`` would write for ``qtype`` with ``options``,
    from its own ``--dry-run`` (it reads the tensor shapes, quantizes nothing, writes nothing)."""
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    check_quant(qtype, True, opts)
    cmd = quantize_command(Path(src_gguf), None, qtype, imatrix=None, options=opts, threads=0)
    out = run_tool(cmd, as_log(log), what=f"llama-quantize --dry-run {Path(src_gguf).name} -> {qtype}")
    types = {m.group(1): (m.group(3) or m.group(2)).upper() for m in _PLANNED.finditer(out)}
    if not types:
        raise RuntimeError(f"llama-quantize --dry-run listed no tensors for {src_gguf}:\n{out[-2000:]}")
    return types


def quantize(
    src_gguf: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    qtype: str,
    imatrix: str | os.PathLike | None = None,
    options: Mapping[str, Any] | None = None,
    threads: int | None = None,
    on_fallback: str = "warn",
    source: Mapping[str, Any] | None = None,
    trained: Mapping[str, Any] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Quantize a GGUF file to ``qtype`` with ``llama-quantize``; write ``<out_file>.json``.

    ``trained`` (``{"scheme", "targets"}``: the GGUF-targeted QAT run this quant ships, with its LoRA
    targets) adds ``check_trained_types`` to the checks, recorded as ``qat_tensor_types``. Its
    ``block_scales`` (the scales file of a run that learned its Q4_0 block scales) has the Q4_0
    tensors rewritten with them before the file is moved into place
    (:func:`qatforge.export.gguf.block_scales.write_learned_scales`), recorded as ``learned_block_scales``.

    ``options`` map to llama-quantize's own flags: ``pure``, ``leave_output_tensor``,
    ``allow_requantize``, ``output_tensor_type`` and ``token_embedding_type`` (ggml type names),
    ``tensor_type`` (``{name pattern: ggml type}``) and ``override_kv`` (``{key: value}``); None
    values are ignored. ``imatrix``: a GGUF imatrix file from ``imatrix()``. After writing, the
    tensor-type histogram is recorded and fallbacks are warned about (``on_fallback="warn"``) or
    refused (``"fail"``, raising ``FallbackError`` without leaving the output behind). Returns the
    record's provenance.
    """
    log = as_log(log)
    src_gguf, out_file = Path(src_gguf), Path(out_file)
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    check_quant(qtype, imatrix is not None, opts)
    if on_fallback not in ("warn", "fail"):
        raise ValueError(f"on_fallback must be 'warn' or 'fail', got {on_fallback!r}")
    if not src_gguf.is_file():
        raise FileNotFoundError(f"source GGUF {src_gguf} not found")
    imatrix = Path(imatrix).resolve() if imatrix is not None else None
    im_info = imatrix_info(imatrix) if imatrix is not None else None
    check_free_space(out_file, src_gguf.stat().st_size)
    started = time.perf_counter()
    nthread = int(threads or 0)
    with atomic_file(out_file) as tmp:
        cmd = quantize_command(src_gguf, tmp, qtype, imatrix=imatrix, options=opts, threads=nthread)
        out = run_tool(cmd, log, cwd=imatrix.parent if imatrix is not None else None,
                        what=f"llama-quantize {src_gguf.name} -> {qtype}")
        hist = tensor_type_histogram(tmp)
        by_name = tensor_types(tmp)
        block_scales = (trained or {}).get("block_scales")
        trained = check_trained_types(by_name, trained["scheme"], trained["targets"]) if trained else None
        learned = None
        if block_scales:
            from qatforge.export.gguf.block_scales import write_learned_scales
            from qatforge.learned_scales import merged_scales_file

            scales_file = merged_scales_file(block_scales)
            if scales_file is None:
                log("the run selected step 0 (the teacher, no adapter): llama.cpp's own block scales")
            else:
                learned = write_learned_scales(tmp, src_gguf, scales_file)
                log(f"wrote the learned block scales of {learned['tensors']} Q4_0 tensors ({learned['blocks']} "
                    f"blocks; learned / llama.cpp's own scale, quartiles {learned['scale_ratio_quartiles']})")
        # llama.cpp's own report, plus a structural check of the written file (names not in the log).
        fallbacks = _logged_fallbacks(out)
        seen = {f["tensor"] for f in fallbacks}
        fallbacks += [f for f in find_fallbacks(tmp, qtype) if f["tensor"] not in seen]
        if fallbacks:
            msg = (f"{out_file.name}: {len(fallbacks)} tensor(s) fell back to another type because their "
                   f"rows do not fit the {qtype} block size: "
                   + ", ".join(f"{f['tensor']}->{f['type']} (row {f['row_length']})" for f in fallbacks[:8]))
            log(msg)
            if on_fallback == "fail":
                raise FallbackError(msg + " (gguf.on_fallback: fail)")
            warnings.warn(msg, stacklevel=2)
    settings = {"type": qtype, "options": opts, "imatrix": im_info, "threads": nthread,
                "on_fallback": on_fallback}
    src_source = dict(source) if source else _record_source(src_gguf)
    src_source.setdefault("gguf", src_gguf.name)
    record = write_export_record(out_file, source=src_source, tool=tool_info() | {"executable": cmd[0]},
                                 settings=settings, started=started, tensor_types=hist, fallbacks=fallbacks,
                                 tensors=by_name, **({"qat_tensor_types": trained} if trained else {}),
                                 **({"learned_block_scales": learned} if learned else {}))
    log(f"wrote {out_file} ({record['size_bytes'] / 2**20:.2f} MiB) tensor types {hist}")
    return record["provenance"] | {"size_bytes": record["size_bytes"], "sha256": record["sha256"], "tensors": by_name}


def _record_source(artifact: Path) -> dict[str, Any]:
    """The ``source`` (run, checkpoint, merged hash) of an artifact's own export record, if any."""
    from qatforge.io import manifest_path, read_json

    mp = manifest_path(artifact)
    return dict((read_json(mp).get("provenance") or {}).get("source") or {}) if mp.is_file() else {}

"""GGUF export with llama.cpp's own tools: converter, ``llama-quantize`` and ``llama-imatrix``.

* ``convert``: the vendored ``convert_hf_to_gguf.py`` (see ``qatforge.llamacpp``) run in a
  subprocess with the vendored gguf-py first on the path; the tokenizer is then checked to
  tokenize a corpus identically in llama.cpp and HF.
* ``quantize``: ``llama-quantize`` with its own flags (``--imatrix`` and those of
  ``quant_types.QUANT_OPTIONS``); afterwards the tensor-type histogram is read back and silent shape
  fallbacks (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, IQ*->IQ4_NL, ...) are reported (warn) or
  refused (fail).
* ``imatrix``: ``llama-imatrix``.

All tools come from one build of the pinned llama.cpp sources (``make install``). Every artifact
is written atomically and gets a ``<file>.json`` record (``write_export_record``). Only
``quant_types`` data is needed at import; llama_cpp/gguf/transformers load inside functions.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from qatforge.export.quant_types import FULL_PRECISION_TYPES, OUTTYPES, QUANT_OPTIONS, check_quant
from qatforge.export.record import Log, as_log, source_record, write_export_record
from qatforge.io import atomic_file, check_free_space, package_versions, size_bytes

__all__ = [
    "FallbackError", "convert", "quantize_command", "tokenizer_parity", "quantize", "imatrix", "imatrix_from_parquet",
    "parity_texts_from_parquet", "write_calibration_text", "tensor_type_histogram", "find_fallbacks", "gguf_metadata",
    "tool_info", "write_export_record", "source_record",
]

QK_K = 256  # super-block size of the K- and most IQ-quants
# The types llama.cpp's tensor_type_fallback() substitutes when a row does not fit the block size.
_FALLBACK_TARGETS = {"Q4_0", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "F16"}
_LEGACY_FTYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"}


class FallbackError(RuntimeError):
    """Quantization silently substituted another tensor type and ``on_fallback`` is ``fail``."""


def tool_info() -> dict[str, Any]:
    """llama.cpp provenance: vendored source versions (commit, ggml) and the bindings' version."""
    from qatforge import llamacpp

    return {"name": "llama.cpp", **llamacpp.source_info(), **package_versions("llama_cpp_python")}


# --------------------------------------------------------------------------- reading GGUF files

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


# HF projection names → llama.cpp tensor names (blk.<i>.<name>.weight), for GGUF-targeted QAT runs.
GGUF_PROJECTIONS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def check_trained_types(tensors: Mapping[str, str], scheme: str, target_modules: str | Iterable[str]) -> dict[str, Any]:
    """That every tensor a GGUF-targeted QAT run of ``scheme`` trained under a fake quantizer is
    stored in that type: the LoRA projections at the recipe's weight type, ``token_embd`` and
    ``output`` at theirs (a tied ``token_embd`` at the output's, as llama-quantize writes it).
    Returns ``{scheme, trained: {tensor: type}, other, unmapped_targets}``; raises ``ValueError``
    naming the tensors written in another type."""
    from qatforge.qat_schemes import gguf_recipe

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


# --------------------------------------------------------------------------- conversion

def _run_tool(cmd: Sequence[str], log: Log, *, env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike | None = None, what: str) -> str:
    """Run ``cmd``, stream its output into the log, raise with the output tail on failure."""
    log(f"$ {' '.join(str(c) for c in cmd)}" + (f"  (in {cwd})" if cwd else ""))
    proc = subprocess.run([str(c) for c in cmd], env=dict(env) if env is not None else None, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    out = proc.stdout or ""
    for line in out.splitlines():
        log(f"  {line}")
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-30:])
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}):\n{tail}")
    return out


def _converter_env() -> dict[str, str]:
    from qatforge import llamacpp

    import qatforge

    gguf_py = llamacpp.find_gguf_py()
    pkg_root = Path(qatforge.__file__).resolve().parent.parent
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join([str(gguf_py), str(pkg_root)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


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
    from transformers import AutoTokenizer

    from qatforge.chat import encode, strip_bos_text

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
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
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
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

    from transformers import AutoTokenizer

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
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
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


def convert(
    merged_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    outtype: str = "bf16",
    pre_tokenizer: str | None = "qwen2",
    model_name: str | None = None,
    parity_texts: Sequence[str] | None = None,
    source: Mapping[str, Any] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Convert an HF checkpoint to GGUF with llama.cpp's converter; write ``<out_file>.json``.

    ``pre_tokenizer`` is used only when llama.cpp does not recognise the tokenizer's hash. The
    result must tokenize ``parity_texts`` (default: a small built-in corpus) exactly like HF,
    otherwise nothing is written. ``source`` (e.g. run, checkpoint) goes into the record.
    Returns the record's provenance.
    """
    from qatforge import llamacpp

    log = as_log(log)
    merged_dir, out_file = Path(merged_dir), Path(out_file)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} not supported; valid: {', '.join(OUTTYPES)}")
    if not (merged_dir / "config.json").is_file():
        raise FileNotFoundError(f"{merged_dir} is not an HF checkpoint (no config.json)")
    weights = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors")) or size_bytes(merged_dir)
    check_free_space(out_file, weights * (2 if outtype == "f32" else 1))
    started = time.perf_counter()
    llamacpp.find_converter()  # clear error before spawning anything
    with atomic_file(out_file) as tmp:
        pre, parity = convert_checked(merged_dir, tmp, outtype=outtype, pre_tokenizer=pre_tokenizer,
                                      model_name=model_name, parity_texts=parity_texts, log=log, name=out_file)
        meta = gguf_metadata(tmp, keys=("general.architecture", "general.name", "general.file_type",
                                        "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id",
                                        "tokenizer.ggml.add_space_prefix"))
        hist = tensor_type_histogram(tmp)
        tie = embedding_tie(tmp, merged_dir)
    settings = {"outtype": outtype, "pre_tokenizer_fallback": pre_tokenizer, "model_name": model_name}
    extra = {"pre_tokenizer": pre, "tokenizer_parity": {k: v for k, v in parity.items() if k != "mismatches"},
             "tensor_types": hist, "metadata": meta, "embeddings": tie}
    record = write_export_record(out_file, source=source_record(merged_dir, **(source or {})),
                                 tool=tool_info(), settings=settings, started=started, **extra)
    log(f"wrote {out_file} ({record['size_bytes'] / 2**20:.1f} MiB) in {record['provenance']['duration_s']} s")
    return record["provenance"] | {"size_bytes": record["size_bytes"], "sha256": record["sha256"]}


def convert_checked(
    hf_dir: Path, out: Path, *, outtype: str, pre_tokenizer: str | None, model_name: str | None = None,
    parity_texts: Sequence[str] | None = None, vocab_only: bool = False, log: Log, name: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the converter on ``hf_dir`` into ``out`` and check that llama.cpp tokenizes the parity
    texts exactly like HF; returns ``(pre-tokenizer report, parity record)``, raises naming the
    first differing texts. Where llama.cpp can be told how HF splits (:func:`prefix_space_rule`) it
    is, and the record says what was set; texts that setting cannot make agree (raw text without a
    leading special token) are counted, not compared."""
    import json

    from transformers import AutoTokenizer

    rule = prefix_space_rule(hf_dir)
    report = out.with_name(out.name + ".pre.json")
    cmd = [sys.executable, "-m", "qatforge.llamacpp", "convert", "--report", str(report)]
    if pre_tokenizer:
        cmd += ["--pre-tokenizer", pre_tokenizer]
    if rule:
        cmd += ["--add-space-prefix", "false"]
        log(f"tokenizer.ggml.add_space_prefix = false: {rule['reason']}")
    cmd += ["--", str(hf_dir), "--outfile", str(out), "--outtype", outtype]
    if model_name:
        cmd += ["--model-name", model_name]
    if vocab_only:
        cmd.append("--vocab-only")
    try:
        _run_tool(cmd, log, env=_converter_env(), what=f"convert_hf_to_gguf.py on {hf_dir}")
        pre = json.loads(report.read_text()) if report.is_file() else {}
    finally:
        report.unlink(missing_ok=True)
    texts = list(parity_texts) if parity_texts is not None else default_parity_texts(hf_dir)
    not_compared = 0
    if rule:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        kept = [t for t in texts if starts_with_special(t, tok)]
        not_compared, texts = len(texts) - len(kept), kept
    parity = tokenizer_parity(out, hf_dir, texts)
    log(f"tokenizer parity HF vs llama.cpp: {parity['identical']}/{parity['n']}"
        + (f" ({not_compared} raw texts without a leading special token not compared)" if rule else ""))
    if parity["identical"] != parity["n"] or (rule and not parity["n"]):
        raise RuntimeError(
            f"{name or out}: llama.cpp tokenizes {parity['n'] - parity['identical']} of {parity['n']} texts "
            f"differently from the HF tokenizer of {hf_dir} (pre-tokenizer {pre.get('pre_tokenizer')!r}, "
            f"recognized={pre.get('recognized')}); first mismatches: {parity['mismatches']}"
        )
    if rule:
        parity["set"] = {"tokenizer.ggml.add_space_prefix": False, "reason": rule["reason"],
                         "raw_texts_not_compared": not_compared}
    return pre, parity


# --------------------------------------------------------------------------- quantization

def _imatrix_info(path: str | os.PathLike) -> dict[str, Any]:
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
    out = _run_tool(cmd, as_log(log), what=f"llama-quantize --dry-run {Path(src_gguf).name} -> {qtype}")
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
    targets) adds ``check_trained_types`` to the checks, recorded as ``qat_tensor_types``.

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
    imatrix_info = _imatrix_info(imatrix) if imatrix is not None else None
    check_free_space(out_file, src_gguf.stat().st_size)
    started = time.perf_counter()
    nthread = int(threads or 0)
    with atomic_file(out_file) as tmp:
        cmd = quantize_command(src_gguf, tmp, qtype, imatrix=imatrix, options=opts, threads=nthread)
        out = _run_tool(cmd, log, cwd=imatrix.parent if imatrix is not None else None,
                        what=f"llama-quantize {src_gguf.name} -> {qtype}")
        hist = tensor_type_histogram(tmp)
        by_name = tensor_types(tmp)
        trained = check_trained_types(by_name, trained["scheme"], trained["targets"]) if trained else None
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
    settings = {"type": qtype, "options": opts, "imatrix": imatrix_info, "threads": nthread,
                "on_fallback": on_fallback}
    src_source = dict(source) if source else _record_source(src_gguf)
    src_source.setdefault("gguf", src_gguf.name)
    record = write_export_record(out_file, source=src_source, tool=tool_info() | {"executable": cmd[0]},
                                 settings=settings, started=started, tensor_types=hist, fallbacks=fallbacks,
                                 tensors=by_name, **({"qat_tensor_types": trained} if trained else {}))
    log(f"wrote {out_file} ({record['size_bytes'] / 2**20:.2f} MiB) tensor types {hist}")
    return record["provenance"] | {"size_bytes": record["size_bytes"], "sha256": record["sha256"], "tensors": by_name}


# --------------------------------------------------------------------------- importance matrix

def _record_source(artifact: Path) -> dict[str, Any]:
    """The ``source`` (run, checkpoint, merged hash) of an artifact's own export record, if any."""
    from qatforge.io import manifest_path, read_json

    mp = manifest_path(artifact)
    return dict((read_json(mp).get("provenance") or {}).get("source") or {}) if mp.is_file() else {}


def write_calibration_text(
    conversations: Iterable[Sequence[Mapping[str, str]]], tokenizer_dir: str | os.PathLike, out_file: str | os.PathLike
) -> dict[str, Any]:
    """Render chats with the model's chat template into one calibration text file (atomically)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
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


def parity_texts_from_parquet(
    parquet: str | os.PathLike, tokenizer_dir: str | os.PathLike, *, limit: int = 1000
) -> list[str]:
    """Tokenizer-parity corpus: up to ``limit`` rendered chats of a prepared split, plus edge cases."""
    from transformers import AutoTokenizer

    from qatforge.data import read_conversations

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    convs = read_conversations(parquet)[:limit]
    texts = [tok.apply_chat_template(list(c), tokenize=False) for c in convs]
    return texts + default_parity_texts(tokenizer_dir)


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
        out = _run_tool(cmd, log, cwd=calibration_text.parent, what=f"llama-imatrix on {model_gguf.name}")
        if not tmp.stat().st_size:
            raise RuntimeError(f"llama-imatrix wrote nothing to {tmp}:\n{out[-2000:]}")
        im = _imatrix_info(tmp)
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

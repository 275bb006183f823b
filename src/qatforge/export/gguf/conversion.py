"""HF checkpoint -> GGUF with llama.cpp's vendored ``convert_hf_to_gguf.py`` (see ``qatforge.llamacpp``),
run in a subprocess with the vendored gguf-py first on the path; the tokenizer is then checked to
tokenize a corpus identically in llama.cpp and HF (``qatforge.export.gguf.tokenizer``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from qatforge.export.gguf.read import embedding_tie, gguf_metadata, tensor_type_histogram
from qatforge.export.gguf.tokenizer import (default_parity_texts, prefix_space_rule, starts_with_special,
                                            tokenizer_parity)
from qatforge.export.gguf.tools import run_tool, tool_info
from qatforge.export.record import Log, as_log, source_record, write_export_record
from qatforge.io import atomic_file, check_free_space, size_bytes
from qatforge.spec.quant_types import OUTTYPES


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


def mtp_options(hf_dir: Path) -> list[str]:
    """``--no-mtp`` for a checkpoint whose config declares multi-token-prediction layers
    (``mtp_num_hidden_layers``, Qwen3.5) but that holds no ``mtp.*`` tensors, as every checkpoint
    transformers saves: llama.cpp's converter would otherwise look for them (or, at 0 layers, stop
    on an assertion), and a GGUF that declares them does not load."""
    from qatforge.io import has_mtp_tensors, read_json

    declared = "mtp_num_hidden_layers" in read_json(hf_dir / "config.json")
    return ["--no-mtp"] if declared and not has_mtp_tensors(hf_dir) else []


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

    from qatforge.model import auto_tokenizer

    rule = prefix_space_rule(hf_dir)
    report = out.with_name(out.name + ".pre.json")
    cmd = [sys.executable, "-m", "qatforge.llamacpp", "convert", "--report", str(report)]
    if pre_tokenizer:
        cmd += ["--pre-tokenizer", pre_tokenizer]
    if rule:
        cmd += ["--add-space-prefix", "false"]
        log(f"tokenizer.ggml.add_space_prefix = false: {rule['reason']}")
    cmd += ["--", str(hf_dir), "--outfile", str(out), "--outtype", outtype, *mtp_options(hf_dir)]
    if model_name:
        cmd += ["--model-name", model_name]
    if vocab_only:
        cmd.append("--vocab-only")
    try:
        run_tool(cmd, log, env=_converter_env(), what=f"convert_hf_to_gguf.py on {hf_dir}")
        pre = json.loads(report.read_text()) if report.is_file() else {}
    finally:
        report.unlink(missing_ok=True)
    texts = list(parity_texts) if parity_texts is not None else default_parity_texts(hf_dir)
    not_compared = 0
    if rule:
        tok = auto_tokenizer(hf_dir)
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

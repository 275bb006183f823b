"""ONNX export of a merged checkpoint with optimum-onnx, and its onnxruntime dynamic int8 variant.

Both directories load on their own (``ORTModelForCausalLM.from_pretrained(dir)``): the tokenizer,
chat template and generation config of the merged checkpoint are copied alongside. Both are
written atomically, loaded in onnxruntime as a check, and carry an ``export.json`` record.
The fp32 export is compared with PyTorch here (max |logit diff| recorded; above ``atol`` the export
fails) instead of by optimum's validation, which only warns and holds both models at once.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from qatforge.export.record import as_log, source_record, write_export_record
from qatforge.io import MANIFEST, atomic_dir, check_free_space, package_versions, read_json, size_bytes

TASK = "text-generation-with-past"
# Files of an HF checkpoint needed to tokenize/chat/generate, copied next to the ONNX graph.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
DEFAULT_CHECK_TEXTS = (
    "Hello, world!",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
)


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _session_info(model_dir: Path, threads: int | None) -> dict[str, Any]:
    """Load every ``*.onnx`` of ``model_dir`` in an onnxruntime ``InferenceSession``; names of its I/O."""
    import onnxruntime as ort

    out = {}
    for f in sorted(model_dir.glob("*.onnx")):
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(f), sess_options=so, providers=["CPUExecutionProvider"])
        out[f.name] = {"inputs": len(sess.get_inputs()), "outputs": len(sess.get_outputs())}
        del sess
    if not out:
        raise FileNotFoundError(f"{model_dir}: no .onnx file was written")
    return out


def embedding_tie(model_dir: Path, hf_dir: Path | None) -> dict[str, Any]:
    """Whether the graphs keep the checkpoint's input/output embedding tie: the number of
    ``[vocab, hidden]`` weight matrices (either orientation, any dtype) among their initializers;
    one means a shared matrix, two an untied pair (e.g. ``quantize_dynamic`` gives the LM-head
    MatMul its own int8 copy)."""
    import onnx

    from qatforge.export.record import hf_tied_embeddings
    from qatforge.io import read_json

    cfg = read_json(model_dir / "config.json")
    text = cfg.get("text_config") or cfg
    shape = {int(text["vocab_size"]), int(text["hidden_size"])}
    n = 0
    for f in sorted(model_dir.glob("*.onnx")):
        graph = onnx.load(str(f), load_external_data=False).graph
        n += sum(1 for t in graph.initializer if len(t.dims) == 2 and set(t.dims) == shape)
    source_tied = hf_tied_embeddings(hf_dir) if hf_dir is not None and any(Path(hf_dir).glob("*.safetensors")) else None
    return {"source_tied": source_tied, "embedding_matrices": n, "tied": n == 1}


def _check_texts(model_dir: Path, texts: Sequence[str] | None) -> list[str]:
    if texts is not None:
        return list(texts)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = list(DEFAULT_CHECK_TEXTS[:1])
    if getattr(tok, "chat_template", None):
        out.append(tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}],
                                           tokenize=False, add_generation_prompt=True))
    return out


def compare_with_torch(
    onnx_dir: str | os.PathLike,
    torch_dir: str | os.PathLike,
    texts: Sequence[str] | None = None,
    *,
    max_new_tokens: int = 8,
    threads: int | None = None,
) -> dict[str, Any]:
    """Logits of ``ORTModelForCausalLM(onnx_dir)`` vs the fp32 PyTorch model of ``torch_dir``.

    Returns ``{"max_abs_logit_diff", "texts", "greedy_identical"}`` (greedy continuation of
    each text compared token by token).
    """
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    import onnxruntime as ort
    from qatforge.chat import encode
    from qatforge.model import load_upcast, release_freed_memory

    onnx_dir, torch_dir = Path(onnx_dir), Path(torch_dir)
    tok = AutoTokenizer.from_pretrained(str(onnx_dir))
    texts = _check_texts(onnx_dir, texts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    # Only the inputs the decoder takes (a tokenizer may also return token_type_ids, which
    # generate() refuses), with the one BOS every runtime uses (qatforge.chat.bos_policy).
    encs = [{"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            for ids in (encode(tok, text) for text in texts) if ids]
    # PyTorch first, freed before onnxruntime loads: never both copies of the weights at once.
    pt_model = load_upcast(torch_dir, dtype=torch.float32)
    with torch.no_grad():
        refs = [(pt_model(**enc).logits.float(), pt_model.generate(**enc, **kw)[0].tolist()) for enc in encs]
    del pt_model
    release_freed_memory()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    ort_model = ORTModelForCausalLM.from_pretrained(onnx_dir, session_options=so, use_cache=True)
    kv_fix = _fix_kv_heads(ort_model)
    max_diff, same = 0.0, 0
    for enc, (ref, g_ref) in zip(encs, refs):
        with torch.no_grad():
            got = ort_model(**enc).logits.float()
            g_got = ort_model.generate(**enc, **kw)[0].tolist()
        max_diff = max(max_diff, float((ref - got).abs().max()))
        same += int(g_ref == g_got)
    return {"max_abs_logit_diff": max_diff, "texts": len(texts), "greedy_identical": same, "kv_heads_fix": kv_fix}


def _fix_kv_heads(ort_model: Any) -> dict[str, int] | None:
    """Give optimum's ``ORTModelForCausalLM`` the graph's KV-head count where it guessed another.

    optimum-onnx 0.1.0 uses ``num_attention_heads`` for the empty cache of model types missing from
    its grouped-query list (``phi3`` among them, so Phi-4-mini and any Phi-3 with GQA fail with
    "invalid dimensions for input: past_key_values.0.key"); the exported graph's past inputs carry
    the right number. Returns ``{"optimum", "graph"}`` when it was corrected.
    """
    past = [i for i in ort_model.session.get_inputs() if i.name.startswith("past_key_values.")]
    graph = past[0].shape[1] if past else None
    if isinstance(graph, int) and graph != ort_model.num_key_value_heads:
        fix = {"optimum": int(ort_model.num_key_value_heads), "graph": graph}
        ort_model.num_key_value_heads = graph
        return fix
    return None


def export(
    merged_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    atol: float = 1e-3,
    check_texts: Sequence[str] | None = None,
    threads: int | None = None,
    opset: int | None = None,
    source: Mapping[str, Any] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """fp32 ONNX export (task ``text-generation-with-past``) of ``merged_dir`` with optimum.

    The model is loaded as :func:`qatforge.model.load_upcast` (16-bit file to float32 without
    holding both) and handed to ``onnx_export_from_model``. optimum's own validation, which holds
    the PyTorch model and an onnxruntime session at once and only warns, is replaced by
    :func:`compare_with_torch` after the model is freed: logits on ``check_texts`` and greedy
    continuations, a logit difference above ``atol`` fails the export. Writes
    ``out_dir/export.json``; returns its provenance.
    """
    import torch
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.exporters.onnx.__main__ import maybe_load_preprocessors

    from qatforge.model import load_upcast, release_freed_memory

    log = as_log(log)
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if not (merged_dir / "config.json").is_file():
        raise FileNotFoundError(f"{merged_dir} is not an HF checkpoint (no config.json)")
    if threads:
        torch.set_num_threads(threads)
    weights = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors")) or size_bytes(merged_dir)
    check_free_space(out_dir, weights * 2)  # fp32 graph of a 16-bit checkpoint
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        log(f"optimum onnx_export_from_model {merged_dir} -> {out_dir} (task {TASK}, fp32)")
        model = load_upcast(merged_dir, dtype=torch.float32)
        model.config.use_cache = True  # what main_export sets for a -with-past task
        onnx_export_from_model(model, output=tmp, task=TASK, opset=opset, device="cpu", do_validation=False,
                               preprocessors=maybe_load_preprocessors(str(merged_dir)))
        del model
        release_freed_memory()
        side = _copy_side_files(merged_dir, tmp)
        sessions = _session_info(tmp, threads)
        tie = embedding_tie(tmp, merged_dir)
        check = compare_with_torch(tmp, merged_dir, check_texts, threads=threads)
        log(f"onnxruntime vs torch: max |logit diff| {check['max_abs_logit_diff']:.3g}, "
            f"greedy identical {check['greedy_identical']}/{check['texts']}")
        if not check["max_abs_logit_diff"] <= atol:
            raise RuntimeError(f"ONNX export of {merged_dir}: logits differ from PyTorch by "
                               f"{check['max_abs_logit_diff']:.3g} > atol {atol}")
    settings = {"variant": "fp32", "task": TASK, "dtype": "fp32", "opset": opset,
                "validation": "compare_with_torch", "atol": atol}
    record = write_export_record(
        out_dir, source=source_record(merged_dir, **(source or {})), tool=_tool_info(), settings=settings,
        started=started, sessions=sessions, side_files=side, check=check, embeddings=tie)
    log(f"wrote {out_dir} ({record['size_bytes'] / 2**20:.1f} MiB) in {record['provenance']['duration_s']} s")
    return record["provenance"] | {"size_bytes": record["size_bytes"], "sha256": record["sha256"]}


def quantize_int8(
    fp32_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    per_channel: bool = False,
    reference_dir: str | os.PathLike | None = None,
    check_texts: Sequence[str] | None = None,
    threads: int | None = None,
    source: Mapping[str, Any] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """onnxruntime ``quantize_dynamic`` (QInt8 weights) of an fp32 export; other files copied.

    Loaded in onnxruntime as a check; its logits are compared with the PyTorch model of
    ``reference_dir`` (default: the merged checkpoint named in the fp32 export's record, when it
    still exists) and the difference recorded (not bounded). The source defaults to the fp32
    export's source. Writes ``out_dir/export.json``; returns its provenance.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log = as_log(log)
    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    graphs = sorted(fp32_dir.glob("*.onnx"))
    if not graphs:
        raise FileNotFoundError(f"{fp32_dir}: no .onnx file to quantize (run the fp32 export first)")
    fp32_source: dict[str, Any] = {}
    if (fp32_dir / MANIFEST).is_file():
        fp32_source = read_json(fp32_dir / MANIFEST).get("provenance", {}).get("source", {})
    if reference_dir is None and fp32_source.get("merged_dir") and Path(fp32_source["merged_dir"]).is_dir():
        reference_dir = fp32_source["merged_dir"]
    check_free_space(out_dir, size_bytes(fp32_dir) // 2)
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        for f in fp32_dir.iterdir():
            if (f.is_file() and f.suffix != ".onnx" and not f.name.endswith(".onnx_data") and f.name != MANIFEST
                    and not f.name.startswith(".")):  # not Snakemake's .snakemake_timestamp
                shutil.copy2(f, tmp / f.name)
        for g in graphs:
            external = any(fp32_dir.glob(g.name + "_data")) or any(fp32_dir.glob(g.stem + ".onnx_data"))
            log(f"quantize_dynamic {g.name} (QInt8, per_channel={per_channel})")
            quantize_dynamic(g, tmp / g.name, weight_type=QuantType.QInt8, per_channel=per_channel,
                             use_external_data_format=external)
        sessions = _session_info(tmp, threads)
        tie = embedding_tie(tmp, Path(reference_dir) if reference_dir else None)
        check = compare_with_torch(tmp, reference_dir, check_texts, threads=threads) if reference_dir else None
        if check:
            log(f"int8 vs torch fp32: max |logit diff| {check['max_abs_logit_diff']:.3g}, "
                f"greedy identical {check['greedy_identical']}/{check['texts']}")
    settings = {"variant": "int8", "method": "onnxruntime.quantization.quantize_dynamic",
                "weight_type": "QInt8", "per_channel": per_channel}
    src = dict(source) if source else dict(fp32_source)
    src["onnx_fp32_dir"] = str(fp32_dir)
    record = write_export_record(out_dir, source=src, tool=_tool_info(), settings=settings, started=started,
                                 sessions=sessions, check=check, embeddings=tie)
    log(f"wrote {out_dir} ({record['size_bytes'] / 2**20:.1f} MiB) in {record['provenance']['duration_s']} s")
    return record["provenance"] | {"size_bytes": record["size_bytes"], "sha256": record["sha256"]}


def _tool_info() -> dict[str, Any]:
    return {"name": "optimum-onnx", **package_versions("optimum", "optimum-onnx", "onnx", "onnxruntime",
                                                       "torch", "transformers")}

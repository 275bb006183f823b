"""ONNX Runtime GenAI model folders of a merged checkpoint, written by ONNX Runtime GenAI's model builder.

Every variant is built from the merged 16-bit checkpoint (or the view of it the builder registers:
:mod:`qatforge.export.onnx_input`) by the builder in a process of its own, through
:mod:`qatforge.export.onnx_builder` (its peak memory is the job's), for the CPU execution provider
(settings: a config ``onnx.variants`` entry): ``fp32`` (the float reference graph), ``int4`` and ``int8`` (weight-only
``MatMulNBits``, block 32, the builder's default round-to-nearest). A folder holds ``model.onnx``
with its weights as external data (so no 2 GB protobuf limit), ``genai_config.json``, the
tokenizer and the chat template: what ``onnxruntime_genai.Model(dir)`` loads.

The folder is checked before it is kept, without loading its weights
(:mod:`qatforge.export.onnx_check`): it renders and tokenizes the chat prompt exactly as the merged
checkpoint's own files do, its ``genai_config.json`` parses in ``onnxruntime_genai`` and binds every
input and output of the graph, and every external tensor's bytes are in place. Running it is the
evaluate job's (onnxruntime for logits parity on the same answer positions and metrics as every
format, ``onnxruntime_genai`` for speed): a float32 graph alone is twice the bf16 checkpoint, so
loading it here would raise the export's peak past its output. No PyTorch copy of the model is
loaded either, so the job's peak memory is the builder's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from qatforge.export.onnx_check import check_folder, graph_summary, load_graph
from qatforge.export.onnx_input import builder_input
from qatforge.export.record import as_log, hf_tied_embeddings, source_record, write_export_record
from qatforge.io import atomic_dir, check_free_space, package_versions
from qatforge.learned_scales import SCALES_FILE, saved_grid

BUILDER = "qatforge.export.onnx_builder"  # the builder, with transformers 5's RoPE layout restated
EXECUTION_PROVIDER = "cpu"
FLOAT_PRECISIONS = frozenset({"fp32"})
# The merged checkpoint's tokenizer files, copied over the builder's re-saved ones (transformers 5
# drops the BOS rule qatforge records as add_bos_token, which runtimes read), and its generation config.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json",
)


def builder_command(input_dir: Path, out_dir: Path, cache_dir: Path, settings: Mapping[str, Any],
                    *, tied: bool) -> list[str]:
    """The builder's command line for ``settings`` (a config ``onnx.variants`` entry); a tied checkpoint
    keeps one embedding matrix for the lookup and the LM head (``shared_embeddings``). Sliding-window
    layers get a KV cache of the full length (``windowed_kv_cache=false``): the builder's windowed
    cache is a fixed-capacity buffer that only ONNX Runtime GenAI's generator feeds, and parity is
    measured with onnxruntime on the graph that ships."""
    extra = {k: v for k, v in settings.items() if k != "precision"}
    extra["hf_token"] = False  # never the hub: the input is a local folder
    extra["windowed_kv_cache"] = False
    if tied:
        extra["shared_embeddings"] = True
    opts = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in extra.items()]
    return [sys.executable, "-m", BUILDER, "-i", str(input_dir), "-o", str(out_dir), "-p", settings["precision"],
            "-e", EXECUTION_PROVIDER, "-c", str(cache_dir), "--extra_options", *opts]


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def export(
    merged_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    threads: int = 1,
    source: Mapping[str, Any] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Build the ONNX Runtime GenAI folder of ``settings`` (a config ``onnx.variants`` entry: the
    builder's precision and options; default fp32) from ``merged_dir``; ``variant`` names it in the
    record (default: the out_dir's name).

    Written atomically and checked (:func:`qatforge.export.onnx_check.check_folder`);
    ``out_dir/export.json`` records the builder's command, version, graph summary and check. Returns
    the record's provenance with size and sha256.
    """
    log = as_log(log)
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    settings = dict(settings or {"precision": "fp32"})
    variant = variant or out_dir.name
    is_float = settings.get("precision") in FLOAT_PRECISIONS
    if not (merged_dir / "config.json").is_file():
        raise FileNotFoundError(f"{merged_dir} is not an HF checkpoint (no config.json)")
    weights = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{merged_dir}: no *.safetensors weights for the ONNX model builder")
    # a quantized variant's builder first streams the float32 graph to its cache (onnx_builder)
    check_free_space(out_dir, weights * (2 if is_float else 3))
    tied = bool(hf_tied_embeddings(merged_dir))
    started = time.perf_counter()
    # the builder's scratch is a temp sibling too (made after atomic_dir removed stale ones), so a
    # killed job's is removed by the next one
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory(
            dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-work-") as work:
        work = Path(work)
        cmd = builder_command(builder_input(merged_dir, work / "input"), tmp, work / "cache", settings, tied=tied)
        log("$ " + " ".join(cmd))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        log(proc.stdout[-4000:] + proc.stderr[-4000:])
        if proc.returncode != 0:
            raise RuntimeError(f"ONNX model builder failed on {merged_dir} ({variant}, exit {proc.returncode}): "
                               f"{((proc.stderr or proc.stdout).strip().splitlines() or [''])[-1]}")
        side = _copy_side_files(merged_dir, tmp)
        learned = None
        if learns_scales(merged_dir, settings):
            from qatforge.export.onnx_block_scales import write_learned_scales

            learned = write_learned_scales(tmp, merged_dir, merged_dir / SCALES_FILE)
            log(f"wrote the learned block scales of {learned['nodes']} MatMulNBits nodes ({learned['blocks']} "
                f"blocks; learned / the builder's own scale, quartiles {learned['scale_ratio_quartiles']})")
        model = load_graph(tmp)
        graph = graph_summary(model)
        check = check_folder(tmp, merged_dir, model)
        log(f"checked {out_dir.name}: {graph['ops'].get('MatMulNBits', 0)} MatMulNBits, prompt ids as the "
            f"checkpoint's, genai_config binds the graph's {check['bound_inputs']} inputs, "
            f"{check['external_tensors']} external tensors in place")
    record = write_export_record(
        out_dir, source=source_record(merged_dir, **(source or {})), tool=tool_info(),
        settings={"variant": variant, **settings, "execution_provider": EXECUTION_PROVIDER,
                  "shared_embeddings": tied, "command": cmd[1:]},
        started=started, graph=graph, side_files=side, check=check,
        **({"learned_block_scales": learned} if learned else {}))
    log(f"wrote {out_dir} ({record['size_bytes'] / 2**20:.1f} MiB) in {record['provenance']['duration_s']} s")
    return record["provenance"] | {"size_bytes": record["size_bytes"], "sha256": record["sha256"]}


def learns_scales(merged_dir: Path, settings: Mapping[str, Any]) -> bool:
    """Whether the folder of ``settings`` is written with the merged checkpoint's learned block
    scales: the checkpoint has them for MatMulNBits int4, and the variant is int4 in blocks of 32."""
    scales = merged_dir / SCALES_FILE
    return (scales.is_file() and saved_grid(scales) == "MatMulNBits int4"
            and settings.get("precision") == "int4" and settings.get("block_size") == 32)


def tool_info() -> dict[str, Any]:
    return {"name": "onnxruntime-genai model builder",
            **package_versions("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "torch", "transformers")}

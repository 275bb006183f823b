"""The directory ONNX Runtime GenAI's model builder is given for a merged checkpoint.

A merged text model whose architecture the builder registers is given as it is. A text model the
builder knows only under its family's multimodal architecture (``qatforge.spec.onnx_archs``:
Qwen3.5, Gemma 4, Ministral 3) is given as a *view* in ``work_dir``: a config.json of that
architecture wrapping the text config as ``text_config`` (with a tiny or no vision config: the
builder builds only the text part), safetensors whose tensors are renamed ``model.*`` ->
``model.language_model.*`` (the header is rewritten and the data bytes are streamed from the
merged file unchanged: no tensor is loaded), and every other file (tokenizer, chat template,
generation config) symlinked. Pure: no torch, no transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

from qatforge.io import has_mtp_tensors, safetensors_header
from qatforge.spec.onnx_archs import builder_architecture, builder_architectures, view_config, view_key

INDEX = "model.safetensors.index.json"


def builder_input(merged_dir: Path, work_dir: Path, *, registered: list[str] | None = None) -> Path:
    """The directory to hand the builder for ``merged_dir``: ``merged_dir`` itself when its first
    architecture is registered by the builder (or has no multimodal mapping: the builder then says
    what it does not support), else the view written to ``work_dir`` (replaced if present).

    ``registered``: the builder's architectures (default: read from the installed builder).
    """
    merged_dir, work_dir = Path(merged_dir), Path(work_dir)
    cfg = json.loads((merged_dir / "config.json").read_text())
    arch = (cfg.get("architectures") or [None])[0]
    registered = builder_architectures() if registered is None else registered
    target = builder_architecture(arch) if arch else None
    if arch in registered or target is None:
        return merged_dir
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    files = sorted(p for p in merged_dir.iterdir() if p.is_file())
    if not any(p.suffix == ".safetensors" for p in files):
        raise FileNotFoundError(f"{merged_dir}: no safetensors weights to build {target} from")
    text_config = dict(cfg)
    if text_config.get("mtp_num_hidden_layers") and not has_mtp_tensors(merged_dir):
        # no mtp.* tensors (transformers never saves them): the builder must not look for an MTP head
        text_config["mtp_num_hidden_layers"] = 0
    (work_dir / "config.json").write_text(json.dumps(view_config(text_config, target), indent=2) + "\n")
    for p in files:
        if p.name == "config.json":
            continue
        if p.suffix == ".safetensors":
            rename_safetensors(p, work_dir / p.name)
        elif p.name == INDEX:
            index = json.loads(p.read_text())
            index["weight_map"] = {view_key(k): v for k, v in index["weight_map"].items()}
            (work_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        else:
            os.symlink(p.resolve(), work_dir / p.name)
    return work_dir


def rename_safetensors(src: Path, dst: Path) -> None:
    """Write ``src`` to ``dst`` with every tensor renamed by ``view_key``: a new header, then the data
    bytes copied as they are (offsets are relative to the data, so they do not change)."""
    header, start = safetensors_header(src)
    renamed = {k if k == "__metadata__" else view_key(k): v for k, v in header.items()}
    raw = json.dumps(renamed, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(raw)))
        fout.write(raw)
        fin.seek(start)
        shutil.copyfileobj(fin, fout, length=16 << 20)

"""Post-training quantization (PTQ) of a merged checkpoint with a QAT scheme's torchao config.

For the baseline run this gives the torchao artifact to compare with the QAT run's
``qat_converted`` model: the same scheme names and configs (``qatforge.qat.scheme_config``),
applied after training instead of during it. Quantizing and saving are ``qatforge.qat``'s
(``quantize_for_deploy`` / ``save_torchao``: a transformers ``TorchAoConfig`` checkpoint saved
with ``safe_serialization=False``, written atomically, reloaded and run through ``generate``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from qatforge.export.record import as_log, source_record
from qatforge.io import MANIFEST, check_free_space, package_versions, read_json, size_bytes, write_json


def ptq(
    merged_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    scheme: str,
    *,
    threads: int | None = None,
    trust_remote_code: bool = False,
    source: Mapping[str, Any] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Quantize the fp32-loaded merged model with ``scheme`` and save a reloadable TorchAO checkpoint.

    Writes ``out_dir/export.json`` (source, tool versions, settings, reload/generate check,
    duration); returns its provenance.
    """
    import torch

    from qatforge.model import load_tokenizer, load_upcast
    from qatforge.qat import parse_scheme, quantize_for_deploy, save_torchao

    log = as_log(log)
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if not (merged_dir / "config.json").is_file():
        raise FileNotFoundError(f"{merged_dir} is not an HF checkpoint (no config.json)")
    name = parse_scheme(scheme).name  # unknown scheme -> ValueError listing the valid ones
    if threads:
        torch.set_num_threads(threads)
    check_free_space(out_dir, size_bytes(merged_dir))
    started = time.perf_counter()
    tok = load_tokenizer(merged_dir, trust_remote_code=trust_remote_code)
    model = load_upcast(merged_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    q = quantize_for_deploy(model, name)
    log(f"PTQ {name}: {len(q['modules'])} modules quantized (untied embeddings: {q['untied']})")
    provenance = {
        "source": source_record(merged_dir, **(source or {})),
        "tool": {"name": "torchao", **package_versions("torchao", "torch", "transformers")},
        "settings": {"scheme": name, "method": "ptq", "load_dtype": "float32",
                     "serialization": "safe_serialization=False"},
        "untied_embeddings": q["untied"],
    }
    info = save_torchao(model, tok, out_dir, name, provenance=provenance, log=log)
    # Record the total duration without re-hashing the checkpoint.
    manifest = out_dir / MANIFEST
    record = read_json(manifest)
    record["provenance"]["duration_s"] = round(time.perf_counter() - started, 3)
    write_json(manifest, record)
    log(f"wrote {out_dir} ({record['size_bytes'] / 2**20:.1f} MiB) in {record['provenance']['duration_s']} s")
    return record["provenance"] | {"size_bytes": record["size_bytes"], "sha256": record["sha256"], "check": info}

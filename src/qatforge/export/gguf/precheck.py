"""The GGUF export's facts that depend only on the base, checked before any training.

* llama.cpp tokenizes the dataset's chats (and edge cases) exactly like the HF tokenizer, with what
  llama.cpp can be told set so that they agree (``conversion.convert_checked``);
* for each GGUF-targeted QAT run, ``llama-quantize --dry-run`` of its quant writes every tensor the
  run fake-quantizes in the type it trains it under (``quantization.check_trained_types``).

A base that fails either is refused in seconds, naming the first differing text or the tensor; the
same checks run again on the real files after training.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from qatforge.export.gguf.conversion import convert_checked
from qatforge.export.gguf.quantization import check_trained_types, planned_types
from qatforge.export.gguf.tokenizer import parity_texts_from_parquet
from qatforge.export.record import as_log
from qatforge.io import write_json


def check_base(
    base_dir: str | os.PathLike,
    dev_parquet: str | os.PathLike,
    out_json: str | os.PathLike,
    *,
    outtype: str,
    pre_tokenizer: str | None,
    model_name: str | None,
    runs: Mapping[str, Mapping[str, Any]],
    log: Any = None,
) -> dict[str, Any]:
    """Check ``base_dir`` for the GGUF export and write the record to ``out_json`` (atomically).

    ``runs``: ``{run: {"quant", "spec", "scheme", "targets"}}`` of the GGUF-targeted QAT runs (the
    ``gguf.quants`` entry each ships as); without any, a vocabulary-only conversion suffices.
    ``model_name`` as ``gguf_convert`` writes it: llama.cpp sets some tokens' attributes by the
    GGUF's ``general.name`` (Phi-3's rstrip), so the check converts exactly as the export will.
    """
    log = as_log(log)
    base_dir, out_json = Path(base_dir), Path(out_json)
    started = time.perf_counter()
    record: dict[str, Any] = {"base": str(base_dir)}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_json.parent, prefix=".gguf-check-") as tmp:
        gguf_file = Path(tmp) / "base.gguf"
        texts = parity_texts_from_parquet(dev_parquet, base_dir)
        pre, parity = convert_checked(base_dir, gguf_file, outtype=outtype, pre_tokenizer=pre_tokenizer,
                                      model_name=model_name, parity_texts=texts, vocab_only=not runs, log=log,
                                      name=base_dir)
        record |= {"pre_tokenizer": pre, "tokenizer_parity": {k: v for k, v in parity.items() if k != "mismatches"}}
        trained = {}
        for run, r in sorted(runs.items()):
            spec = dict(r["spec"])
            types = planned_types(gguf_file, spec.pop("type"), spec, log=log)
            try:
                trained[run] = check_trained_types(types, r["scheme"], r["targets"]) | {"quant": r["quant"]}
            except ValueError as e:
                raise ValueError(f"runs.{run} ({r['scheme']}) ships as gguf.quants.{r['quant']}, but "
                                 f"llama-quantize --dry-run on {base_dir}: {e}") from None
            log(f"runs.{run}: llama-quantize writes every trained tensor in its trained type "
                f"({sorted(set(trained[run]['trained'].values()))})")
        record["qat_tensor_types"] = trained
    record["seconds"] = round(time.perf_counter() - started, 2)
    write_json(out_json, record)
    return record

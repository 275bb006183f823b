"""The GGUF checks of the base (qatforge.export.gguf.precheck) refuse a base before any training.

Each case is a real ``snakemake`` run on a family replica changed so that one check fails: the run
stops at ``gguf_check``, naming the first differing text or the tensor, before a training job starts.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from conftest import snakemake
from families import ZEPHYR
from test_families import family_project


def _zephyr_template(base):
    """llama2-spm with a template that does not start with a special token: HF (legacy: false) then
    prefixes the chat's first text, and after a turn's </s> nothing, which no llama.cpp setting matches."""
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": ZEPHYR}))
    return "llama.cpp tokenizes", "differently from the HF tokenizer"


def _odd_ffn(base):
    """qwen3 with an FFN width (528) that is not a multiple of 32: llama-quantize cannot store
    ffn_down (rows of 528) as Q4_0, the type the QAT run would train it under."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(base)
    cfg.intermediate_size = 528
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(base, safe_serialization=True)
    return "llama-quantize --dry-run", "ffn_down.weight="


CASES = {"tokenizer": ("llama2-spm", _zephyr_template), "tensor types": ("qwen3", _odd_ffn)}


@pytest.mark.parametrize("case", list(CASES))
def test_base_failing_a_gguf_check_is_refused_before_training(case, family_replicas, tmp_path):
    family, change = CASES[case]
    replicas = tmp_path / "replicas"
    shutil.copytree(family_replicas[family], replicas / family)
    needles = change(replicas / family)
    work = family_project(family, replicas, tmp_path / "project")
    started = time.monotonic()
    proc = snakemake(work, "--cores", "2", check=False)
    seconds = time.monotonic() - started
    assert proc.returncode != 0
    log = (work / "logs" / "gguf_check.log").read_text()
    assert all(n in log for n in needles), log[-3000:]
    assert not list((work / "results" / "runs").glob("*/checkpoints")) and not (work / "logs" / "train").exists()
    print(f"{case}: refused after {seconds:.0f} s (prepare_data, build_base, gguf_check), before any training")
    assert seconds < 300  # the three jobs; a training run of even this replica takes longer

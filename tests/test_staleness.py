"""Issues 6 and 11: after a config edit, `snakemake -n` schedules exactly the stale jobs (real Snakemake)."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import yaml
from snakemake.utils import validate

from conftest import ROOT, read_config, snakemake, write_config
from qatforge.spec import config as qcfg

RUN_OTHER = "qat-int8-int4"


def planned_jobs(workdir: Path) -> list[tuple[str, str]]:
    """(rule, first output) of every job a dry run would execute."""
    out = snakemake(workdir, "-n", "--cores", "2").stdout
    if "Nothing to be done" in out:
        return []
    jobs = []
    for m in re.finditer(r"^rule (\w+):\n(?:.*\n)*?\s+output: ([^\s,]+)", out, flags=re.M):
        jobs.append((m.group(1), m.group(2)))
    assert jobs, f"could not parse the dry run:\n{out}"
    return jobs


def test_no_change_nothing_to_do(built_workdir):
    out = snakemake(built_workdir, "-n", "--cores", "2").stdout
    assert "Nothing to be done" in out, out


def test_config_with_sorted_keys_reruns_nothing(built_workdir):
    """Params compare by value: the same config with every mapping's keys reordered is no change."""
    cfg = read_config(built_workdir)
    (built_workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    out = snakemake(built_workdir, "-n", "--cores", "2").stdout
    assert "Nothing to be done" in out, out


def _reversed_keys(value):
    """``value`` with the keys of every dict in reverse order (lists unchanged)."""
    if isinstance(value, dict):
        return {k: _reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


def test_param_slices_do_not_depend_on_config_key_order():
    """The config slices the rules pass as params have one repr for any key order (no build needed)."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["runs"]["baseline"]["train"] = {"lr": 1e-3, "lora": {"r": 8, "alpha": 16}}
    cfg["report"]["thresholds"] = {"gguf": {"Q8_0": {"top1_agree": 0.9, "kld_mean": 0.01}}, "hf": {}}
    other = _reversed_keys(cfg)
    for c in (cfg, other):
        validate(c, str(ROOT / "config" / "schema.yaml"))  # fills defaults, as the Snakefile does
    assert list(other["train"]) != list(cfg["train"]) and other == cfg

    def reprs(c, canonical=qcfg.sorted_keys):
        """repr of each params slice, by name (the rules pass them through sorted_keys)."""
        out = {"builtin": c["model"]["builtin"], "thresholds": c["report"]["thresholds"]}
        out |= {f"train:{run}": qcfg.train_settings(c, run) for run in qcfg.runs(c)}
        out |= {f"quant:{q}": spec for q, spec in c["gguf"]["quants"].items()}
        return {name: repr(canonical(value)) for name, value in out.items()}

    assert reprs(cfg, canonical=lambda v: v) != reprs(other, canonical=lambda v: v)  # without it
    assert reprs(cfg) == reprs(other)
    # values and list order are kept
    mixed = {"b": [{"y": 1, "x": (2, {"q": 0, "p": 1})}, 3], "a": None}
    assert qcfg.sorted_keys(mixed) == mixed
    assert repr(qcfg.sorted_keys(mixed)) == "{'a': None, 'b': [{'x': (2, {'p': 1, 'q': 0}), 'y': 1}, 3]}"


def test_touching_dataset_without_changing_bytes_reruns_nothing(built_workdir):
    cfg = read_config(built_workdir)
    os.utime(built_workdir / cfg["data"]["path"])
    assert planned_jobs(built_workdir) == []


def test_edit_one_quant_rebuilds_only_that_quant(built_workdir):
    cfg = read_config(built_workdir)
    cfg["gguf"]["quants"]["Q8_0"]["pure"] = True
    write_config(built_workdir, cfg)
    jobs = planned_jobs(built_workdir)
    rules = Counter(rule for rule, _ in jobs)
    # only the baseline exports Q8_0 (the QAT runs build their matched artifact only)
    assert rules == Counter({"gguf_quantize": 1, "evaluate": 1, "report": 1, "parity_gate": 1}), jobs
    assert all("Q8_0" in out for rule, out in jobs if rule in ("gguf_quantize", "evaluate")), jobs


def test_add_quant_builds_only_its_jobs_and_remove_reruns_only_report(built_workdir):
    cfg = read_config(built_workdir)
    cfg["gguf"]["quants"]["Q5_K_M"] = {"type": "Q5_K_M"}
    write_config(built_workdir, cfg)
    jobs = planned_jobs(built_workdir)
    assert Counter(r for r, _ in jobs) == Counter(
        {"gguf_quantize": 1, "evaluate": 1, "report": 1, "parity_gate": 1}
    ), jobs
    assert all("Q5_K_M" in out for r, out in jobs if r in ("gguf_quantize", "evaluate")), jobs

    del cfg["gguf"]["quants"]["Q5_K_M"]
    del cfg["gguf"]["quants"]["Q8_0"]  # (Q4_0 stays: the gguf-q4_0 QAT run ships as it)
    write_config(built_workdir, cfg)
    jobs = planned_jobs(built_workdir)
    assert Counter(r for r, _ in jobs) == Counter({"report": 1, "parity_gate": 1}), jobs


def test_lora_change_of_one_run_rebuilds_only_that_run(built_workdir):
    cfg = read_config(built_workdir)
    cfg["runs"][RUN_OTHER]["train"] = {**cfg["runs"][RUN_OTHER]["train"], "lora": {"r": 8}}
    write_config(built_workdir, cfg)
    jobs = planned_jobs(built_workdir)
    rules = {r for r, _ in jobs}
    assert {"train", "select_best", "merge", "qat_convert", "reference", "evaluate", "report"} <= rules
    for rule, out in jobs:
        if rule in ("report", "parity_gate"):
            continue
        assert f"/{RUN_OTHER}/" in out, f"{rule} -> {out} is not part of the edited run"


def test_baseline_change_reruns_the_runs_distilled_from_it(built_workdir):
    """The QAT runs' base is the baseline's merged model: a new baseline retrains them too."""
    cfg = read_config(built_workdir)
    cfg["runs"]["baseline"]["train"] = {"lora": {"r": 8}}
    write_config(built_workdir, cfg)
    trained = {out for rule, out in planned_jobs(built_workdir) if rule == "train"}
    assert trained == {f"results/runs/{r}/checkpoints" for r in cfg["runs"]}, trained


def test_disposable_bf16_gguf_is_removed_once_its_quants_are_built(built_workdir):
    """gguf.keep_intermediate: false marks the unquantized GGUF temp(): deleted when no job needs it."""
    cfg = read_config(built_workdir)
    cfg["gguf"]["keep_intermediate"] = False
    # an edit that rebuilds Q8_0 from the BF16 file (not Q4_0: the gguf-q4_0 QAT run ships it plain)
    cfg["gguf"]["quants"]["Q8_0"]["pure"] = True
    write_config(built_workdir, cfg)
    gguf_dir = built_workdir / "results/runs/baseline/gguf"
    bf16 = next(gguf_dir.glob("*-BF16.gguf"))
    q8 = next(gguf_dir.glob("*-Q8_0.gguf"))
    before = q8.stat().st_mtime_ns
    proc = snakemake(built_workdir, "--cores", "2")
    assert "rule gguf_quantize" in proc.stdout + proc.stderr and q8.stat().st_mtime_ns > before
    assert not bf16.exists(), "the disposable BF16 GGUF outlived its last consumer"
    assert Path(f"{bf16}.json").is_file(), "the conversion record (hash, provenance) is kept"
    # a missing temp() intermediate does not make its finished consumers stale
    assert planned_jobs(built_workdir) == []


def test_gguf_edit_rechecks_the_base_but_retrains_nothing(built_workdir):
    """Training waits for the base's GGUF check (rules/base.smk: gguf_check) but is not made stale by
    it: an edit of what the check reads reruns the check, never a training run."""
    cfg = read_config(built_workdir)
    cfg["gguf"]["pre_tokenizer"] = "llama-bpe"
    write_config(built_workdir, cfg)
    rules = Counter(r for r, _ in planned_jobs(built_workdir))
    assert rules["gguf_check"] == 1, rules
    assert not {"train", "select_best", "merge", "reference", "torchao_ptq", "qat_convert"} & set(rules), rules


def _train_threads(workdir: Path) -> dict[str, int]:
    """{run: threads} of the train jobs a forced dry run schedules (Snakemake prints threads > 1 only)."""
    out = snakemake(workdir, "-n", "--cores", "2", "--forcerun", "train").stdout
    blocks = re.findall(r"^(?:local)?rule train:\n((?:[ \t]+.*\n)+)", out, flags=re.M)
    threads = {}
    for block in blocks:
        run = re.search(r"wildcards: run=([^\s,]+)", block).group(1)
        m = re.search(r"threads: (\d+)", block)
        threads[run] = int(m.group(1)) if m else 1
    assert threads, f"no train job in the dry run:\n{out}"
    return threads


def test_thread_counts_set_the_jobs_threads_and_rerun_nothing(built_workdir):
    """train.threads, global or a run's own, is each train job's threads: a resource, not the recipe
    (the weights are the same bytes at any count), so changing it reruns nothing."""
    cfg = read_config(built_workdir)
    runs = qcfg.runs(cfg)
    # the default: the baseline on train.threads, the QAT runs (which wait only for it) on one each
    assert _train_threads(built_workdir) == {r: 2 if r == "baseline" else 1 for r in runs}
    cfg["train"]["threads"] = 1
    cfg["runs"][RUN_OTHER]["train"]["threads"] = 2
    write_config(built_workdir, cfg)
    assert planned_jobs(built_workdir) == []
    assert _train_threads(built_workdir) == {r: 2 if r == RUN_OTHER else 1 for r in runs}

"""Each job's resources from the model size (qatforge.spec.resources) and their wiring into the rules."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_project, read_config, snakemake, write_config
from qatforge.spec import resources as R

QWEN3_06B = R.ModelSize(596_049_920, 151_936, "test")  # the measured shape (bf16 1,137 MiB)
SIZES = {"0.6B": QWEN3_06B, "1.7B": R.ModelSize(1_700_000_000, 151_936, "test"),
         "4B": R.ModelSize(4_000_000_000, 151_936, "test"), "8B": R.ModelSize(8_000_000_000, 151_936, "test")}
# Measured on a random-init Qwen3-0.6B shape, 2-core CPU, 4 steps of batch 16 (issue 23); merge,
# gguf_convert, gguf_imatrix and build_base's memory from the 2026-12-04 scale run (bench/perf.py), larger:
# (rule, wildcards, run is QAT) -> (peak MiB, seconds)
MEASURED = {
    ("train", "baseline"): (6220, 430), ("train", "qat"): (16099, 439),
    ("select_best", "baseline"): (4205, 478), ("select_best", "qat"): (9785, 496),
    ("qat_convert", "qat"): (4339, 42), ("build_base", None): (3675, 29),
    ("evaluate", "baseline"): (3327, 67), ("reference", "baseline"): (3073, 96),
    ("merge", "baseline"): (3841, 120), ("torchao_ptq", "baseline"): (2161, 85),
    ("gguf_convert", "baseline"): (1596, 200), ("gguf_imatrix", "baseline"): (1747, 300),
    ("gguf_quantize", "baseline"): (1105, 200),
}


def default_config(**resources) -> dict:
    from snakemake.utils import validate

    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["resources"] = {**(cfg.get("resources") or {}), **resources}
    validate(cfg, str(ROOT / "config/schema.yaml"))
    return cfg


def measured_config() -> dict:
    """The default config cut to the measurement runs' settings."""
    cfg = default_config()
    cfg["train"].update(max_steps=4, save_steps=2, batch_size=16, grad_accum=1)
    for run in cfg["runs"].values():
        run.get("train", {}).update(max_steps=4, save_steps=2, batch_size=16)
    cfg["eval"].update(n_prompts=24, n_nll=8, max_new_tokens=16, speed_prompts=2, speed_repeats=1)
    return cfg


def wildcards_of(cfg: dict, rule: str, which: str | None) -> dict:
    run = {"baseline": "baseline", "qat": "qat-int8-int4", None: None}[which]
    return {"run": run, "format": "hf", "variant": "merged", "quant": "Q8_0"} if run else {}


@pytest.fixture(scope="module")
def table():
    return R.load_table()


def test_table_has_every_rule_and_complete_records(table):
    assert set(R.RULES) <= set(table["kinds"])
    assert R.refit(table) == table, "the slopes are not the fit of measured.runs (refit the table)"
    bad = {**table, "kinds": {**table["kinds"], "train": {**table["kinds"]["train"], "work": "epochs"}}}
    with pytest.raises(R.ResourceError, match="kinds.train.work"):
        R.check_table(bad)
    with pytest.raises(R.ResourceError, match="missing floor_mb"):
        R.check_table({k: v for k, v in table.items() if k != "floor_mb"})


def test_tiny_default_requests_floors_and_small_values(table):
    cfg = default_config()
    size = R.model_size(cfg, ROOT)
    assert size.source == "builtin shape" and 3e6 < size.params < 4e6 and size.vocab == 1024
    for label, rule, w in R.representative_jobs(cfg):
        req = R.request(rule, cfg, size, table, w)
        assert table["floor_mb"] <= req.mem_mb <= 2000, (label, req)
        assert table["floor_min"] <= req.runtime <= 90, (label, req)
        assert req.gpu == 0


@pytest.mark.parametrize(("rule", "which"), list(MEASURED))
def test_requests_at_the_measured_shape_cover_the_measurements(table, rule, which):
    cfg = measured_config()
    mem, seconds = MEASURED[rule, which]
    req = R.request(rule, cfg, QWEN3_06B, table, wildcards_of(cfg, rule, which))
    assert req.mem_mb >= 1.25 * mem, (req, mem)
    assert req.runtime >= 3 * seconds / 60, (req, seconds)


def test_fewer_threads_than_measured_ask_proportionally_longer_on_cpu_only(table):
    """train/select_best slopes were measured on 2 threads: a 1-thread QAT run (the default) asks twice
    the params term, 4 threads no less than 2, and a GPU job gets the GPU factor instead."""
    assert table["kinds"]["train_qat"]["threads"] == 2
    rec, w = table["kinds"]["train_qat"], {"run": "qat-int8-int4"}

    def config(threads, gpu=False):
        cfg = default_config(gpu=gpu)
        cfg["runs"]["qat-int8-int4"]["train"]["threads"] = threads
        return cfg

    def params_minutes(threads, gpu=False):
        load = R.job_load("train", config(threads, gpu), SIZES["4B"], w, table["tokens_per_conversation"])
        assert load.threads == threads
        _, minutes = R.estimate(rec, load, table["gpu_runtime_factor"] if gpu else None)
        return minutes - rec["fixed_min"]

    one, two, four = params_minutes(1), params_minutes(2), params_minutes(4)
    assert one == pytest.approx(2 * two) and four == pytest.approx(two)
    assert params_minutes(1, gpu=True) == pytest.approx(table["gpu_runtime_factor"] * two)
    assert R.request("train", config(1), SIZES["4B"], table, w).runtime > R.request("train", config(2), SIZES["4B"], table, w).runtime
    assert R.request("train", config(1, gpu=True), SIZES["4B"], table, w).runtime == R.request(
        "train", config(2, gpu=True), SIZES["4B"], table, w).runtime
    # a refit records the measured job's threads; a kind measured without them is not thread-scaled
    trained = R.fit(table["kinds"]["train"], R.Load(QWEN3_06B.params, QWEN3_06B.vocab, steps=4, batch=16, threads=2), 6220, 430)
    assert trained["threads"] == 2
    assert "threads" not in R.fit(trained, R.Load(QWEN3_06B.params, QWEN3_06B.vocab, steps=4, batch=16), 6220, 430)
    merge = R.fit(table["kinds"]["merge"], R.Load(QWEN3_06B.params, QWEN3_06B.vocab), 3841, 120)
    assert "threads" not in merge and R.thread_factor(merge, R.Load(1e9, 1000, threads=1)) == 1.0


def test_onnx_export_covers_its_multiple_of_bf16(table):
    cfg = default_config()
    bf16 = QWEN3_06B.params * 2 / 2**20
    for variant, factor in (("fp32", 3.3), ("int4", 4.7)):
        req = R.request("onnx_export", cfg, QWEN3_06B, table, {"run": "baseline", "variant": variant})
        assert req.mem_mb >= 1.25 * factor * bf16, (variant, req)


def test_requests_grow_with_params_and_retries(table):
    cfg = default_config()
    tiny = R.model_size(cfg, ROOT)
    sizes = [tiny, *SIZES.values()]
    for label, rule, w in R.representative_jobs(cfg):
        reqs = [R.request(rule, cfg, s, table, w) for s in sizes]
        assert all(a.mem_mb <= b.mem_mb and a.runtime <= b.runtime for a, b in zip(reqs, reqs[1:])), (label, reqs)
        if rule not in ("prepare_data", "report", "parity_gate", "ollama_modelfile"):
            assert reqs[-1].mem_mb > reqs[1].mem_mb and reqs[-1].runtime > reqs[1].runtime, (label, reqs)
        again = R.request(rule, cfg, SIZES["4B"], table, w, attempt=2)
        assert again.mem_mb >= 1.5 * reqs[3].mem_mb - 100 and again.runtime >= 1.5 * reqs[3].runtime - 1, label


def test_eval_sizes_scale_evaluation(table):
    """More conversations take longer but no more memory (one conversation's logits at a time);
    longer conversations take more memory."""
    cfg = default_config()
    w = {"run": "baseline", "format": "hf", "variant": "merged"}
    small = copy.deepcopy(cfg)
    small["eval"].update(n_prompts=10, n_nll=10)
    short = copy.deepcopy(cfg)
    short["data"]["max_tokens"] = 256
    big, little, short_ = (R.request("evaluate", c, SIZES["4B"], table, w) for c in (cfg, small, short))
    assert big.mem_mb == little.mem_mb and big.runtime > little.runtime
    assert big.mem_mb > short_.mem_mb


def test_overrides_cap_and_unknown_rule(table):
    cfg = default_config(rules={"train": {"mem_mb": 64000}}, max_runtime=600)
    req = R.request("train", cfg, SIZES["8B"], table, {"run": "baseline"})
    assert req.mem_mb == 64000 and req.runtime == 600
    with pytest.raises(R.ResourceError, match="resources.rules: no rule named trian"):
        R.check_config(default_config(rules={"trian": {"mem_mb": 1}}))


def test_gpu_runs_faster_only_on_gpu_rules(table):
    cpu, gpu = default_config(), default_config(gpu=True)
    for label, rule, w in R.representative_jobs(cfg := gpu):
        a, b = (R.request(rule, c, SIZES["8B"], table, w) for c in (cpu, cfg))
        on_gpu = rule in ("train", "select_best") or (rule == "evaluate" and w["format"] in ("hf", "torchao"))
        assert b.gpu == int(on_gpu), label
        assert (b.runtime < a.runtime) if on_gpu else (b == a), label


def _real_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_of_a_local_dir_is_the_real_count(tmp_path, tied):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    conf = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied)
    model = Qwen3ForCausalLM(conf)
    model.save_pretrained(tmp_path / "base")
    cfg = default_config()
    cfg["model"]["base"] = str(tmp_path / "base")
    size = R.model_size(cfg, tmp_path)
    # tied: the safetensors file holds the shared matrix once, as parameters() counts it
    assert size.params == _real_count(model) and size.vocab == 300
    assert R.params_from_hf_config(json.loads((tmp_path / "base/config.json").read_text())) == _real_count(model)


def test_builtin_shape_is_the_real_tiny_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = R.builtin_config({"vocab_size": 1024})
    conf = Qwen3Config(vocab_size=1024, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                       num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
                       num_key_value_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"],
                       tie_word_embeddings=False)
    assert R.params_from_hf_config(shape) == _real_count(Qwen3ForCausalLM(conf))


def test_hub_id_from_the_cache_params_key_or_fallback(tmp_path, monkeypatch):
    snap = tmp_path / "hub/models--org--m/snapshots/abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
                                                   "num_hidden_layers": 2, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = default_config()
    cfg["model"]["base"] = "org/m"
    size = R.model_size(cfg, tmp_path)
    assert size.source == "org/m: HF cache" and size.vocab == 300 and size.params > 0
    cfg["resources"]["params"] = 0.6e9
    assert R.model_size(cfg, tmp_path) == R.ModelSize(600_000_000, 300, "resources.params")
    cfg["model"]["base"], cfg["resources"]["params"] = "org/absent", None
    assert R.model_size(cfg, tmp_path).source == "fallback"
    built = tmp_path / "results/base"  # a built base counts only if built from this model.base
    shutil.copytree(snap, built)
    (built / "export.json").write_text(json.dumps({"provenance": {"source": "org/other"}}))
    assert R.model_size(cfg, tmp_path).source == "fallback"
    (built / "export.json").write_text(json.dumps({"provenance": {"source": "org/absent"}}))
    assert R.model_size(cfg, tmp_path) == R.ModelSize(size.params, 300, "results/base: safetensors headers")


# ---- the wiring: what `snakemake -n` prints ----------------------------------------------------

JOB = re.compile(r"^rule (\w+):\n(.*?)(?:\n\n|\Z)", re.S | re.M)


def dry_run_resources(workdir: Path) -> list[tuple[str, dict, dict]]:
    """(rule, wildcards, resources) of every job of a dry run."""
    out = snakemake(workdir, "-n", "--cores", "1", timeout=300).stdout
    jobs = []
    for rule, body in JOB.findall(out):
        wc = re.search(r"^\s*wildcards: (.*)$", body, re.M)
        res = re.search(r"^\s*resources: (.*)$", body, re.M)
        wildcards = dict(kv.split("=", 1) for kv in wc.group(1).split(", ")) if wc else {}
        jobs.append((rule, wildcards, dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {}))
    assert jobs, out
    return jobs


def test_dry_run_shows_the_computed_resources_and_gpus_on_exactly_the_gpu_jobs(tmp_path, table):
    from snakemake.utils import validate

    work = copy_project(tmp_path / "project")
    cfg = read_config(work)
    cfg["resources"] = {"gpu": True, "gpu_model": "a100"}
    write_config(work, cfg)
    validate(cfg, str(work / "config/schema.yaml"))
    size = R.model_size(cfg, work)
    jobs = dry_run_resources(work)
    assert {r for r, _, _ in jobs} - {"all"} <= set(R.RULES)
    gpu_jobs = set()
    for rule, w, res in jobs:
        if rule == "all":
            continue
        want = R.request(rule, cfg, size, table, w)
        assert (int(res["mem_mb"]), int(res["runtime"])) == (want.mem_mb, want.runtime), (rule, w, res)
        if int(res.get("gpu", 0)):
            assert res["gpu_model"] == "a100"
            gpu_jobs.add((rule, w.get("format")))
    assert gpu_jobs == {("train", None), ("select_best", None), ("evaluate", "hf"), ("evaluate", "torchao")}

    cfg["resources"] = {"gpu": False}
    write_config(work, cfg)
    assert not any("gpu" in res for _, _, res in dry_run_resources(work))

"""The pure parts of the ``make bench`` harness (bench/perf.py): benchmark TSVs, job logs, process
accounting, the 10 x 30 DAG config and the summary table. No timing is asserted.

pytest puts this directory on ``sys.path`` (it is not a package), so the harness imports as ``perf``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from qatforge.spec import config as qcfg

import perf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

TINY_SNAKEFILE = textwrap.dedent("""
    rule all:
        input: expand("out/{x}.txt", x=["a", "b"]), "out/c.txt"
    rule make:
        output: "out/{x}.txt"
        benchmark: "benchmarks/make/{x}.tsv"
        # Snakemake samples RSS every 0.5 s (every 30 s after the first 30 s): hold the memory.
        shell: "python3 -c 'import time; b = bytearray(80_000_000); b[::4096] = b\\"x\\" * len(b[::4096]); time.sleep(1.2)' && echo {wildcards.x} > {output}"
    rule top:
        output: "out/c.txt"
        benchmark: "benchmarks/top.tsv"
        shell: "echo c > {output}"
""")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real Snakemake run of a 4-job workflow with ``benchmark:`` files, accounted by ``measure``."""
    work = tmp_path_factory.mktemp("smk")
    (work / "Snakefile").write_text(TINY_SNAKEFILE)
    res = perf.measure(perf.smk("--cores", "2"), cwd=work, log_file=work / "run.log")
    return work, res


def test_benchmark_tsvs_give_per_job_times(tiny_run):
    work, _ = tiny_run
    rows = perf.read_benchmark(work / "benchmarks" / "make" / "a.tsv")
    assert len(rows) == 1 and rows[0]["s"] >= 0 and isinstance(rows[0]["h:m:s"], str)
    jobs = perf.job_times(work / "benchmarks")
    assert sorted(j["job"] for j in jobs) == ["make/a", "make/b", "top"]
    assert {j["group"] for j in jobs} == {"make", "top"}
    assert [j["s"] for j in jobs] == sorted((j["s"] for j in jobs), reverse=True)
    make_a = next(j for j in jobs if j["job"] == "make/a")
    assert make_a["max_rss_mb"] > 60  # the 80 MB bytearray, touched page by page
    totals = perf.group_totals(jobs)
    assert set(totals) == {"make", "top"}
    assert totals["make"] == pytest.approx(sum(j["s"] for j in jobs if j["group"] == "make"), abs=0.01)


def test_read_benchmark_rejects_other_files(tmp_path):
    bad = tmp_path / "x.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="x.tsv"):
        perf.read_benchmark(bad)


def test_jobs_and_job_count_from_a_real_log(tiny_run):
    work, res = tiny_run
    log = Path(res["log"]).read_text()
    jobs = perf.jobs_from_log(log)
    assert sorted(jobs) == ["all", "make[x=a]", "make[x=b]", "top"]
    assert perf.job_count(log) == 4
    # A second run has nothing to do: no jobs, no job table.
    again = perf.measure(perf.smk("--cores", "1"), cwd=work, log_file=work / "noop.log")
    assert perf.jobs_from_log(Path(again["log"]).read_text()) == []
    assert perf.job_count(Path(again["log"]).read_text()) is None


def test_measure_reports_the_peak_rss_of_the_process_tree(tmp_path):
    # Linux counts a forked child's pre-exec RSS (the parent's image) in ru_maxrss, so measure from
    # a light parent, as `make bench` does (the harness imports only the standard library).
    # The measured process's child allocates ~200 MB; wait4 accounts the whole tree.
    script = f"""
import json, sys
sys.path.insert(0, {str(HERE)!r})
import perf
code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'b = bytearray(200 * 2**20); b[::4096] = b\\"x\\" * len(b[::4096])'], check=True)"
big = perf.measure([sys.executable, "-c", code], log_file={str(tmp_path / "m.log")!r})
small = perf.measure([sys.executable, "-c", "pass"])
print(json.dumps([big, small]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    big, small = json.loads(out.strip().splitlines()[-1])
    assert big["returncode"] == 0 and big["max_rss_mb"] >= 200 and big["wall_s"] > 0
    assert small["max_rss_mb"] < 100


def test_measure_names_the_failing_command_and_its_log(tmp_path):
    with pytest.raises(perf.PerfError, match="(?s)exited with 3.*boom"):
        perf.measure([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], log_file=tmp_path / "f.log")
    assert perf.measure([sys.executable, "-c", "raise SystemExit(2)"], check=False)["returncode"] == 2


def test_dag_config_is_a_valid_10_by_30_config():
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg = perf.dag_config(base, 10, 30)
    assert cfg["model"] == base["model"] and base["runs"] != cfg["runs"]  # the input is not modified
    validate(cfg, str(ROOT / "config" / "schema.yaml"))
    qcfg.check(cfg, ROOT)  # names, schemes, quant types, imatrix needs, default quant
    assert len(cfg["runs"]) == 10 and len(cfg["gguf"]["quants"]) == 30
    assert qcfg.qat_runs(cfg) and qcfg.baseline_runs(cfg)
    assert cfg["gguf"]["default_quant"] in cfg["gguf"]["quants"]
    arts = qcfg.artifacts(cfg)
    assert len(arts) == len(set(arts)) > 10 * 30
    with pytest.raises(ValueError, match="n_quants"):
        perf.dag_config(base, 10, 1000)


def test_dag_config_dry_runs_with_the_real_snakefile(tmp_path):
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    proj = perf.copy_project(ROOT, tmp_path / "p", config=perf.dag_config(base, 3, 8))
    res = perf.measure(perf.smk(perf.REPORT, "-n", "--cores", "1"), cwd=proj, log_file=tmp_path / "dry.log")
    log = Path(res["log"]).read_text()
    jobs = perf.jobs_from_log(log)
    assert perf.job_count(log) == len(jobs)
    assert sum(j.startswith("gguf_quantize[") for j in jobs) == 3 * 8
    assert not any((proj / "results").iterdir())  # a dry-run builds nothing


def test_growth_analysis_slopes_and_rss_ratios():
    rows = []
    for size, params, s, rss in (("4M", 4e6, 1.0, 500.0), ("50M", 5e7, 10.0, 700.0), ("500M", 5e8, 100.0, 2500.0)):
        bf16 = params * 2 / perf.MiB
        rows.append({"size": size, "params": params, "bf16_mb": bf16, "stage": "merge", "wall_s": s + 2,
                     "call_s": s, "max_rss_mb": rss, "rss_ratio": rss / bf16})
    rows.append({"size": "500M", "params": 5e8, "bf16_mb": 953.7, "stage": "onnx", "error": "boom"})
    a = perf.growth_analysis(rows)
    assert set(a) == {"merge"}  # a stage with only failed rows has no analysis
    assert a["merge"]["slope"] == pytest.approx(1.0) and a["merge"]["slope_of"] == "call_s"
    assert a["merge"]["slope_between"] == ["50M", "500M"]
    assert a["merge"]["rss_ratio"] == pytest.approx(2500 / (5e8 * 2 / perf.MiB))
    assert a["merge"]["marginal_rss_ratio"] == pytest.approx(2000 / ((5e8 - 4e6) * 2 / perf.MiB), rel=1e-3)
    assert perf.loglog_slope(1, 1, 10, 100) == pytest.approx(2.0)
    assert perf.loglog_slope(1, 0, 10, 1) is None


def _figures():
    return {
        "cold": {"wall_s": 800.0, "cpu_s": 1400.0, "n_jobs": 60, "max_rss_mb": 1500.0, "cores": "all",
                 "group_totals": {"train": 400.0, "build_base": 200.0, "evaluate": 100.0}},
        "parallel": {"cores": "2", "speedup": 1.2, "cores_1": {"wall_s": 300.0, "n_jobs": 40},
                     "cores_n": {"wall_s": 250.0, "n_jobs": 40}},
        "incremental": {"quant": "Q8_0", "pure": True, "wall_s": 30.0, "fraction_of_cold": 30 / 800,
                        "jobs": ["gguf_quantize[run=baseline, quant=Q8_0]", "report"]},
        "noop": {"median_s": 2.5, "runs": [{}, {}, {}]},
        "dag": {"median_s": 6.0, "n_runs": 10, "n_quants": 30, "n_jobs": 747, "runs": [{}, {}, {}]},
        "growth": {"sizes": ["4M", "500M"], "rows": [
            {"size": "500M", "params": 5e8, "bf16_mb": 953.7, "stage": "merge", "wall_s": 60.0, "call_s": 55.0,
             "max_rss_mb": 2000.0, "rss_ratio": 2.1},
            {"size": "500M", "params": 5e8, "bf16_mb": 953.7, "stage": "onnx", "error": "PerfError: x | y"}],
            "analysis": {"merge": {"largest": "500M", "rss_ratio": 2.1, "marginal_rss_ratio": 1.6,
                                   "slope": 0.9, "slope_between": ["4M", "500M"]}}},
        "qat": {"scheme": "int2-w128", "steps": 120, "n_eval": 32, "recovered_nll": 0.4, "recovered_kld": 0.5,
                "start_ptq": {"nll_float": 0.21, "nll_quant": 0.8, "kld": 0.5},
                "ptq": {"nll_float": 0.2, "nll_quant": 0.7, "kld": 0.4},
                "qat": {"nll_float": 0.25, "nll_quant": 0.5, "kld": 0.2}},
    }


def test_summary_table_has_one_row_per_figure_and_flags_missed_targets():
    table = perf.summary_table(_figures())
    lines = table.strip().splitlines()
    assert lines[0] == "| Figure | Measured | Target | Met |" and lines[1] == "|---|---|---|---|"
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])
    body = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    speed = next(v for k, v in body.items() if k.startswith("exports + evaluation"))
    assert "1.20x" in speed and speed.endswith("| **no** |")  # 1.2 < 1.4
    assert next(v for k, v in body.items() if k.startswith("no-op")).endswith("| yes |")
    assert next(v for k, v in body.items() if k.startswith("`snakemake -n`")).endswith("| **no** |")
    assert "3.8 % of cold" in next(v for k, v in body.items() if k.startswith("incremental"))
    assert "x \\| y" in table  # cell pipes are escaped
    assert "NLL 40 %, KLD 50 %" in table
    # Sections that are absent (quick mode) simply have no rows; errors get one.
    quick = perf.summary_table({"dag": _figures()["dag"], "cold": {"error": "boom\nmore"}})
    assert len(quick.strip().splitlines()) == 4 and "failed: boom |" in quick


def _hold_memory(mb: int) -> bytearray:
    import time

    b = bytearray(mb * 2**20)
    b[::4096] = b"x" * len(b[::4096])
    time.sleep(0.4)  # several sampling periods while the memory is held
    return b


def test_peak_sampler_names_the_call_holding_the_memory():
    with perf.PeakSampler(interval=0.02) as peak:
        held = _hold_memory(300)
    del held
    assert peak.peak_mb >= 300
    assert any(f.endswith(" _hold_memory") for f in peak.stack)


def test_peak_call_prefers_the_innermost_qatforge_frame():
    stack = ["runpy.py:1 _run", "bench/perf.py:10 run_stage", "qatforge/merge.py:165 merge",
             "transformers/modeling_utils.py:5 load"]
    assert perf.peak_call(stack) == "qatforge/merge.py:165 merge → transformers/modeling_utils.py:5 load"
    assert perf.peak_call(["a.py:1 f"]) == "a.py:1 f" and perf.peak_call([]) is None


def test_rss_target_is_judged_only_when_weights_dominate():
    def fig(bf16_mb):
        return {"growth": {"sizes": ["4M", "50M"], "rows": [], "analysis": {"onnx": {
            "largest": "50M", "bf16_mb": bf16_mb, "rss_ratio": 9.0, "marginal_rss_ratio": None, "slope": None,
            "peak_at": "qatforge/export/onnx.py:140 export"}}}}
    small, big = perf.summary_table(fig(98.0)), perf.summary_table(fig(963.0))
    assert "n/a: library footprint dominates" in small
    assert big.rstrip().endswith("| **no** |") and "peak in qatforge/export/onnx.py:140 export" in big


TOY_SNAKEFILE = textwrap.dedent("""
    # The pipeline's shape in miniature: merged -> exports (+ quants from config) -> report.
    configfile: "config/config.yaml"
    QUANTS = list(config["gguf"]["quants"])
    rule report:
        input: expand("results/runs/base/gguf/{q}.txt", q=QUANTS), "results/runs/base/onnx.txt"
        output: "results/report.csv"
        shell: "cat {input} > {output}"
    rule merge:
        output: "results/runs/{run}/merged/w.txt"
        benchmark: "benchmarks/merge/{run}.tsv"
        shell: "echo w > {output}"
    rule gguf_convert:
        input: "results/runs/{run}/merged/w.txt"
        output: "results/runs/{run}/gguf/BF16.txt"
        benchmark: "benchmarks/gguf_convert/{run}.tsv"
        shell: "cp {input} {output}"
    rule gguf_quantize:
        input: "results/runs/{run}/gguf/BF16.txt"
        output: "results/runs/{run}/gguf/{quant,Q[^/]+}.txt"
        params: spec=lambda w: config["gguf"]["quants"][w.quant]
        benchmark: "benchmarks/gguf_quantize/{run}/{quant}.tsv"
        shell: "echo '{params.spec}' > {output}"
    rule onnx_export:
        input: "results/runs/{run}/merged/w.txt"
        output: "results/runs/{run}/onnx.txt"
        benchmark: "benchmarks/onnx_export/{run}.tsv"
        shell: "cp {input} {output}"
""")


def test_pipeline_sections_on_a_toy_project(tmp_path):
    toy = tmp_path / "toy"
    (toy / "config").mkdir(parents=True)
    (toy / "Snakefile").write_text(TOY_SNAKEFILE)
    (toy / "config" / "config.yaml").write_text(yaml.safe_dump({"gguf": {"quants": {"Q8_0": {"type": "Q8_0"},
                                                                                    "Q4_0": {"type": "Q4_0"}}}}))
    out = tmp_path / "perf"
    rc = perf.main(["--out", str(out), "--project", str(toy), "--only", "cold,parallel,incremental,noop",
                    "--cores", "2", "--repeats", "1", "--keep-work"])
    assert rc == 0
    cold = yaml.safe_load((out / "cold.json").read_text())
    assert cold["n_jobs"] == 6 and cold["returncode"] == 0 and cold["cpu_s"] > 0
    assert sorted(j["job"] for j in cold["benchmarked_jobs"]) == [
        "gguf_convert/base", "gguf_quantize/base/Q4_0", "gguf_quantize/base/Q8_0", "merge/base", "onnx_export/base"]
    par = yaml.safe_load((out / "parallel.json").read_text())
    assert "--forcerun gguf_convert onnx_export" in par["what"]  # only rules the workflow has
    for key in ("cores_1", "cores_n"):  # everything downstream of merged, not merge itself
        assert sorted(par[key]["jobs"]) == ["gguf_convert[run=base]", "gguf_quantize[run=base, quant=Q4_0]",
                                            "gguf_quantize[run=base, quant=Q8_0]", "onnx_export[run=base]", "report"]
    assert par["speedup"] > 0
    inc = yaml.safe_load((out / "incremental.json").read_text())
    assert inc["quant"] == "Q8_0" and inc["jobs"] == ["gguf_quantize[run=base, quant=Q8_0]", "report"]
    assert 0 < inc["fraction_of_cold"] == pytest.approx(inc["wall_s"] / cold["wall_s"], rel=1e-3)
    edited = yaml.safe_load((out / "work" / "project" / "config" / "config.yaml").read_text())
    assert edited["gguf"]["quants"]["Q8_0"] == {"type": "Q8_0", "pure": True} and inc["pure"] is True
    noop = yaml.safe_load((out / "noop.json").read_text())  # measured before the edit
    assert len(noop["runs"]) == 1 and noop["runs"][0]["n_jobs"] == 0
    summary = (out / "summary.md").read_text()
    assert summary.count("\n| ") == 1 + 5  # header + cold (2 rows), parallel, incremental, no-op
    assert "`pure: true` on quant Q8_0" in summary
    # Sections needing the built project fail clearly without it, and the run reports failure.
    assert perf.main(["--out", str(tmp_path / "p2"), "--project", str(toy), "--only", "noop",
                      "--work", str(tmp_path / "w2")]) == 1
    assert "is not built" in (tmp_path / "p2" / "noop.json").read_text()


def test_unsloth_twin_differs_only_in_the_mode_and_scales():
    cfg = {"runs": {"q": {"qat_scheme": "int8-int4",
                          "qat": {"mode": "merged", "distill_from": "baseline", "block_scales": "learned"},
                          "train": {"lr": 1e-3}, "formats": "matched"}}}
    name, spec = perf.unsloth_twin(cfg, "q")
    assert name == "q-unsloth"
    assert spec["qat"] == {"mode": "unsloth", "distill_from": "baseline", "block_scales": "format"}
    assert {k: v for k, v in spec.items() if k != "qat"} == {k: v for k, v in cfg["runs"]["q"].items() if k != "qat"}
    assert cfg["runs"]["q"]["qat"]["mode"] == "merged"  # the original is untouched


def _validated(cfg: dict) -> dict:
    validate(cfg, str(ROOT / "config" / "schema.yaml"))
    return cfg


def test_scale_config_keeps_every_rule_kind_and_bounds_follow_the_models_held():
    cfg = _validated(perf.scale_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()), Path("/b")))
    assert cfg["model"]["base"] == "/b" and set(cfg["runs"]) == {"baseline", "qat-int8-int4"}
    assert all(qcfg.train_settings(cfg, r)["max_steps"] == 2 for r in cfg["runs"])
    assert "IQ4_XS" in cfg["gguf"]["quants"] and set(cfg["onnx"]["variants"]) == {"fp32", "int4"}
    p = 500_000_000
    one, _ = perf.scale_bound_mb("train/baseline", p, ["qat-int8-int4"])
    two, how = perf.scale_bound_mb("select_best/qat-int8-int4", p, ["qat-int8-int4"])
    export, _ = perf.scale_bound_mb("merge/qat-int8-int4", p, ["qat-int8-int4"])
    assert (one, two, export) == pytest.approx((2 * p * 4 / 2**20 + 1024, 4 * p * 4 / 2**20 + 1024, 2.5 * p * 2 / 2**20 + 1024))
    assert "2 models" in how


def test_scale_slopes_refit_the_resource_table_to_the_measured_jobs():
    """Each measured job becomes its rule kind's run; the refitted table then asks for the measured
    memory (times the headroom) at the measured load."""
    from qatforge.spec import resources as R

    cfg = _validated(perf.scale_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()), Path("/b")))
    jobs = [{"job": "train/baseline", "s": 100.0, "max_rss_mb": 5000.0},
            {"job": "train/qat-int8-int4", "s": 120.0, "max_rss_mb": 9000.0},
            {"job": "evaluate/baseline/hf-merged", "s": 60.0, "max_rss_mb": 3000.0},
            {"job": "evaluate/baseline/gguf-Q4_0", "s": 20.0, "max_rss_mb": 1500.0},
            {"job": "onnx_export/baseline/int4", "s": 200.0, "max_rss_mb": 2500.0}]
    params, vocab = 596_049_920, 151_936
    table = perf.scale_slopes(R.load_table(), cfg, jobs, params, vocab, "test")
    runs = table["measured"]["runs"]
    assert {k: runs[k]["mem_mib"] for k in ("train", "train_qat", "evaluate_hf", "evaluate_gguf", "onnx_export_quantized")} \
        == {"train": 5000.0, "train_qat": 9000.0, "evaluate_hf": 3000.0, "evaluate_gguf": 1500.0, "onnx_export_quantized": 2500.0}
    size = R.ModelSize(params, vocab, "test")
    train = R.request("train", cfg, size, table, {"run": "qat-int8-int4"})
    assert train.mem_mb == pytest.approx(table["mem_headroom"] * 9000.0, abs=100)
    # evaluation keeps its logits term (one conversation of data.max_tokens): never below the measurement
    ev = R.request("evaluate", cfg, size, table, {"run": "baseline", "format": "hf", "variant": "merged"})
    assert ev.mem_mb >= table["mem_headroom"] * 3000.0


def test_summary_judges_qat_recovery_and_the_design_difference():
    def row(run, mode, metric, rec, lo, hi, twin="", d=float("nan"), dlo=float("nan"), dhi=float("nan")):
        return {"qat_run": run, "qat_mode": mode, "format": "torchao", "variant": "int8-int4", "metric": metric,
                "ptq_loss": 0.05, "qat_loss": 0.05 * (1 - rec), "recovery": rec, "recovery_ci_low": lo,
                "recovery_ci_high": hi, "twin_run": twin, "recovery_minus_twin": d,
                "recovery_minus_twin_ci_low": dlo, "recovery_minus_twin_ci_high": dhi}
    rows = [row("q", "merged", "nll", 0.88, 0.62, 1.1, "q-u", 0.2, 0.05, 0.35),
            row("q", "merged", "kld", 0.80, 0.7, 0.9, "q-u", 0.1, -0.02, 0.2),
            row("q-u", "unsloth", "kld", 0.70, 0.6, 0.8)]
    body = perf.summary_table({"qat_modes": {"qat_vs_ptq": rows}}).splitlines()[2:]
    nll, design_nll, kld, design_kld, unsloth = body
    assert "recovery 88 % [62, 110]" in nll and nll.endswith("| ≥ 85%, CI low > 50% | yes |")
    assert kld.endswith("| **no** |")  # 80 % < 85 %
    assert "+20 pt [+5, +35]" in design_nll and design_nll.endswith("| interval excludes 0 | yes |")
    assert design_kld.endswith("| **no** |")  # [-2, +20] reaches 0
    assert unsloth.endswith("|  |  |")  # the twin itself is not judged against the target


def test_step_cost_arms_pair_each_distilled_run_with_plain_lora_at_its_rank():
    cfg = _validated(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    arms, against = perf.step_cost_arms(cfg)
    distilled = [r for r in qcfg.qat_runs(cfg) if qcfg.train_settings(cfg, r).get("distill")]
    assert distilled and set(against) == set(distilled)
    for run, plain in against.items():
        assert arms[run] == qcfg.train_settings(cfg, run)  # the run as the pipeline trains it
        assert arms[plain]["lora"]["r"] == arms[run]["lora"]["r"] == int(plain.removeprefix("lora-r").split("-")[0])
        assert arms[plain]["lora"]["alpha"] == arms[run]["lora"]["alpha"]
        assert arms[plain]["sampling"] == arms[run].get("sampling", "random")  # the same padding per step
    base = qcfg.train_settings(cfg, qcfg.baseline_runs(cfg)[0])
    mine = ("lora", "sampling")
    for plain in set(against.values()):  # the baseline's own settings, only the rank and row order changed
        assert {k: v for k, v in arms[plain].items() if k not in mine} == {k: v for k, v in base.items() if k not in mine}
        assert not arms[plain].get("qat_scheme") and not arms[plain].get("distill")


def test_step_cost_times_every_arm_in_interleaved_rounds(tmp_path):
    """A real run on the shipped tiny base: 2 steps x 2 rounds of a plain LoRA arm and a distilled
    merge-exact QAT arm (the shipped base as their teacher); ratios are of the medians."""
    import statistics as stats

    from qatforge import data

    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join((ROOT / "data/chat.jsonl").read_text().splitlines()[:120]) + "\n")
    data.prepare(src, *(tmp_path / f"{s}.parquet" for s in data.SPLITS), dev_fraction=0.1, test_fraction=0.1,
                 max_tokens=256)
    cfg = _validated(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    arms, against = perf.step_cost_arms(cfg)
    plain = against["qat-int8-int4"]
    pick = {plain: arms[plain], "qat-int8-int4": arms["qat-int8-int4"]}
    for spec in pick.values():
        spec["batch_size"] = 4
    res = perf.step_cost(ROOT / "assets/builtin/tiny-qwen3", tmp_path / "train.parquet", tmp_path / "dev.parquet",
                         tmp_path / "work", pick, reference=plain, steps=2, rounds=2, threads=1, max_len=256)
    assert {k: len(v) for k, v in res["seconds_per_step"].items()} == {plain: 2, "qat-int8-int4": 2}
    assert all(t > 0 for v in res["seconds_per_step"].values() for t in v)
    for name, v in res["seconds_per_step"].items():
        assert res["median_s"][name] == stats.median(v)
        assert res["ratio"][name] == round(stats.median(v) / stats.median(res["seconds_per_step"][plain]), 3)
    assert res["ratio"][plain] == 1.0
    assert not any((tmp_path / "work").iterdir())  # each arm's checkpoints removed once timed
    table = perf.summary_table({"step_cost": {"groups": {plain: res}}})
    assert f"qat-int8-int4 / plain LoRA at its rank ({plain})" in table and "≤ 1.6x" in table

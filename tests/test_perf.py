"""The pure parts of the ``make bench`` harness (qatforge.perf): benchmark TSVs, job logs, process
accounting, the 10 x 30 DAG config and the summary table. No timing is asserted."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from conftest import ROOT
from qatforge import config as qcfg
from qatforge import perf

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
    # The child of the measured process allocates ~200 MB; wait4 accounts the whole tree.
    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'b = bytearray(200 * 2**20); b[::4096] = b\"x\" * len(b[::4096])'], check=True)"
    res = perf.measure([sys.executable, "-c", code], log_file=tmp_path / "m.log")
    assert res["returncode"] == 0 and res["max_rss_mb"] >= 200 and res["wall_s"] > 0
    small = perf.measure([sys.executable, "-c", "pass"])
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
        "incremental": {"quant": "Q8_0", "wall_s": 30.0, "fraction_of_cold": 30 / 800,
                        "jobs": ["gguf_quantize[run=baseline, quant=Q8_0]", "report"]},
        "noop": {"median_s": 2.5, "runs": [{}, {}, {}]},
        "dag": {"median_s": 6.0, "n_runs": 10, "n_quants": 30, "n_jobs": 747, "runs": [{}, {}, {}]},
        "growth": {"sizes": ["4M", "500M"], "rows": [
            {"size": "500M", "params": 5e8, "bf16_mb": 953.7, "stage": "merge", "wall_s": 60.0, "call_s": 55.0,
             "max_rss_mb": 2000.0, "rss_ratio": 2.1},
            {"size": "500M", "params": 5e8, "bf16_mb": 953.7, "stage": "onnx", "error": "PerfError: x | y"}],
            "analysis": {"merge": {"largest": "500M", "rss_ratio": 2.1, "marginal_rss_ratio": 1.6,
                                   "slope": 0.9, "slope_between": ["4M", "500M"]}}},
        "qat": {"scheme": "int2-w128", "steps": 120, "recovered_nll": 0.4, "recovered_kld": 0.5,
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

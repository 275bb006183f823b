"""Integration: the real pipeline on the tiny default (smoke settings), built once per session."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from conftest import read_config, snakemake
from qatforge.io import sha256_path
from qatforge.spec import config as qcfg
from qatforge.spec.columns import LOSS_COLUMNS, REPORT_COLUMNS
from qatforge.spec.formats import BASE_ARTIFACT
from qatforge.verify import verify

COLUMNS = list(REPORT_COLUMNS)
IS_BASE = (pl.col("format") == BASE_ARTIFACT[0]) & (pl.col("variant") == BASE_ARTIFACT[1])


@pytest.fixture(scope="module")
def report(pipeline_build):
    return pl.read_csv(pipeline_build / "results" / "report.csv")


def test_report_has_one_complete_row_per_artifact(pipeline_build, report):
    cfg = read_config(pipeline_build)
    from snakemake.utils import validate

    validate(cfg, str(pipeline_build / "config" / "schema.yaml"))
    expected = {(r, f, v) for r, f, v in qcfg.artifacts(cfg)}
    assert report.columns[: len(COLUMNS)] == COLUMNS
    got = {(r["run"], r["format"], r["variant"]) for r in report.iter_rows(named=True)}
    assert got == expected
    must_fill = [c for c in COLUMNS if c != "qat_scheme"]
    nulls = {c: report[c].null_count() for c in must_fill if report[c].null_count()}
    assert nulls == {"parity_pass": 1}, f"empty cells: {nulls}"  # the base row's verdict only
    assert report.filter(IS_BASE)["parity_pass"].null_count() == 1


def test_report_has_one_base_row_without_parity_verdict(pipeline_build, report):
    cfg = read_config(pipeline_build)
    base = report.filter(IS_BASE)
    assert base.height == 1, base
    row = base.row(0, named=True)
    assert row["run"] == qcfg.baseline_runs(cfg)[0] and row["qat_scheme"] == "none"
    assert row["parity_pass"] is None and row["failures"] == "none"
    assert 0 <= row["accuracy"] <= 1 and row["nll"] > 0 and row["size_mb"] > 0 and row["gen_tps"] > 0
    merged = report.filter((pl.col("run") == row["run"]) & (pl.col("variant") == "merged")).row(0, named=True)
    assert row["kld_mean"] > merged["kld_mean"]  # the base is not the merged model
    assert row["acc_loss"] == pytest.approx(merged["accuracy"] - row["accuracy"])  # the fine-tuning gain
    ev = json.loads((pipeline_build / "results/eval" / row["run"] / "hf/base.json").read_text())
    assert ev["artifact"] == "results/base" and ev["parity"].startswith("not applicable")
    assert ev["parity_pass"] is None and ev["failures"] == []
    assert (pipeline_build / "results" / "parity.ok").is_file()  # the gate ignores it


def test_report_figures_are_in_range(report, pipeline_build):
    assert report["accuracy"].is_between(0, 1).all()
    assert (report["nll"] > 0).all() and (report["ppl"] >= 1).all()
    assert ((report["ppl"] - report["nll"].exp()).abs() < 1e-3 * report["ppl"]).all()
    for col in ("size_mb", "load_s", "prompt_tps", "gen_tps", "peak_rss_mb"):
        assert (report[col] > 0).all(), col
    assert (report["kld_mean"] >= 0).all() and (report["kld_max"] >= report["kld_mean"]).all()
    assert report["top1_agree"].is_between(0, 1).all() and report["gen_match"].is_between(0, 1).all()
    assert report["sha256"].str.len_chars().eq(64).all()
    deployed = report.filter(~IS_BASE)
    src = deployed["source_checkpoint"]
    assert (src.str.starts_with("checkpoint-") | (src == "step-0")).all(), src
    for run, source in set(zip(deployed["run"], src)):  # step-0: a distilled run that kept PTQ of its teacher
        best = json.loads((pipeline_build / "results/runs" / run / "best.json").read_text())
        assert source == (best["checkpoint"] or "step-0"), (run, source, best["checkpoint"])
    assert tuple(report.columns[-len(LOSS_COLUMNS):]) == LOSS_COLUMNS
    merged = report.filter(pl.col("variant") == "merged")
    assert (merged["acc_loss"] == 0).all() and (merged["nll_loss"] == 0).all()
    assert (merged["kld_mean"] < 1e-6).all() and (merged["top1_agree"] == 1).all()
    assert merged["token_parity"].all()
    gguf = report.filter(pl.col("format") == "gguf")
    assert gguf["token_parity"].all(), "llama.cpp must tokenize the test prompts like HF"
    q8 = gguf.filter(pl.col("variant") == "Q8_0")["kld_mean"].max()
    q4 = gguf.filter(pl.col("variant") == "Q4_0")["kld_mean"].min()
    assert q8 < q4, "8-bit quantization must stay closer to the reference than 4-bit"


def test_dev_selects_and_test_reports_with_no_test_prompt_in_train_or_dev(pipeline_build):
    from qatforge.data import read_conversations

    cfg = read_config(pipeline_build)
    data = pipeline_build / "results" / "data"
    summary = json.loads((data / "summary.json").read_text())
    seen = {m["content"] for s in ("train", "dev") for c in read_conversations(data / f"{s}.parquet")
            for m in c if m["role"] == "user"}
    for run in qcfg.runs(cfg):
        ref = json.loads((pipeline_build / "results/runs" / run / "reference/reference.json").read_text())
        assert ref["test_sha256"] == sha256_path(data / "test.parquet")
        assert len(ref["prompts"]) == cfg["eval"]["n_prompts"]
        assert not {p["messages"][-1]["content"] for p in ref["prompts"]} & seen
        best = json.loads((pipeline_build / "results/runs" / run / "best.json").read_text())
        assert best["dev_parquet"] == "results/data/dev.parquet"
        assert best["n_prompts"] == min(cfg["eval"]["n_prompts"], summary["dev_rows"])
        assert best["n_eval_conversations"] == min(cfg["eval"]["n_nll"], summary["dev_rows"])


def test_report_md_has_qat_vs_ptq_and_recommendation(pipeline_build):
    md = (pipeline_build / "results" / "report.md").read_text()
    assert "QAT vs PTQ" in md and "Recommendation" in md
    assert "## Base vs fine-tuned" in md and "## Loss against the merged model" in md
    gains = md.split("## Base vs fine-tuned")[1].split("## Loss against")[0]
    assert "| baseline/hf/merged |" in gains and "| qat-int8-int4/hf/merged |" in gains
    assert "results/qat_vs_ptq.csv" not in md and "qat_vs_ptq.csv" in md
    assert "int8-int4" in md
    ship = md.split("## Which file to ship")[1].split("## Recommendation")[0]
    for quantizer in ("torchao int8-int4", "gguf Q4_0", "onnx int4"):
        assert f"| {quantizer} | " in ship and ("| **QAT** |" in ship or "| **PTQ** |" in ship)


def test_every_gguf_has_export_record_without_fallbacks_for_q4_k_m(pipeline_build):
    rec = json.loads(next((pipeline_build / "results/runs/baseline/gguf").glob("*-Q4_K_M.gguf.json")).read_text())
    prov = rec["provenance"]
    assert rec["sha256"] and prov["tensor_types"]
    assert not prov.get("fallbacks"), prov.get("fallbacks")
    modelfile = (pipeline_build / "results/runs/baseline/gguf/Modelfile").read_text()
    assert "\nFROM ./TinyQwen3-Q4_K_M.gguf\n" in modelfile and "PARAMETER stop" in modelfile


def test_qat_runs_distill_from_the_baseline_and_ship_only_their_quantizer(pipeline_build):
    res = pipeline_build / "results"
    for run in ("qat-int8-int4", "qat-gguf-q4_0", "qat-onnx-int4", "qat-int8-int4-unsloth"):
        merged = json.loads((res / "runs" / run / "merged" / "export.json").read_text())
        assert merged["provenance"]["merge"]["base_dir"] == "results/runs/baseline/merged"  # the teacher is the base
        best = json.loads((res / "runs" / run / "best.json").read_text())
        assert best["metric"] == "teacher_kld" and best["candidates"][0]["step"] == 0
        assert best["best"]["teacher_kld"] == min(c["teacher_kld"] for c in best["candidates"])
    assert not (res / "runs/qat-int8-int4/gguf").exists() and not (res / "runs/qat-gguf-q4_0/torchao").exists()
    # the ONNX-targeted run ships only its int4 folder, trained under the MatMulNBits it holds
    assert [p.name for p in (res / "runs/qat-onnx-int4/onnx").iterdir() if p.is_dir()] == ["int4"]
    assert not (res / "runs/qat-onnx-int4/torchao").exists() and not (res / "runs/qat-onnx-int4/gguf").exists()
    log = (pipeline_build / "logs/train/qat-onnx-int4.log").read_text()
    assert "QAT onnx-int4 (merged): 28 LoRA linears" in log and "lm_head int4 block 32" in log
    # the GGUF-targeted run's own file: every tensor is stored in the type it trained under
    rec = json.loads((res / "runs/qat-gguf-q4_0/gguf/TinyQwen3-Q4_0.gguf.json").read_text())
    qt = rec["provenance"]["qat_tensor_types"]
    # llama.cpp's QAT mix: the projections at Q4_0, token_embd and the (untied) output at Q8_0
    assert qt["scheme"] == "gguf-q4_0" and len(qt["trained"]) == 2 + 7 * 4
    assert qt["trained"]["token_embd.weight"] == qt["trained"]["output.weight"] == "Q8_0"
    assert {t for n, t in qt["trained"].items() if n.startswith("blk.")} == {"Q4_0"}
    assert "\nFROM ./TinyQwen3-Q4_0.gguf\n" in (res / "runs/qat-gguf-q4_0/gguf/Modelfile").read_text()
    df = pl.read_csv(res / "qat_vs_ptq.csv")
    assert set(zip(df["qat_run"], df["format"], df["variant"])) == {
        ("qat-int8-int4", "torchao", "int8-int4"), ("qat-gguf-q4_0", "gguf", "Q4_0"), ("qat-onnx-int4", "onnx", "int4"),
        ("qat-int8-int4-unsloth", "torchao", "int8-int4")}
    assert set(df["metric"]) == {"accuracy", "nll", "kld"}
    assert dict(zip(df["qat_run"], df["qat_mode"]))["qat-int8-int4-unsloth"] == "unsloth"
    # the merge-exact run's recoveries minus its Unsloth-mode twin's, where both are defined
    twin_of = dict(zip(df["qat_run"], df["twin_run"].fill_null("")))
    assert twin_of == {"qat-int8-int4": "qat-int8-int4-unsloth", "qat-gguf-q4_0": "", "qat-onnx-int4": "",
                       "qat-int8-int4-unsloth": ""}
    rec = {(r["qat_run"], r["metric"]): r for r in df.to_dicts()}
    for metric in ("accuracy", "nll", "kld"):
        a, b = rec[("qat-int8-int4", metric)], rec[("qat-int8-int4-unsloth", metric)]
        if a["recovery"] is not None and not math.isnan(a["recovery"]):
            assert a["recovery_minus_twin"] == pytest.approx(a["recovery"] - b["recovery"])
    ev = json.loads((res / "eval/qat-gguf-q4_0/gguf/Q4_0.json").read_text())
    assert ev["baseline_run"] == "baseline" and ev["vs_baseline_kld_mean"] > 0


def test_hashes_verify_and_tampering_is_reported(built_workdir):
    ok, bad = verify(built_workdir / "results")
    cfg = read_config(built_workdir)

    def where(run, fmt, variant):  # the artifact layout the README documents
        if (fmt, variant) == BASE_ARTIFACT:
            return "results/base"
        if fmt == "hf":
            return f"results/runs/{run}/merged"
        if fmt == "torchao":
            return f"results/runs/{run}/" + ("qat_converted" if qcfg.qat_scheme(cfg, run) else f"torchao/{variant}")
        if fmt == "gguf":
            return f"results/runs/{run}/gguf/{qcfg.model_name(cfg)}-{variant}.gguf"
        return f"results/runs/{run}/onnx/{variant}"

    expected = {where(*a) for a in qcfg.artifacts(cfg)}
    verified = {os.path.relpath(p, built_workdir) for p in ok}
    assert expected <= verified, sorted(expected - verified)  # every evaluated artifact's hash checks
    assert bad == []
    q8 = next((built_workdir / "results/runs/baseline/gguf").glob("*-Q8_0.gguf"))
    with open(q8, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    ok, bad = verify(built_workdir / "results")
    assert len(bad) == 1 and "Q8_0" in bad[0]


def test_snakemake_html_report(built_workdir):
    snakemake(built_workdir, "--report", "results/report.html")
    html = (built_workdir / "results" / "report.html").read_text(errors="replace")
    assert "report.csv" in html and "quality_vs_size.png" in html and "tokens_per_s.png" in html


def test_rebuild_from_same_checkpoint_inputs_is_byte_identical(built_workdir):
    """Retrain one run from the same base and config: merged, GGUF and ONNX bytes are identical."""
    run = "baseline"
    res = built_workdir / "results" / "runs" / run
    bf16 = next((res / "gguf").glob("*-BF16.gguf"))
    targets = {"merged": res / "merged", "gguf": bf16, "onnx": res / "onnx" / "fp32"}
    before = {k: sha256_path(p) for k, p in targets.items()}
    # targets first: --forcerun takes every following word as a rule name
    snakemake(
        built_workdir, *[str(p.relative_to(built_workdir)) for p in targets.values()],
        "--cores", "2", "--forcerun", "train",
    )
    after = {k: sha256_path(p) for k, p in targets.items()}
    assert after == before


def test_killed_export_leaves_no_partial_output_and_rerun_succeeds(built_workdir):
    """SIGKILL Snakemake while the ONNX export writes its temp dir: no finished-looking output."""
    out = built_workdir / "results/runs/baseline/onnx/fp32"
    target = str(out.relative_to(built_workdir))

    def temp_dirs():
        return [p for p in out.parent.iterdir() if p.name.startswith(".fp32.tmp-")]

    for _attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "snakemake", target, "--cores", "1", "--forcerun", "onnx_export"],
            cwd=built_workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not temp_dirs():
            time.sleep(0.05)
        assert temp_dirs() or proc.poll() is not None, "the export never started writing"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if temp_dirs():  # killed mid-write (otherwise the export won the race: try again)
            break
        snakemake(built_workdir, "--unlock")
    else:
        pytest.fail("the export finished before it could be killed three times in a row")
    assert not out.exists(), "a killed export must not leave a complete-looking output"
    snakemake(built_workdir, "--unlock")  # the SIGKILLed Snakemake could not release its lock
    snakemake(built_workdir, target, "--cores", "2")
    assert (out / "model.onnx").is_file() and (out / "export.json").is_file()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name], "stale temp dirs left behind"

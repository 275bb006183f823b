"""The polars report on synthetic evaluation JSONs: schema, order, losses, base vs fine-tuned, QAT vs
PTQ, recommendation, gate."""

import json
import math

import numpy as np
import polars as pl
import pytest

from qatforge import report
from qatforge.spec.columns import LOSS_COLUMNS, REPORT_COLUMNS, SPEED_COLUMNS

N_PROMPTS = 100
N_SEQ = 20


def _row(run, scheme, fmt, variant, size, n_correct, nll, *, ok=True, kld=1e-4, seed=0, failures=None,
         vs_baseline_kld=None):
    rng = np.random.default_rng(seed)
    correct = [True] * n_correct + [False] * (N_PROMPTS - n_correct)
    tokens = [10] * N_SEQ
    sums = list(rng.normal(nll * 10, 0.5, N_SEQ))
    # make the token-weighted mean exactly `nll`
    sums = [s - (sum(sums) / (10 * N_SEQ) - nll) * 10 for s in sums]
    extra = {}
    if scheme is not None:
        vk = kld if vs_baseline_kld is None else vs_baseline_kld
        extra = {"qat_mode": "merged", "baseline_run": "baseline", "vs_baseline_kld_mean": vk,
                 "vs_baseline_top1_agree": 0.98, "vs_baseline_per_seq_kld_sum": _sums(rng, vk, tokens)}
    return {
        **extra,
        "run": run, "qat_scheme": scheme, "format": fmt, "variant": variant,
        "source_checkpoint": f"results/runs/{run}/checkpoints/checkpoint-120", "sha256": f"{seed:064x}",
        "size_mb": size, "accuracy": n_correct / N_PROMPTS, "nll": nll, "ppl": math.exp(nll), "load_s": 0.1,
        "prompt_tps": 1000.0 + seed, "gen_tps": 300.0 + seed, "peak_rss_mb": 150.0,
        "kld_mean": kld, "kld_max": kld * 20, "top1_agree": 0.99 if ok else 0.7, "gen_match": 0.95 if ok else 0.2,
        "token_parity": True, "parity_pass": ok,
        "failures": failures if failures is not None else ([] if ok else ["top1_agree 0.7 < 0.88"]),
        "per_prompt_correct": correct, "per_seq_nll_sum": sums, "per_seq_tokens": tokens,
        "per_seq_kld_sum": _sums(rng, kld, tokens),
        "threads": 1, "n_prompts": N_PROMPTS,
        "prompt_tps_p25": 990.0 + seed, "prompt_tps_p75": 1010.0 + seed, "gen_tps_p25": 290.0 + seed,
        "gen_tps_p75": 310.0 + seed, "speed_rss_mb": 120.0,
    }


def _sums(rng, mean, tokens):
    """Per-conversation KLD sums (non-negative) whose token-weighted mean is exactly ``mean``."""
    x = rng.uniform(0.5, 1.5, len(tokens)) * np.asarray(tokens)
    return list(x / x.sum() * mean * sum(tokens))


def _synthetic():
    b, q = "baseline", "qat-int8-int4"
    return [
        _row(b, None, "hf", "merged", 8.0, 90, 0.50, kld=0.0, seed=1),
        _row(b, None, "torchao", "int8-int4", 3.0, 60, 0.80, kld=0.05, seed=2),  # big PTQ loss
        _row(b, None, "torchao", "int8", 4.0, 89, 0.51, kld=0.002, seed=3),
        _row(b, None, "gguf", "BF16", 8.1, 90, 0.50, kld=2e-5, seed=4),
        _row(b, None, "gguf", "Q8_0", 4.4, 90, 0.501, kld=0.001, seed=5),
        _row(b, None, "gguf", "Q4_K_M", 2.6, 88, 0.52, kld=0.03, seed=6),
        _row(b, None, "gguf", "Q4_0", 2.4, 89, 0.53, kld=0.07, seed=7, ok=False),
        _row(b, None, "onnx", "fp32", 8.2, 90, 0.50, kld=1e-12, seed=8),
        _row(b, None, "onnx", "int8", 2.2, 70, 0.60, kld=0.01, seed=9),  # passes parity, too inaccurate
        _row(q, "int8-int4", "hf", "merged", 8.0, 89, 0.505, kld=0.0, seed=10),
        # QAT: KLD 0.01 to its own merged model, 0.02 to the baseline merged model (PTQ: 0.05)
        _row(q, "int8-int4", "torchao", "int8-int4", 3.0, 85, 0.55, kld=0.01, seed=11, vs_baseline_kld=0.02),
        _row(q, "int8-int4", "gguf", "BF16", 8.1, 89, 0.505, kld=2e-5, seed=12),
        _row(q, "int8-int4", "gguf", "Q4_0", 2.4, 89, 0.52, kld=0.02, seed=13),
        # the base model: reference only, no parity verdict
        _row(b, None, "hf", "base", 8.0, 40, 1.20, kld=0.4, seed=14, ok=None, failures=[]),
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    paths = []
    for i, r in enumerate(_synthetic()):
        p = tmp_path / "eval" / r["run"] / r["format"] / f"{r['variant']}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(r))
        paths.append(p)
    out = tmp_path / "results"
    summary = report.build_report(
        paths, out / "report.csv", out / "report.md", out / "plots", accuracy_margin=0.05, fail_on_parity=True,
        out_qat_csv=out / "qat_vs_ptq.csv",
    )
    return out, summary, paths


def test_csv_schema_order_and_ranges(built):
    out, summary, paths = built
    df = pl.read_csv(out / "report.csv")
    assert tuple(df.columns[: len(REPORT_COLUMNS)]) == REPORT_COLUMNS
    assert df.height == len(paths) == summary["rows"]
    assert df.schema["parity_pass"] == pl.Boolean and df.schema["token_parity"] == pl.Boolean
    for c in ("size_mb", "accuracy", "nll", "ppl", "kld_mean", "top1_agree", "gen_match", "gen_tps"):
        assert df.schema[c] == pl.Float64
    # the only empty cell: the base row's verdict
    assert df.null_count().sum_horizontal().item() == 1 and df["parity_pass"].null_count() == 1
    assert tuple(df.columns[-len(SPEED_COLUMNS + LOSS_COLUMNS):]) == SPEED_COLUMNS + LOSS_COLUMNS
    assert (df["gen_tps_p25"] < df["gen_tps"]).all()
    assert df["accuracy"].is_between(0, 1).all() and df["top1_agree"].is_between(0, 1).all()
    assert (df["kld_mean"] >= 0).all() and (df["size_mb"] > 0).all()
    # failing rows first, baseline's scheme recorded as "none"
    verdicts = df["parity_pass"].to_list()
    assert verdicts[0] is False and False not in verdicts[1:]
    assert set(df.filter(pl.col("run") == "baseline")["qat_scheme"]) == {"none"}
    assert summary["failing"] == ["baseline/gguf/Q4_0"]


def test_markdown_sections_and_failing_rows_first(built, caplog):
    out, _, _ = built
    md = (out / "report.md").read_text()
    heads = ("## Parity failures", "## All artifacts", "## Base vs fine-tuned", "## Loss against the merged model",
             "## Speed", "## QAT vs PTQ", "## Recommendation")
    assert [md.index(h) for h in heads] == sorted(md.index(h) for h in heads)
    assert "| baseline/hf/merged | 1 | 1001 [991, 1011] | 301 [291, 311] | 120 |" in md
    table = md.split("## All artifacts")[1]
    first_data_row = [line for line in table.splitlines() if line.startswith("| baseline") or line.startswith("| qat")][0]
    assert "Q4_0" in first_data_row and "**NO**" in first_data_row
    assert "top1_agree 0.7 < 0.88" in md
    assert "![quality_vs_size](plots/quality_vs_size.png)" in md


def test_qat_vs_ptq_recovery_and_noise(built):
    _, summary, _ = built
    comps = {(c["format"], c["variant"]): c for c in summary["qat_vs_ptq"]}
    # only the matched quantizer is a QAT result; the run's other quantized files are labelled
    assert set(comps) == {("torchao", "int8-int4"), ("gguf", "Q4_0")}
    assert comps[("gguf", "Q4_0")]["unmatched"] == report.UNMATCHED and comps[("gguf", "Q4_0")]["accuracy"] is None
    tao = comps[("torchao", "int8-int4")]["accuracy"]
    # base 0.90, PTQ 0.60, QAT 0.85: loss 0.30 vs 0.05 -> recovers 25/30
    assert tao["ptq_loss"] == pytest.approx(0.30) and tao["qat_loss"] == pytest.approx(0.05)
    assert tao["meaningful"] and tao["recovered"] == pytest.approx(25 / 30)
    lo, hi = tao["recovered_ci"]
    assert lo < 25 / 30 < hi
    nll = comps[("torchao", "int8-int4")]["nll"]
    assert nll["ptq_loss"] == pytest.approx(0.30) and nll["qat_loss"] == pytest.approx(0.05)
    assert nll["meaningful"] and nll["recovered"] == pytest.approx(25 / 30)
    # KLD to the baseline merged model: PTQ 0.05, QAT 0.02 (not its 0.01 to its own merged model)
    kld = comps[("torchao", "int8-int4")]["kld"]
    assert kld["ptq_loss"] == pytest.approx(0.05) and kld["qat_loss"] == pytest.approx(0.02)
    assert kld["recovered"] == pytest.approx(0.6)
    md = (built[0] / "report.md").read_text()
    assert "QAT recovers 83 % of the PTQ loss" in md and "QAT recovers 60 % of the PTQ loss" in md
    assert f"{report.UNMATCHED} (quantizers the run did not train for; not QAT results): qat-int8-int4/gguf/Q4_0" in md


def test_qat_vs_ptq_csv(built):
    out = built[0]
    df = pl.read_csv(out / "qat_vs_ptq.csv")
    assert tuple(df.columns) == report.QAT_VS_PTQ_COLUMNS
    assert df["metric"].to_list() == ["accuracy", "nll", "kld"]
    assert set(df["qat_run"]) == {"qat-int8-int4"} and set(df["qat_mode"]) == {"merged"}
    row = df.filter(pl.col("metric") == "kld").to_dicts()[0]
    assert row["format"] == "torchao" and row["variant"] == "int8-int4"
    assert row["recovery"] == pytest.approx(0.6) and row["recovery_ci_low"] < 0.6 < row["recovery_ci_high"]


def test_recovery_empty_when_the_ptq_loss_is_noise():
    """A PTQ loss whose interval reaches zero gives no recovery (NaN in the CSV)."""
    b, q = "baseline", "qat-int8-int4"
    rows = [_row(b, None, "hf", "merged", 8.0, 90, 0.50, kld=0.0, seed=1),
            _row(b, None, "torchao", "int8-int4", 3.0, 89, 0.5001, kld=0.05, seed=2),
            _row(q, "int8-int4", "hf", "merged", 8.0, 89, 0.505, kld=0.0, seed=10),
            _row(q, "int8-int4", "torchao", "int8-int4", 3.0, 89, 0.50, kld=0.01, seed=11, vs_baseline_kld=0.02)]
    for r in rows:
        r["qat_scheme"] = r["qat_scheme"] or report.NO_SCHEME
    df = report.qat_vs_ptq_frame(report.qat_vs_ptq(rows))
    by = {r["metric"]: r for r in df.to_dicts()}
    assert math.isnan(by["accuracy"]["recovery"]) and math.isnan(by["nll"]["recovery"])
    assert by["kld"]["recovery"] == pytest.approx(0.6)


def test_recommendation_smallest_passing_within_margin(built):
    out, summary, _ = built
    rec = summary["recommendation"]
    # baseline Q4_0 fails parity; the QAT run's Q4_0 (2.4 MiB, passes, 0.89 >= 0.90 - 0.05) is the
    # smallest passing one, ahead of baseline Q4_K_M (2.6 MiB)
    assert rec["llama.cpp / Ollama"] == "qat-int8-int4/gguf/Q4_0"
    # torchao int8-int4 of the QAT run (0.85) is within the margin and smaller than int8
    assert rec["torchao"] == "qat-int8-int4/torchao/int8-int4"
    # ONNX int8 passes parity but loses 20 points: fp32 it is
    assert rec["ONNX Runtime GenAI"] == "baseline/onnx/fp32"
    assert summary["rollback"] == "baseline/hf/merged"
    md = (out / "report.md").read_text().split("## Recommendation")[1]
    assert "qat-int8-int4/gguf/Q4_0" in md and "Rollback artifact" in md and "baseline/hf/merged" in md


def test_plots_written(built):
    out, summary, _ = built
    for p in summary["plots"]:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_gate(built, tmp_path):
    out, _, paths = built
    with pytest.raises(RuntimeError, match=r"(?s)parity failed for 1 of 13.*baseline/gguf/Q4_0: top1_agree 0.7 < 0.88"):
        report.parity_gate(out / "report.csv", out / "parity.ok")
    assert not (out / "parity.ok").exists()
    # drop the failing artifact: the gate passes and writes its marker
    good = [p for p in paths if not p.match("*/baseline/gguf/Q4_0.json")]
    report.build_report(good, out / "r2.csv", out / "r2.md", out / "plots2", accuracy_margin=0.05)
    report.parity_gate(out / "r2.csv", out / "parity.ok")
    assert "all 12 artifacts" in (out / "parity.ok").read_text()


def test_base_row_is_reported_but_not_judged(built):
    out, summary, _ = built
    df = pl.read_csv(out / "report.csv")
    base = df.filter((pl.col("format") == "hf") & (pl.col("variant") == "base"))
    assert base.height == 1 and base["run"].item() == "baseline" and base["parity_pass"].item() is None
    assert base["failures"].item() == "none" and base["accuracy"].item() == pytest.approx(0.40)
    md = (out / "report.md").read_text()
    assert "12 pass parity, 1 fail; not judged: 1 reference-only (the base model)" in md
    assert "baseline/hf/base" not in md.split("## Parity failures")[1].split("## All artifacts")[0]
    assert "baseline/hf/base" not in md.split("## Loss against the merged model")[1].split("## Speed")[0]
    assert "baseline/hf/base" not in md.split("## Recommendation")[1]
    assert summary["failing"] == ["baseline/gguf/Q4_0"]


def test_base_vs_finetuned_gains(built):
    out, summary, _ = built
    gains = {g["run"]: g for g in summary["base_vs_finetuned"]}
    assert set(gains) == {"baseline", "qat-int8-int4"}
    # base 40 correct and NLL 1.20; baseline merged 90 and 0.50: +50 points, 0.70 nats/token less
    acc, nll = gains["baseline"]["accuracy"], gains["baseline"]["nll"]
    assert acc["loss"] == pytest.approx(0.50) and 0 < acc["ci"][0] < 0.50 < acc["ci"][1]
    assert nll["loss"] == pytest.approx(0.70) and 0 < nll["ci"][0] < 0.70 < nll["ci"][1]
    assert gains["qat-int8-int4"]["accuracy"]["loss"] == pytest.approx(0.49)
    md = (out / "report.md").read_text().split("## Base vs fine-tuned")[1].split("## Loss against")[0]
    assert "| baseline/hf/merged | 0.400 → 0.900 | +50 pt [" in md and "qat-int8-int4/hf/merged" in md


def test_loss_columns_against_the_run_merged_model(built):
    out, _, _ = built
    df = pl.read_csv(out / "report.csv")

    def row(run, fmt, variant):
        return df.filter((pl.col("run") == run) & (pl.col("format") == fmt) & (pl.col("variant") == variant)).row(
            0, named=True)

    # a clear loss (90 -> 60 correct, NLL 0.50 -> 0.80): both intervals exclude zero
    tao = row("baseline", "torchao", "int8-int4")
    assert tao["acc_loss"] == pytest.approx(0.30) and tao["acc_loss_ci_low"] > 0
    assert tao["nll_loss"] == pytest.approx(0.30) and tao["nll_loss_ci_low"] > 0
    assert tao["acc_loss_ci_low"] < tao["acc_loss"] < tao["acc_loss_ci_high"]
    # the merged model against itself, and an artifact with the same answers: zero loss, zero width
    for r in (row("baseline", "hf", "merged"), row("baseline", "gguf", "BF16")):
        assert r["acc_loss"] == r["acc_loss_ci_low"] == r["acc_loss_ci_high"] == 0
    assert row("baseline", "hf", "merged")["nll_loss_ci_high"] == 0
    # against its own run's merged model: the QAT run's torchao (85 vs 89 correct)
    assert row("qat-int8-int4", "torchao", "int8-int4")["acc_loss"] == pytest.approx(0.04)
    # the base row: its loss is the fine-tuning gain
    assert row("baseline", "hf", "base")["acc_loss"] == pytest.approx(0.50)
    md = (out / "report.md").read_text().split("## Loss against the merged model")[1].split("## Speed")[0]
    assert "| baseline/torchao/int8-int4 | +30 pt [" in md and md.count("| accuracy, NLL |") >= 1
    assert "| baseline/gguf/BF16 | +0 pt [+0 pt, +0 pt] |" in md and "baseline/hf/merged" not in md


def test_paired_loss_is_seeded_and_zero_for_identical_rows():
    a = _row("r", None, "hf", "merged", 1.0, 70, 0.5, seed=1)
    b = _row("r", None, "gguf", "Q4_0", 1.0, 55, 0.9, seed=2)
    for measure in ("accuracy", "nll"):
        same = report.paired_loss(a, a, measure)
        assert same["loss"] == 0 and same["ci"] == (0.0, 0.0)
        assert report.paired_loss(a, b, measure) == report.paired_loss(a, b, measure)  # fixed seed
    assert report.paired_loss(a, b, "accuracy")["ci"][0] > 0
    assert report.paired_loss(a, {**b, "per_prompt_correct": [True]}, "accuracy") is None
    assert report.paired_loss(a, {**b, "per_seq_tokens": [11] * N_SEQ}, "nll") is None


def test_gate_ignores_the_base_row_but_not_a_missing_verdict(built, tmp_path):
    out, _, paths = built
    good = [p for p in paths if not p.match("*/baseline/gguf/Q4_0.json")]
    report.build_report(good, tmp_path / "r.csv", tmp_path / "r.md", tmp_path / "plots", accuracy_margin=0.05)
    report.parity_gate(tmp_path / "r.csv", tmp_path / "parity.ok")
    assert (tmp_path / "parity.ok").read_text().startswith("all 12 artifacts in r.csv pass parity (not judged: 1")
    # a deployment artifact with an empty verdict fails the gate
    df = pl.read_csv(tmp_path / "r.csv")
    df = df.with_columns(pl.when(pl.col("variant") == "Q8_0").then(None).otherwise(pl.col("parity_pass"))
                         .alias("parity_pass"))
    df.write_csv(tmp_path / "bad.csv")
    with pytest.raises(RuntimeError, match=r"(?s)parity failed for 1 of 12.*baseline/gguf/Q8_0: no parity verdict"):
        report.parity_gate(tmp_path / "bad.csv", tmp_path / "bad.ok")
    assert not (tmp_path / "bad.ok").exists()


def test_no_base_row_without_it(built, tmp_path):
    _, _, paths = built
    summary = report.build_report([p for p in paths if not p.match("*/hf/base.json")], tmp_path / "r.csv",
                                  tmp_path / "r.md", tmp_path / "plots", accuracy_margin=0.05)
    assert summary["base_vs_finetuned"] == [] and "No base model row" in (tmp_path / "r.md").read_text()
    assert pl.read_csv(tmp_path / "r.csv")["parity_pass"].null_count() == 0


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    row = _row("baseline", None, "hf", "merged", 1.0, 50, 1.0)
    del row["kld_mean"]
    bad.write_text(json.dumps(row))
    with pytest.raises(ValueError, match=r"bad.json: missing report columns \['kld_mean'\]"):
        report.load_evals([bad])
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for p in (a, b):
        p.write_text(json.dumps(_row("baseline", None, "hf", "merged", 1.0, 50, 1.0)))
    with pytest.raises(ValueError, match="duplicate artifact baseline/hf/merged"):
        report.load_evals([a, b])
    with pytest.raises(ValueError, match="no evaluation JSONs"):
        report.load_evals([])


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.9), (0.5, 0.1), (3.0, 0.95)]
    assert report.pareto_front(pts) == [3, 0, 4]


def test_the_baseline_is_the_run_of_the_base_row():
    """config.baseline_run places the base model's row; the report reads the baseline from it."""
    rows = [_row("baseline", None, "hf", "merged", 8.0, 90, 0.5, seed=1),
            _row("zeta", None, "hf", "merged", 8.0, 80, 0.6, seed=2),
            _row("zeta", None, "hf", "base", 8.0, 40, 1.2, seed=3, ok=None, failures=[])]
    assert report.baseline_run(rows) == "zeta" and report.baseline_run(rows[:2]) is None
    assert report.recommend(rows, 0.05)["baseline"]["run"] == "zeta"


def _twin_rows(unsloth_kld=0.035, unsloth_nll=0.65):
    """A baseline, its PTQ torchao file, a merge-exact QAT run and its Unsloth-mode twin."""
    b, q, u = "baseline", "qat-int8-int4", "qat-int8-int4-unsloth"
    rows = [_row(b, None, "hf", "merged", 8.0, 90, 0.50, kld=0.0, seed=1),
            _row(b, None, "torchao", "int8-int4", 3.0, 60, 0.80, kld=0.05, seed=2),
            _row(q, "int8-int4", "hf", "merged", 8.0, 89, 0.505, kld=0.0, seed=10),
            _row(q, "int8-int4", "torchao", "int8-int4", 3.0, 85, 0.55, kld=0.01, seed=11, vs_baseline_kld=0.02),
            _row(u, "int8-int4", "hf", "merged", 8.0, 89, 0.51, kld=0.0, seed=20),
            _row(u, "int8-int4", "torchao", "int8-int4", 3.0, 80, unsloth_nll, kld=0.02, seed=21,
                 vs_baseline_kld=unsloth_kld)]
    for r in rows:
        r["qat_scheme"] = r["qat_scheme"] or report.NO_SCHEME
        if r["run"] == u:
            r["qat_mode"] = "unsloth"
    return rows


def test_unsloth_twin_difference_of_recoveries():
    items = report.qat_vs_ptq(_twin_rows())
    by = {it["qat_run"]: it for it in items}
    assert "twin" not in by["qat-int8-int4-unsloth"]
    twin = by["qat-int8-int4"]["twin"]
    assert twin["run"] == "qat-int8-int4-unsloth"
    # KLD to baseline merged: PTQ 0.05, merge-exact 0.02 (recovers 60 %), unsloth 0.035 (30 %)
    assert twin["kld"]["difference"] == pytest.approx(0.3)
    # NLL: PTQ +0.30, merge-exact +0.05 (83 %), unsloth +0.15 (50 %); accuracy 30 / 5 / 10 points lost
    assert twin["nll"]["difference"] == pytest.approx(1 / 3)
    assert twin["accuracy"]["difference"] == pytest.approx(5 / 30)
    for m in ("accuracy", "nll", "kld"):
        rec = {run: by[run][m]["recovered"] for run in by}
        assert twin[m]["difference"] == pytest.approx(rec["qat-int8-int4"] - rec["qat-int8-int4-unsloth"])
        lo, hi = twin[m]["ci"]
        assert lo < twin[m]["difference"] < hi
    # a twin identical to the run: difference exactly 0 on every resample
    same = _twin_rows(unsloth_kld=0.02, unsloth_nll=0.55)
    u = [r for r in same if r["run"] == "qat-int8-int4-unsloth" and r["format"] == "torchao"][0]
    q = [r for r in same if r["run"] == "qat-int8-int4" and r["format"] == "torchao"][0]
    u.update({k: q[k] for k in ("per_seq_nll_sum", "vs_baseline_per_seq_kld_sum", "per_prompt_correct")})
    zero = {it["qat_run"]: it for it in report.qat_vs_ptq(same)}["qat-int8-int4"]["twin"]
    assert all(zero[m]["difference"] == 0 and zero[m]["ci"] == (0.0, 0.0) for m in ("accuracy", "nll", "kld"))
    df = report.qat_vs_ptq_frame(items)
    assert tuple(df.columns) == report.QAT_VS_PTQ_COLUMNS
    kld = df.filter((pl.col("metric") == "kld") & (pl.col("qat_run") == "qat-int8-int4")).row(0, named=True)
    assert kld["twin_run"] == "qat-int8-int4-unsloth" and kld["recovery_minus_twin"] == pytest.approx(0.3)
    assert kld["recovery_minus_twin_ci_low"] < 0.3 < kld["recovery_minus_twin_ci_high"]
    unsloth = df.filter(pl.col("qat_run") == "qat-int8-int4-unsloth")
    assert unsloth["twin_run"].to_list() == [""] * 3 and unsloth["recovery_minus_twin"].is_nan().all()


def test_twin_difference_in_report_md(tmp_path):
    paths = []
    for r in _twin_rows():
        p = tmp_path / "eval" / r["run"] / r["format"] / f"{r['variant']}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(r))
        paths.append(p)
    summary = report.build_report(paths, tmp_path / "r.csv", tmp_path / "r.md", tmp_path / "plots",
                                  out_qat_csv=tmp_path / "q.csv", accuracy_margin=0.05)
    md = (tmp_path / "r.md").read_text().split("## QAT vs PTQ")[1]
    assert "recovery minus its Unsloth-mode twin qat-int8-int4-unsloth's" in md and "kld +30 pt [" in md
    assert [(c["twin"] or {}).get("run") for c in summary["qat_vs_ptq"]] == ["qat-int8-int4-unsloth", None]


def test_verdict_ships_qat_only_for_a_significant_gain_at_the_same_size(built):
    out, summary, _ = built
    ships = {(c["format"], c["variant"]): c.get("ship") for c in summary["qat_vs_ptq"]}
    assert ships[("torchao", "int8-int4")] == "QAT"
    md = (out / "report.md").read_text().split("## Which file to ship")[1].split("## Recommendation")[0]
    assert "| torchao int8-int4 | qat-int8-int4 (merged) | **QAT** | qat-int8-int4/torchao/int8-int4 |" in md
    assert "KLD to baseline merged: QAT 0.02 vs PTQ 0.05, recovers 60 %" in md and "size 3 vs 3 MiB (1.00×)" in md
    rows = _twin_rows()
    items = [it for it in report.qat_vs_ptq(rows) if it["qat_run"] == "qat-int8-int4"]
    assert report.verdict(items[0])["ship"] == "QAT"
    # larger beyond the tolerance, slower beyond the spread, or failing parity: the PTQ file, with the reason
    for change, reason in (({"size_mb": 3.3}, "1.10× the PTQ file's size"),
                           ({"gen_tps": 200.0, "gen_tps_p25": 190.0, "gen_tps_p75": 210.0}, "generates slower"),
                           ({"parity_pass": False}, "fails parity")):
        v = report.verdict({**items[0], "qat": {**items[0]["qat"], **change}})
        assert v["ship"] == "PTQ" and v["file"]["run"] == "baseline" and any(reason in x for x in v["reasons"])
    # an insignificant KLD gain (the twin at the PTQ's KLD, noisy): PTQ
    noisy = [it for it in report.qat_vs_ptq(_twin_rows(unsloth_kld=0.05)) if it["qat_run"].endswith("unsloth")][0]
    v = report.verdict(noisy)
    assert v["ship"] == "PTQ" and any("KLD gain over PTQ is not significant" in x for x in v["reasons"])


def test_recommendation_shows_kld_against_the_baseline_merged_model(built):
    out, _, _ = built
    md = (out / "report.md").read_text().split("## Recommendation")[1]
    row = [line for line in md.splitlines() if line.startswith("| torchao |")][0]
    # the QAT file's KLD to its own merged model is 0.01; to the baseline merged model 0.02
    assert "qat-int8-int4/torchao/int8-int4" in row and "| 2.00e-02 | 0.980 |" in row


def test_quality_plot_is_against_the_baseline_with_the_base_off_scale_and_pairs_linked():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qatforge.report import plots

    rows = [{**r, "qat_scheme": r["qat_scheme"] or report.NO_SCHEME} for r in _synthetic()]
    for r in rows:
        r["parity_pass"] = r["parity_pass"] if r["variant"] != "base" else None
    pairs = [it for it in report.qat_vs_ptq(rows) if it.get("qat")]
    base_merged_nll = 0.50
    points = [(r, r["nll"] - base_merged_nll) for r in rows if r["variant"] != "base"]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    plots._quality_panel(ax, points, {"hf": "k", "gguf": "b", "torchao": "g", "onnx": "r"}, "NLL added",
                         [("base model", 0.70)], pairs, "baseline", log_y=False)
    assert ax.get_ylim()[1] < 0.70  # the base row (0.70 nats/token worse) is outside the range, named instead
    assert any("off scale: base model 0.7" in t.get_text() for t in ax.texts)
    arrows = [a for a in ax.texts if getattr(a, "arrow_patch", None) is not None]
    assert len(arrows) == len(pairs) == 1  # baseline torchao int8-int4 -> the QAT run's
    assert arrows[0].xy == (3.0, pytest.approx(0.05)) and arrows[0].xyann == (3.0, pytest.approx(0.30))
    renderer = fig.canvas.get_renderer()
    labels = [t.get_window_extent(renderer) for t in ax.texts if getattr(t, "arrow_patch", None) is None
              and not t.get_text().startswith("off scale")]
    assert len(labels) == len(points)
    overlaps = [(i, j) for i in range(len(labels)) for j in range(i) if labels[i].overlaps(labels[j])]
    assert not overlaps
    plt.close(fig)

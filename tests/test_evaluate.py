"""Per-artifact evaluation against a reference: HF (same and perturbed model), GGUF and ONNX.

GGUF and ONNX evaluations run in a subprocess that must not import torch or transformers.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qatforge import reference
from qatforge.parity import exact_dists
from qatforge.evaluate.run import run_eval, speed
from qatforge.spec.columns import REPORT_COLUMNS, SPEED_COLUMNS

from conftest import ROOT
from export_helpers import reverse_task_checkpoint

EVAL_KW = dict(threads=1, max_new_tokens=8, speed_prompts=2, speed_repeats=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = reverse_task_checkpoint(tmp_path_factory.mktemp("eval"), perturbed=True)
    t["reference"] = t["root"] / "reference"
    reference.build(t["merged"], t["parquet"], t["reference"],
                    n_prompts=6, n_nll=4, max_new_tokens=8, max_len=64, threads=1)
    return t


def _check_row(res: dict) -> None:
    assert tuple(res)[: len(REPORT_COLUMNS)] == REPORT_COLUMNS
    assert 0 <= res["accuracy"] <= 1 and 0 <= res["top1_agree"] <= 1 and 0 <= res["gen_match"] <= 1
    assert res["nll"] > 0 and res["ppl"] > 1 and res["kld_mean"] >= 0 and res["kld_max"] >= res["kld_mean"]
    assert res["size_mb"] > 0 and res["peak_rss_mb"] > 0 and res["load_s"] > 0
    assert len(res["sha256"]) == 64 and res["source_checkpoint"]
    assert len(res["per_prompt_correct"]) == res["n_prompts"] == 6
    _check_speed(res)


def _check_speed(res: dict) -> None:
    """The speed pass: medians inside their quartiles over 2 prompts x 2 repeats, exact token counts."""
    assert tuple(res)[len(REPORT_COLUMNS): len(REPORT_COLUMNS) + len(SPEED_COLUMNS)] == SPEED_COLUMNS
    for col in ("prompt_tps", "gen_tps"):
        assert 0 < res[f"{col}_p25"] <= res[col] <= res[f"{col}_p75"], col
    assert res["speed_runs"] == 4 and res["speed_spread"] == "quartiles"
    assert res["speed_prompts"] == 2 and res["speed_repeats"] == 2
    assert res["speed_gen_tokens"] == 2 * (EVAL_KW["max_new_tokens"] - 1)  # EOS ignored
    assert 0 < res["speed_rss_mb"] <= res["peak_rss_mb"]
    # the same runtime, except ONNX: parity on onnxruntime's session, speed on onnxruntime-genai (deployment)
    assert res["speed_settings"]["runtime"] == {"onnxruntime": "onnxruntime-genai"}.get(res["runtime"], res["runtime"])


class _Clock:
    """A runtime that reports fixed timings: prompt k takes k+1 s for 10 tokens, 4 steps in 2 s."""

    def __init__(self):
        self.calls = 0

    def timed_generate(self, prompt, n):
        self.calls += 1
        return prompt[0] + 1.0, 2.0, 10, n - 1


def test_speed_medians_and_spread():
    rt = _Clock()
    res = speed(rt, [[0], [1], [3]], 5, repeats=2)  # 6 runs: quartiles
    assert rt.calls == 3 + 6  # one warm-up pass
    assert res["prompt_tps"] == pytest.approx(10 / 2) and res["speed_spread"] == "quartiles"
    assert res["prompt_tps_p25"] == pytest.approx(10 / 4 + (10 / 2 - 10 / 4) * 0.25)
    assert res["prompt_tps_p75"] == pytest.approx(5 + (10 - 5) * 0.75)
    assert res["gen_tps"] == res["gen_tps_p25"] == res["gen_tps_p75"] == pytest.approx(2.0)
    assert res["speed_prompt_tokens"] == 30 and res["speed_gen_tokens"] == 12
    res = speed(_Clock(), [[0], [3]], 5, repeats=1)  # 2 runs: min and max
    assert res["speed_spread"] == "min-max"
    assert (res["prompt_tps_p25"], res["prompt_tps"], res["prompt_tps_p75"]) == pytest.approx((2.5, 6.25, 10))


class _FixedLogits:
    """A stub standing in for the model only (a ``decode.Runtime``): ``logits`` returns given arrays
    for the reference's ids, and every prompt is answered with EOS at once. Ids, masks, reference and
    the metric code of ``evaluate_runtime`` are the real ones."""

    EOS = 3

    def __init__(self, ids, logits):
        self.ids, self.fixed = list(ids), logits

    def prompt_ids(self, messages):
        return [0, 1]

    def decode(self, ids):
        return ""

    def special_ids(self):
        return {"bos_token_id": None, "eos_token_id": self.EOS, "add_bos": False, "chat_template": "T"}

    def logits(self, ids):
        assert list(ids) == self.ids
        return self.fixed

    def start(self, prompt_ids):
        return np.eye(4)[self.EOS]

    advance = start


def test_metrics_at_answer_positions_for_two_runtimes():
    """KLD, top-1 and NLL through ``evaluate_runtime`` equal hand-computed values at the answer
    positions, for two runtimes that agree there and differ wildly at the other positions."""
    from qatforge.evaluate.run import evaluate_runtime

    ln = np.log
    # tokens: user text, role header, answer, answer, <|im_end|> (id 3): positions 1, 2, 3 count
    ids = np.array([0, 1, 2, 2, 3])
    mask = np.array([False, False, True, True, True])
    p = [[1 / 4] * 4, [1 / 8, 1 / 8, 1 / 2, 1 / 4], [1 / 8, 1 / 8, 1 / 2, 1 / 4], [1 / 8, 1 / 8, 1 / 4, 1 / 2], [1 / 4] * 4]
    q = [[1 / 8, 1 / 8, 1 / 2, 1 / 4], [1 / 8, 1 / 8, 1 / 4, 1 / 2], [1 / 16, 1 / 16, 3 / 8, 1 / 2]]
    ref_logits = ln(np.array(p)).astype(np.float32)
    same_elsewhere = ref_logits.copy()  # runtime A: the reference outside the answer positions
    same_elsewhere[1:4] = ln(np.array(q))
    wild = np.array([[0, 0, 0, 30], *(ln(np.array(q)) + 5), [0, 0, 0, 30]], dtype=np.float32)  # runtime B
    ref = reference.Reference(
        meta={"max_new_tokens": 4, "stop_token_ids": [3], "bos_token_id": None, "eos_token_id": 3,
              "chat_template": "T", "prompts": [{"messages": [{"role": "user", "content": "q"}], "answer": ""}]},
        prompt_ids=[np.array([0, 1])], gen_ids=[np.array([], dtype=np.int32)],
        nll_ids=[ids], nll_mask=[mask], nll_dists=[exact_dists(ref_logits, mask)],
    )
    # by hand: KL(p || q) = 0, ln(2)/4, ln(4/3)/4; argmax 2=2, 2!=3, 3=3; -ln q[next] = ln 2, ln 4, ln 2
    want = {"kld_mean": ln(8 / 3) / 12, "kld_max": ln(2) / 4, "top1_agree": 2 / 3, "nll": 4 * ln(2) / 3,
            "ppl": 2 ** (4 / 3), "n_logit_tokens": 3}
    for rt, max_diff in ((_FixedLogits(ids, same_elsewhere), ln(2)), (_FixedLogits(ids, wild), 5 + ln(2))):
        out = evaluate_runtime(rt, ref, format="hf", variant="merged", max_new_tokens=4, thresholds=None)
        assert {k: out[k] for k in want} == pytest.approx(want, rel=1e-6)
        assert out["max_abs_diff"] == pytest.approx(max_diff, rel=1e-6)
        assert out["per_seq_nll_sum"] == pytest.approx([4 * ln(2)], rel=1e-6) and out["per_seq_tokens"] == [3]
        assert out["per_seq_kld_sum"] == pytest.approx([ln(8 / 3) / 4], rel=1e-6)
        assert out["accuracy"] == 1.0 and out["gen_match"] == 1.0
    # Against a second (baseline) reference on the same ids: its own KLD, the run's parity unchanged.
    import dataclasses

    base_ref = dataclasses.replace(ref, nll_dists=[exact_dists(same_elsewhere, mask)])  # the runtime's own logits: KLD 0
    out = evaluate_runtime(_FixedLogits(ids, same_elsewhere), ref, format="hf", variant="merged", max_new_tokens=4,
                           thresholds=None, baseline_ref=base_ref)
    assert out["vs_baseline_kld_mean"] == pytest.approx(0.0, abs=1e-9) and out["vs_baseline_top1_agree"] == 1.0
    assert out["kld_mean"] == pytest.approx(want["kld_mean"], rel=1e-6)
    other = dataclasses.replace(ref, nll_ids=[ids[::-1].copy()])
    with pytest.raises(ValueError, match="tokenize differently"):
        evaluate_runtime(_FixedLogits(ids, same_elsewhere), ref, format="hf", variant="merged", max_new_tokens=4,
                         thresholds=None, baseline_ref=other)


def test_base_model_gets_every_metric_but_no_parity_verdict():
    """The base (hf/base) is measured like the merged model, but parity is not judged: a threshold
    that fails the merged model leaves the base without a verdict, failures or thresholds."""
    from qatforge.evaluate.run import evaluate_runtime

    ids, mask = np.array([0, 1, 2, 3]), np.array([False, False, True, True])
    logits = np.zeros((4, 4), dtype=np.float32)
    ref = reference.Reference(
        meta={"max_new_tokens": 4, "stop_token_ids": [3], "bos_token_id": None, "eos_token_id": 3,
              "chat_template": "T", "prompts": [{"messages": [{"role": "user", "content": "q"}], "answer": ""}]},
        prompt_ids=[np.array([0, 1])], gen_ids=[np.array([], dtype=np.int32)],
        nll_ids=[ids], nll_mask=[mask], nll_dists=[exact_dists(logits, mask)],
    )
    th = {"hf": {"default": {"kld_mean": -1.0}, "merged": {"kld_mean": -1.0}}}
    kw = dict(format="hf", max_new_tokens=4, thresholds=th)
    merged = evaluate_runtime(_FixedLogits(ids, logits), ref, variant="merged", **kw)
    assert merged["parity_pass"] is False and merged["failures"] == ["kld_mean 0 > -1"] and "parity" not in merged
    base = evaluate_runtime(_FixedLogits(ids, logits), ref, variant="base", **kw)
    assert base["parity_pass"] is None and base["failures"] == [] and base["thresholds"] is None
    assert base["parity"] == "not applicable: the base is not an export of the merged model"
    assert base["nll"] == pytest.approx(np.log(4)) and base["accuracy"] == 1.0 and base["kld_mean"] == 0
    assert base["per_seq_tokens"] == [2] and base["per_prompt_correct"] == [True]


def _subprocess_eval(artifact: Path, t: dict, fmt: str, variant: str, out: Path) -> tuple[dict, list[str]]:
    """run_eval in a fresh interpreter; returns the JSON row and the heavy modules it imported."""
    code = (
        "import json, sys\n"
        "from qatforge.evaluate.run import run_eval\n"
        "a = json.loads(sys.argv[1])\n"
        "run_eval(a['artifact'], a['reference'], a['test'], a['out'], run='r', qat_scheme=None,\n"
        "         format=a['format'], variant=a['variant'], **a['kw'])\n"
        "print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))\n"
    )
    arg = json.dumps({"artifact": str(artifact), "reference": str(t["reference"]), "test": str(t["parquet"]),
                      "out": str(out), "format": fmt, "variant": variant, "kw": EVAL_KW})
    p = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text()), json.loads(p.stdout.strip().splitlines()[-1])


def test_hf_same_model_is_exact(tiny, tmp_path):
    out = tmp_path / "hf.json"
    res = run_eval(tiny["merged"], tiny["reference"], tiny["parquet"], out, run="baseline", qat_scheme=None,
                   format="hf", variant="merged", **EVAL_KW)
    assert json.loads(out.read_text()) == res
    _check_row(res)
    assert res["kld_mean"] < 1e-9 and res["top1_agree"] == 1.0 and res["gen_match"] == 1.0
    assert res["token_parity"] is True and res["parity_pass"] is True and res["failures"] == []
    st = res["speed_settings"]  # the merged model: fp32, the reference format
    assert st["compute_dtype"] == "float32" and st["use_cache"] and st["torch_threads"] == 1
    assert st["linear_weight_types"] == ["Parameter"]
    assert res["bos_ok"] and res["eos_ok"] and res["no_double_bos"] and res["chat_template_equal"]
    ref = reference.load(tiny["reference"])
    assert res["nll"] == pytest.approx(ref.meta["nll"], abs=1e-6)
    assert res["accuracy"] == ref.meta["accuracy"]
    assert res["format"] == "hf" and res["run"] == "baseline" and res["qat_scheme"] is None


def test_hf_perturbed_model_fails_parity_via_cli(tiny, tmp_path):
    from qatforge.evaluate.run import main

    out = tmp_path / "p.json"
    th = json.dumps({"hf": {"merged": {"kld_mean": 1e-4, "top1_agree": 0.5}}})
    main(["--artifact", str(tiny["perturbed"]), "--reference", str(tiny["reference"]), "--test-data",
          str(tiny["parquet"]), "--out", str(out), "--run", "baseline", "--format", "hf", "--variant", "merged",
          "--threads", "1", "--max-new-tokens", "8", "--speed-prompts", "2", "--speed-repeats", "2",
          "--thresholds", th])
    res = json.loads(out.read_text())
    _check_row(res)
    assert res["token_parity"] is True  # same tokenizer
    assert res["kld_mean"] > 1e-3 and res["top1_agree"] < 1.0
    assert res["thresholds"]["kld_mean"] == 1e-4 and res["thresholds"]["top1_agree"] == 0.5
    assert res["parity_pass"] is False and any(f.startswith("kld_mean") for f in res["failures"])


def test_bad_artifact_is_named_or_recorded(tiny, tmp_path):
    bogus = tmp_path / "Model-Q4_0.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="Model-Q4_0.gguf: not a GGUF file"):
        run_eval(bogus, tiny["reference"], tiny["parquet"], None, run="r", qat_scheme=None, format="gguf",
                 variant="Q4_0", **EVAL_KW)
    res = run_eval(bogus, tiny["reference"], tiny["parquet"], tmp_path / "e.json", run="r", qat_scheme=None,
                   format="gguf", variant="Q4_0", record_errors=True, **EVAL_KW)
    assert res["parity_pass"] is False and "not a GGUF file" in res["failures"][0]
    assert res["accuracy"] is None and tuple(res)[: len(REPORT_COLUMNS)] == REPORT_COLUMNS
    with pytest.raises(ValueError, match="unknown format 'tflite'"):
        run_eval(bogus, tiny["reference"], None, None, run="r", qat_scheme=None, format="tflite", variant="x")


def test_token_parity_threshold_from_a_validated_config(tiny, tmp_path):
    """``token_parity: false`` passes the schema and lets a re-tokenizing artifact pass parity."""
    import shutil

    import yaml
    from snakemake.utils import validate

    art = tmp_path / "retokenized"  # same weights and template, half the BPE merges: other prompt ids
    shutil.copytree(tiny["merged"], art)
    tj = json.loads((art / "tokenizer.json").read_text())
    tj["model"]["merges"] = tj["model"]["merges"][: len(tj["model"]["merges"]) // 2]
    (art / "tokenizer.json").write_text(json.dumps(tj))
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    # gen_match 0: generations from other prompt ids may differ; token parity alone decides
    cfg["report"]["thresholds"] = {"hf": {"merged": {"token_parity": False, "gen_match": 0.0}}}
    validate(cfg, str(ROOT / "config" / "schema.yaml"))
    kw = dict(run="baseline", qat_scheme=None, format="hf", variant="merged", **EVAL_KW)

    res = run_eval(art, tiny["reference"], tiny["parquet"], tmp_path / "e.json",
                   thresholds=cfg["report"]["thresholds"], **kw)
    assert res["token_parity"] is False and res["token_parity_frac"] < 1
    assert res["chat_template_equal"] and res["bos_ok"] and res["eos_ok"]
    assert res["kld_mean"] < 1e-9  # logits are compared on the reference's ids
    assert res["thresholds"]["token_parity"] is False
    assert res["parity_pass"] is True and res["failures"] == []

    strict = run_eval(art, tiny["reference"], tiny["parquet"], None,
                      thresholds={"hf": {"merged": {"gen_match": 0.0}}}, **kw)
    assert strict["parity_pass"] is False and strict["failures"] == ["token_parity is false"]


def test_gguf_f32_matches_reference_without_torch(tiny, tmp_path):
    from qatforge.export import gguf

    f32 = tmp_path / "Tiny-F32.gguf"
    gguf.convert(tiny["merged"], f32, outtype="f32", source={"run": "r", "checkpoint": "checkpoint-7"})
    res, heavy = _subprocess_eval(f32, tiny, "gguf", "F32", tmp_path / "gguf.json")
    assert heavy == []
    _check_row(res)
    assert res["source_checkpoint"] == "checkpoint-7"
    assert res["token_parity"] and res["chat_template_equal"] and res["eos_ok"] and res["bos_ok"]
    assert res["no_double_bos"] and res["add_bos"] is False
    assert res["kld_mean"] < 1e-5 and res["top1_agree"] == 1.0 and res["gen_match"] == 1.0
    assert res["parity_pass"], res["failures"]
    assert res["kv_cache_type"] == "f32"  # parity; speed runs in a deployment context:
    st = res["speed_settings"]
    assert st["logits_all"] is False and st["kv_cache_type_k"] == st["kv_cache_type_v"] == "f16"
    assert st["n_threads"] == st["n_threads_batch"] == 1 and st["timing"].startswith("llama_perf_context")
    ref = reference.load(tiny["reference"])
    assert res["speed_prompt_tokens"] == sum(len(p) for p in ref.prompt_ids[:2])  # llama.cpp's own count

    q8 = tmp_path / "Tiny-Q8_0.gguf"
    gguf.quantize(f32, q8, qtype="Q8_0")
    res8, heavy = _subprocess_eval(q8, tiny, "gguf", "Q8_0", tmp_path / "q8.json")
    assert heavy == [] and res8["token_parity"]
    assert res["kld_mean"] < res8["kld_mean"] < 0.0014  # below llama.cpp's published Q8_0 mean KLD
    assert res8["size_mb"] < res["size_mb"] / 2


def test_onnx_fp32_matches_reference_without_torch(tiny, tmp_path):
    from qatforge.export import onnx

    fp32 = tmp_path / "onnx" / "fp32"
    onnx.export(tiny["merged"], fp32, threads=1)
    res, heavy = _subprocess_eval(fp32, tiny, "onnx", "fp32", tmp_path / "onnx.json")
    assert heavy == []
    _check_row(res)
    assert res["token_parity"] and res["chat_template_equal"] and res["eos_ok"]
    assert res["kld_mean"] < 1e-9 and res["top1_agree"] == 1.0 and res["gen_match"] == 1.0
    assert res["max_abs_diff"] < 1e-4 and res["parity_pass"], res["failures"]
    # speed from the deployment runtime, onnxruntime-genai's Generator, with the thread count set
    st = res["speed_settings"]
    assert st["runtime"] == "onnxruntime-genai" and st["runtime_versions"]["onnxruntime-genai"]
    assert st["config_overlay"]["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 1
    assert res["gen_tps"] > 0 and res["prompt_tps"] > 0


def test_torchao_int8_loads_with_transformers(tiny, tmp_path):
    from qatforge.export import torchao

    out = tmp_path / "torchao" / "int8"
    torchao.ptq(tiny["merged"], out, "int8", threads=1, source={"run": "baseline", "checkpoint": "checkpoint-3"})
    res = run_eval(out, tiny["reference"], tiny["parquet"], tmp_path / "tao.json", run="baseline", qat_scheme=None,
                   format="torchao", variant="int8", **EVAL_KW)
    _check_row(res)
    assert res["runtime"] == "transformers" and res["source_checkpoint"] == "checkpoint-3"
    assert res["token_parity"] and res["chat_template_equal"]
    # int8 weights + int8 dynamic activations: a small but non-zero divergence from the fp32 reference
    assert 0 < res["kld_mean"] < 1e-3
    st = res["speed_settings"]  # torchao's quantized tensors, not an upcast copy
    assert st["use_cache"] and st["torch_threads"] == 1 and "Parameter" not in st["linear_weight_types"]
    from qatforge.bench import size_mb

    assert res["size_mb"] < 0.5 * size_mb(tiny["merged"])

"""Config validation: schema (Snakemake's validate) and the checks JSON schema cannot express."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from conftest import ROOT, copy_project
from qatforge.spec import config as qcfg

SCHEMA = str(ROOT / "config" / "schema.yaml")


@pytest.fixture
def cfg():
    c = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate(c, SCHEMA)
    return c


def problems_of(c, workdir=ROOT, cuda=None):
    with pytest.raises(qcfg.ConfigError) as e:
        qcfg.check(c, workdir, cuda_capability=cuda)
    return str(e.value)


def test_default_config_is_valid(cfg):
    qcfg.check(cfg, ROOT)
    # baseline: hf, the base, BF16, 6 quants, 3 onnx, 2 PTQ torchao schemes; each QAT run (formats:
    # matched): its merged model and the artifact of its quantizer
    assert len(qcfg.artifacts(cfg)) == (1 + 1 + 1 + 6 + 3 + 2) + 3 * 2
    assert {a for a in qcfg.artifacts(cfg) if a[0].startswith("qat-")} == {
        ("qat-int8-int4", "hf", "merged"), ("qat-int8-int4", "torchao", "int8-int4"),
        ("qat-gguf-q4_0", "hf", "merged"), ("qat-gguf-q4_0", "gguf", "Q4_0"),
        ("qat-onnx-int4", "hf", "merged"), ("qat-onnx-int4", "onnx", "int4")}
    assert qcfg.torchao_variants(cfg, "qat-onnx-int4") == [] and qcfg.modelfile_quant(cfg, "qat-onnx-int4") is None
    assert qcfg.run_base(cfg, "qat-gguf-q4_0") == "results/runs/baseline/merged"
    assert qcfg.run_base(cfg, "baseline") == "results/base"
    assert qcfg.modelfile_quant(cfg, "qat-gguf-q4_0") == "Q4_0" and qcfg.modelfile_quant(cfg, "qat-int8-int4") is None
    assert qcfg.comparison_baseline(cfg, "qat-int8-int4") == "baseline" and qcfg.comparison_baseline(cfg, "baseline") is None
    assert [a for a in qcfg.artifacts(cfg) if a[1:] == ("hf", "base")] == [("baseline", "hf", "base")]
    only_qat = copy.deepcopy(cfg)
    del only_qat["runs"]["baseline"]
    assert not [a for a in qcfg.artifacts(only_qat) if a[1:] == ("hf", "base")]  # no baseline run, no base row


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"bogus_key": 1}, "bogus_key"),
        ({"train": {"max_steps": "ten"}}, "max_steps"),
        ({"gguf": {"outtype": "q4"}}, "outtype"),
        ({"runs": {"../evil": {"qat_scheme": None}}}, "../evil"),
        ({"runs": {"a/b": {}}}, "a/b"),
        ({"data": {"on_bad_rows": "ignore"}}, "on_bad_rows"),
        ({"data": {"test_fraction": 1.0}}, "test_fraction"),
        ({"data": {"eval_prompts": "data/eval_prompts.jsonl"}}, "eval_prompts"),
        ({"formats": {"on_unsupported": "ignore"}}, "on_unsupported"),
    ],
)
def test_schema_rejects_with_the_key_named(cfg, patch, needle):
    bad = copy.deepcopy(cfg)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(bad.get(k), dict) and k != "runs":
            bad[k].update(v)
        else:
            bad[k] = v
    with pytest.raises(Exception) as e:
        validate(bad, SCHEMA)
    assert needle in str(e.value)


def test_unknown_quant_type_lists_valid_ones(cfg):
    cfg["gguf"]["quants"]["Q4_K_X"] = {"type": "Q4_K_X"}
    msg = problems_of(cfg)
    assert "gguf.quants.Q4_K_X.type" in msg and "Q4_K_M" in msg and "IQ4_XS" in msg


def test_imatrix_types_need_an_imatrix(cfg):
    cfg["gguf"]["quants"]["IQ2_XXS"] = {"type": "IQ2_XXS"}
    assert "gguf.quants.IQ2_XXS: type IQ2_XXS needs an importance matrix" in problems_of(cfg)


def test_schema_gguf_keys_are_quant_types_facts():
    """The schema cannot import Python: its gguf.outtype enum and a quant's options (besides type and
    imatrix) must be quant_types' OUTTYPES and QUANT_OPTIONS, each option typed as its kind."""
    from qatforge.spec.quant_types import OUTTYPES, QUANT_OPTIONS

    gguf = yaml.safe_load(Path(SCHEMA).read_text())["properties"]["gguf"]["properties"]
    assert gguf["outtype"]["enum"] == list(OUTTYPES)
    props = gguf["quants"]["additionalProperties"]["properties"]
    assert list(props) == ["type", "imatrix", *QUANT_OPTIONS]
    schema_type = {"switch": "boolean", "type": ["string", "null"], "tensor_types": "object", "kv": "object"}
    assert {k: props[k]["type"] for k in QUANT_OPTIONS} == {k: schema_type[kind] for k, (_, kind) in QUANT_OPTIONS.items()}


def test_unknown_scheme_lists_valid_ones(cfg):
    cfg["runs"]["qat-int8-int4"]["qat_scheme"] = "int3-magic"
    msg = problems_of(cfg)
    assert "runs.qat-int8-int4.qat_scheme" in msg and "int8-int4" in msg and "phone-deployment" in msg


@pytest.mark.parametrize("scheme", ["fp8-int4", "fp8-fp8", "int4"])
def test_scheme_the_cpu_cannot_run_is_rejected_with_reason(cfg, scheme):
    cfg["runs"]["qat-int8-int4"]["qat_scheme"] = scheme
    msg = problems_of(cfg)
    assert f"runs.qat-int8-int4.qat_scheme: scheme {scheme!r}" in msg and "use int8-int4" in msg


def test_fp8_allowed_on_a_capable_gpu(cfg):
    cfg["runs"]["qat-int8-int4"]["qat_scheme"] = "fp8-fp8"
    cfg["runs"]["qat-int8-int4"]["qat"]["block_scales"] = "format"  # fp8 files store no int4 block scales
    qcfg.check(cfg, ROOT, cuda_capability=(9, 0))  # a GPU cannot exist here: capability is passed in
    assert "compute capability" in problems_of(cfg, cuda=(8, 0))


def test_duplicate_artifact_names(cfg):
    cfg["gguf"]["quants"]["BF16"] = {"type": "Q8_0"}
    cfg["gguf"]["quants"]["q8_0"] = {"type": "Q8_0"}
    cfg["runs"]["Baseline"] = {"qat_scheme": None}
    msg = problems_of(cfg)
    assert "gguf.quants.BF16: duplicate artifact name" in msg
    assert "duplicate artifact names 'Q8_0' and 'q8_0'" in msg
    assert "runs: duplicate artifact names 'baseline' and 'Baseline'" in msg


def test_default_quant_must_exist(cfg):
    cfg["gguf"]["default_quant"] = "Q3_K_M"
    assert "gguf.default_quant" in problems_of(cfg)


def test_model_base_missing_or_not_causal_lm(cfg, tmp_path):
    cfg["model"]["base"] = str(tmp_path / "nope")
    assert "does not exist" in problems_of(cfg)
    enc = tmp_path / "bert"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    cfg["model"]["base"] = str(enc)
    assert "is neither a causal LM nor a *ForConditionalGeneration" in problems_of(cfg)


def test_architecture_the_gguf_converter_lacks_is_refused_up_front(cfg, tmp_path):
    """The names come from the installed convert_hf_to_gguf.py's ModelBase.register(...) calls."""
    from qatforge.spec.llamacpp_paths import known_architectures

    known = known_architectures()
    assert {"Qwen3ForCausalLM", "LlamaForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM"} <= set(known)
    m = tmp_path / "lm"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"architectures": ["MadeUpForCausalLM"], "model_type": "qwen3"}))
    (m / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x", "eos_token": "</s>"}))
    (m / "tokenizer.json").write_text("{}")
    cfg["model"]["base"] = str(m)
    msg = problems_of(cfg)
    assert "model.base: no gguf export: qwen3 (MadeUpForCausalLM): llama.cpp's converter has no model class " \
           "for ['MadeUpForCausalLM']" in msg and "formats.on_unsupported: error" in msg
    (m / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}))
    qcfg.check(cfg, ROOT)
    cfg["formats"]["on_unsupported"] = "skip"  # skip: nothing unsupported, nothing skipped
    assert qcfg.skipped_formats(cfg, ROOT) == {} and len(qcfg.artifacts(cfg, ROOT)) == 20


def test_tokenizer_without_chat_template_or_eos(cfg, tmp_path):
    m = tmp_path / "lm"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    (m / "tokenizer_config.json").write_text(json.dumps({}))
    cfg["model"]["base"] = str(m)
    msg = problems_of(cfg)
    assert "has no chat template" in msg and "has no eos_token" in msg


def test_split_fractions_must_leave_a_train_split(cfg):
    cfg["data"].update(dev_fraction=0.5, test_fraction=0.5)
    assert "data.dev_fraction + data.test_fraction" in problems_of(cfg)


def test_n_prompts_is_checked_by_prepare_data_not_at_parse_time(cfg, tmp_path):
    """The test split's size is only known once the dataset is read: prepare_data fails, naming it."""
    from qatforge import data

    cfg["eval"]["n_prompts"] = 10**6
    qcfg.check(cfg, ROOT)  # parse time does not read the dataset
    outs = [tmp_path / f"{s}.parquet" for s in data.SPLITS]
    with pytest.raises(data.DataError, match=r"the test split has \d+ conversations but eval\.n_prompts asks for 1000000"):
        data.prepare(ROOT / cfg["data"]["path"], *outs, dev_fraction=cfg["data"]["dev_fraction"],
                     test_fraction=cfg["data"]["test_fraction"], max_tokens=cfg["data"]["max_tokens"],
                     n_prompts=cfg["eval"]["n_prompts"], n_nll=cfg["eval"]["n_nll"])


def test_unknown_run_in_targets_is_named(tmp_path):
    work = copy_project(tmp_path / "p")
    proc = _snakemake_cli(work, "-n", "--cores", "1", "results/runs/nosuch/merged")
    assert proc.returncode != 0
    assert "results/runs/nosuch/merged" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "run, patch, needle",
    [
        ("qat-int8-int4", {"qat": {"distill_from": "nosuch"}}, "runs.qat-int8-int4.qat.distill_from: 'nosuch' is not a run"),
        ("qat-int8-int4", {"qat": {"distill_from": "qat-gguf-q4_0"}}, "must be a baseline run"),
        ("baseline", {"qat": {"distill_from": "baseline"}}, "only a QAT run"),
        ("baseline", {"formats": "matched"}, "runs.baseline.formats"),
        ("qat-gguf-q4_0", {"qat": {"mode": "unsloth"}}, "runs.qat-gguf-q4_0.qat.mode"),
    ],
)
def test_qat_run_settings_are_checked(cfg, run, patch, needle):
    cfg["runs"][run] = {**cfg["runs"][run], **{k: {**(cfg["runs"][run].get(k) or {}), **v} if isinstance(v, dict) else v
                                              for k, v in patch.items()}}
    assert needle in problems_of(cfg)


def test_gguf_scheme_needs_llama_cpp_qat_mix(cfg):
    """A GGUF-targeted run ships as the quant of its type, written in llama.cpp's QAT mix (Q4_0 with
    Q8_0 token embedding and output): what it trains under, so nothing else is accepted."""
    mix = "must exist as {type: Q4_0, token_embedding_type: Q8_0, output_tensor_type: Q8_0}"
    qcfg.check(cfg, ROOT)  # the default's Q4_0 is that mix
    for wrong in ({"type": "Q4_0"}, {"type": "Q4_0", "token_embedding_type": "Q8_0"},
                  {"type": "Q4_0", "token_embedding_type": "Q8_0", "output_tensor_type": "Q6_K"},
                  {"type": "Q4_0", "token_embedding_type": "Q8_0", "output_tensor_type": "Q8_0", "pure": True}):
        cfg["gguf"]["quants"]["Q4_0"] = wrong
        assert f"ships as gguf.quants.Q4_0, which {mix}" in problems_of(cfg), wrong
    del cfg["gguf"]["quants"]["Q4_0"]
    assert "gguf.quants.Q4_0" in problems_of(cfg)
    cfg["gguf"]["quants"]["Q4_0"] = {"type": "Q4_0", "token_embedding_type": "Q8_0", "output_tensor_type": "Q8_0"}
    cfg["torchao"]["schemes"] = ["gguf-q4_0"]
    assert "is a GGUF-targeted QAT scheme, not a torchao one" in problems_of(cfg)


def test_onnx_scheme_needs_the_builders_int4_variant(cfg):
    """An ONNX-targeted run ships as the onnx variant of its precision, built with exactly the
    MatMulNBits it trains under (int4, block 32, no other builder options)."""
    qcfg.check(cfg, ROOT)
    want = "ships as onnx.variants.int4, which must exist as {precision: int4, block_size: 32}"
    for wrong in ({"precision": "int4", "block_size": 128}, {"precision": "int4", "block_size": 32, "int4_is_symmetric": False},
                  {"precision": "int8", "block_size": 32}):
        cfg["onnx"]["variants"]["int4"] = wrong
        assert want in problems_of(cfg), wrong
    del cfg["onnx"]["variants"]["int4"]
    assert want in problems_of(cfg)
    cfg["onnx"]["variants"]["int4"] = {"precision": "int4", "block_size": 32}
    cfg["runs"]["qat-onnx-int4"]["qat"]["mode"] = "unsloth"
    assert "runs.qat-onnx-int4.qat.mode: the ONNX scheme 'onnx-int4' trains merge-exact only" in problems_of(cfg)
    cfg["runs"]["qat-onnx-int4"]["qat"]["mode"] = "merged"
    cfg["torchao"]["schemes"] = ["onnx-int4"]
    assert "'onnx-int4' is a ONNX-targeted QAT scheme, not a torchao one" in problems_of(cfg)


def test_train_settings_are_per_run(cfg):
    cfg["runs"]["baseline"]["train"] = {"lr": 1e-3, "lora": {"r": 8}}
    s = qcfg.train_settings(cfg, "baseline")
    other = qcfg.train_settings(cfg, "qat-int8-int4")
    assert s["lr"] == 1e-3 and s["lora"]["r"] == 8 and s["lora"]["alpha"] == 32
    own = cfg["runs"]["qat-int8-int4"]["train"]["lora"]  # the QAT run's own rank, not the baseline's 8
    assert other["lora"]["r"] == own["r"] != 8 and other["lora"]["alpha"] == own["alpha"]
    assert other["qat_scheme"] == "int8-int4" and s["qat_scheme"] is None
    assert "select_metric" not in s and "threads" not in s  # a resource: qcfg.run_threads
    cfg["runs"]["qat-int8-int4"]["train"]["threads"] = 3
    assert qcfg.run_threads(cfg, "qat-int8-int4") == 3 and qcfg.run_threads(cfg, "baseline") == cfg["train"]["threads"]
    # runs.<run>.qat reaches TrainSettings; the teacher becomes the base, not a setting
    assert other["qat_mode"] == "merged" and other["distill"] is True and other["kd_alpha"] == 1.0
    assert "distill_from" not in other and "qat_mode" not in s
    from qatforge.train import TrainSettings

    assert TrainSettings.from_config(other).distill


def _snakemake_cli(workdir: Path, *args, pythonpath: str | None = None):
    env = None
    if pythonpath:
        import os

        env = {**os.environ, "PYTHONPATH": pythonpath + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=workdir, capture_output=True, text=True, env=env, timeout=120
    )


def test_bad_config_fails_fast_through_snakemake(tmp_path):
    work = copy_project(tmp_path / "p")
    c = yaml.safe_load((work / "config" / "config.yaml").read_text())
    c["runs"]["qat-int8-int4"]["qat_scheme"] = "fp8-fp8"
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(c))
    t0 = time.monotonic()
    proc = _snakemake_cli(work, "-n", "--cores", "1")
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 30
    assert "runs.qat-int8-int4.qat_scheme" in proc.stderr + proc.stdout
    assert "compute capability" in proc.stderr + proc.stdout


def test_snakefile_parse_imports_no_torch(tmp_path):
    """A dry run with torch/transformers made unimportable still parses and plans the DAG."""
    work = copy_project(tmp_path / "p")
    blocker = tmp_path / "block"
    blocker.mkdir()
    for mod in ("torch", "transformers", "llama_cpp", "onnxruntime", "torchao"):
        (blocker / f"{mod}.py").write_text(f"raise ImportError('{mod} imported at parse time')\n")
    proc = _snakemake_cli(work, "-n", "--cores", "1", pythonpath=str(blocker))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "build_base" in proc.stdout and "report" in proc.stdout


def test_lint_clean(tmp_path):
    work = copy_project(tmp_path / "p")
    proc = _snakemake_cli(work, "--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def test_pre_tokenizer_must_be_one_llama_cpp_knows(cfg):
    """The names come from the installed llama.cpp's own llama-vocab.cpp (written by the installer)."""
    from qatforge.llamacpp import known_pre_tokenizers

    names = known_pre_tokenizers()
    assert names and "qwen2" in names and "gpt-2" in names and "llama3" in names
    cfg["gguf"]["pre_tokenizer"] = "gpt2"  # llama.cpp spells it gpt-2
    msg = problems_of(cfg)
    assert "gguf.pre_tokenizer: 'gpt2' is not a pre-tokenizer llama.cpp knows" in msg and "gpt-2" in msg


def test_model_name_falls_back_to_the_base(cfg, tmp_path):
    assert qcfg.model_name(cfg) == "TinyQwen3"  # set in the default config
    cfg["model"]["name"] = None
    assert qcfg.model_name(cfg) == qcfg.BUILTIN_NAME
    d = tmp_path / "models" / "Llama 3.2 1B"
    d.mkdir(parents=True)
    cfg["model"]["base"] = str(d)
    assert qcfg.model_name(cfg) == "Llama-3.2-1B"  # the directory name, made file-name safe
    (d / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen3-0.6B"}))
    assert qcfg.model_name(cfg) == "Qwen3-0.6B"
    cfg["model"]["base"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id
    assert qcfg.model_name(cfg) == "SmolLM2-135M-Instruct"
    validate({**cfg, "model": {**cfg["model"], "name": None}}, SCHEMA)


def test_learned_block_scales_only_where_the_file_stores_them(cfg):
    """qat.block_scales learned: GGUF Q4_0, ONNX int4 and TorchAO int8-int4 runs, merge-exact; a
    scheme whose file has no int4 block scales, or the Unsloth mode, is refused."""
    for run in ("qat-gguf-q4_0", "qat-onnx-int4", "qat-int8-int4"):
        cfg["runs"][run]["qat"]["block_scales"] = "learned"
    qcfg.check(cfg, ROOT)
    assert qcfg.learned_block_scales(cfg, "qat-gguf-q4_0") and not qcfg.learned_block_scales(cfg, "baseline")
    cfg["runs"]["qat-int8-int4"]["qat_scheme"] = "int8"
    assert ("runs.qat-int8-int4.qat.block_scales: learned block scales are written into GGUF Q4_0, ONNX int4 "
            "(block 32) and TorchAO int8-int4 files only") in problems_of(cfg)
    cfg["runs"]["qat-int8-int4"]["qat_scheme"] = "int8-int4"
    cfg["runs"]["qat-int8-int4"]["qat"]["mode"] = "unsloth"
    assert "runs.qat-int8-int4.qat.block_scales: learned block scales train merge-exact only" in problems_of(cfg)


def test_block_scales_at_its_default_leaves_train_params_as_before(cfg):
    """qat.block_scales: format (the default, filled in by the schema) is not in a run's train params,
    so a tree built before the option existed is not retrained; learned is."""
    cfg["runs"]["qat-int8-int4"]["qat"]["block_scales"] = "format"
    assert "block_scales" not in qcfg.train_settings(cfg, "qat-int8-int4")
    cfg["runs"]["qat-int8-int4"]["qat"]["block_scales"] = "learned"
    assert qcfg.train_settings(cfg, "qat-int8-int4")["block_scales"] == "learned"


def test_sampling_at_its_default_leaves_train_params_as_before(cfg):
    """train.sampling: random (the default, filled in by the schema) is not in a run's train params,
    so a tree built before the option existed is not retrained; group_by_length is, per run."""
    cfg["runs"]["baseline"].setdefault("train", {}).pop("sampling", None)
    assert "sampling" not in qcfg.train_settings(cfg, "baseline")
    cfg["runs"]["baseline"]["train"]["sampling"] = "group_by_length"
    validate(cfg, SCHEMA)
    assert qcfg.train_settings(cfg, "baseline")["sampling"] == "group_by_length"


def test_default_qat_runs_learn_their_scales(cfg):
    """The default QAT recipe: every QAT run learns its block scales for 360 steps, on batches
    grouped by length; the baseline keeps random batches."""
    qat = [r for r in cfg["runs"] if qcfg.qat_scheme(cfg, r)]
    assert len(qat) == 3
    for run in qat:
        assert qcfg.learned_block_scales(cfg, run)
        settings = qcfg.train_settings(cfg, run)
        assert (settings["max_steps"], settings["save_steps"], settings["block_scales"], settings["sampling"]) == (
            360, 120, "learned", "group_by_length")
    assert "sampling" not in qcfg.train_settings(cfg, "baseline")

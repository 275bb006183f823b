"""The capability check of the configured base: GGUF and ONNX at parse time (qatforge.spec.capabilities,
from the facts `make install` writes), TorchAO in the build_base job (qatforge.base), and
formats.on_unsupported (error / skip) through config.check, artifacts, snakemake -n and the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, copy_project, read_config, snakemake, write_config
from families import FAMILIES
from qatforge.capabilities.install import set_vocab_requirement
from qatforge.capabilities.torchao import check_torchao_schemes
from qatforge.spec import capabilities as cap
from qatforge.spec import config as qcfg
from qatforge.spec.llamacpp_paths import ARCHITECTURES, share_dir

FAMILY_ARCHS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama3": "LlamaForCausalLM",
                "llama-spm": "LlamaForCausalLM", "llama2-spm": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                "qwen3_5": "Qwen3_5ForConditionalGeneration", "gemma4": "Gemma4ForConditionalGeneration",
                "ministral3": "Mistral3ForConditionalGeneration"}
# what a family's base is refused (the pinned ONNX builder fails on Gemma 4: onnx_archs.BUILDER_FAILURES)
FAMILY_REFUSED = {"gemma4": {"onnx"}}


@pytest.fixture(scope="module")
def replicas(family_replicas, tmp_path_factory) -> dict[str, Path]:
    """The family replicas (tests/families.py), plus variants: ``phi3-nospm`` (tokenizer.model
    deleted), ``qwen3-notok`` (tokenizer.json deleted) and ``qwen3-moe`` (an architecture llama.cpp converts and
    ONNX Runtime GenAI's model builder does not build: Qwen3MoeForCausalLM)."""
    root = tmp_path_factory.mktemp("families")
    out = dict(family_replicas)

    def variant(name: str, src: str) -> Path:
        out[name] = root / name
        shutil.copytree(out[src], out[name])
        return out[name]

    (variant("phi3-nospm", "phi3") / "tokenizer.model").unlink()
    (variant("qwen3-notok", "qwen3") / "tokenizer.json").unlink()
    cfg_path = variant("qwen3-moe", "qwen3") / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "architectures": ["Qwen3MoeForCausalLM"]}))
    return out


@pytest.fixture(scope="module")
def derived(tmp_path_factory) -> cap.Facts:
    """Facts derived afresh from the installed converter and model builder (``capabilities write`` in its
    own process), next to the installed architectures.json."""
    d = tmp_path_factory.mktemp("facts")
    proc = subprocess.run([sys.executable, "-m", "qatforge.capabilities", "write", "--gguf-dir", str(d),
                           "--onnx-dir", str(d)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copy2(share_dir() / ARCHITECTURES, d / ARCHITECTURES)
    return cap.installed_facts(d, d)


@pytest.fixture(scope="module")
def installed() -> cap.Facts:
    """The venv's own facts, which snakemake reads at parse time."""
    facts = cap.installed_facts()
    if facts.sentencepiece is None or facts.onnx_architectures is None:
        pytest.fail("the capability facts are not installed: run `make install` "
                    "(or `python -m qatforge.capabilities write`)")
    return facts


def _cfg(base: Path, mode: str = "error") -> dict:
    import yaml
    from snakemake.utils import validate

    c = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate(c, str(ROOT / "config" / "schema.yaml"))
    c["model"]["base"], c["model"]["name"] = str(base), None
    c["formats"]["on_unsupported"] = mode
    return c


# --------------------------------------------------------------------------------------------
# the facts
# --------------------------------------------------------------------------------------------
def test_sentencepiece_architectures_come_from_the_converter(derived):
    """Verified against llama.cpp's set_vocab code: Phi-3 reads tokenizer.model directly (Phi-4's
    GPT2Tokenizer excepted), Gemma / Gemma-2 call _set_vocab_sentencepiece unguarded; Llama and
    Qwen2/3 try SentencePiece and fall back to tokenizer.json, Gemma-3 only reads it when present."""
    spm = derived.sentencepiece
    assert spm["Phi3ForCausalLM"] == {"class": "Phi3MiniModel", "unless_tokenizer_class": ["GPT2Tokenizer"]}
    assert spm["GemmaForCausalLM"]["class"] == "GemmaModel" and spm["Gemma2ForCausalLM"]["class"] == "Gemma2Model"
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"):
        assert arch not in spm
    # the ONNX facts are the builder's own dispatch on config.json's first architecture
    assert {"Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
            "Qwen3_5ForConditionalGeneration", "Gemma4ForConditionalGeneration",
            "Mistral3ForConditionalGeneration"} <= derived.onnx_architectures
    assert "Qwen3MoeForCausalLM" not in derived.onnx_architectures
    assert derived.onnx_tool.startswith("onnxruntime-genai ")


@pytest.mark.parametrize("source, expected", [
    ("def set_vocab(self):\n    self._set_vocab_sentencepiece()\n", ("required", [])),
    ("def set_vocab(self):\n    try:\n        self._set_vocab_sentencepiece()\n"
     "    except FileNotFoundError:\n        self._set_vocab_gpt2()\n", ("optional", [])),
    ("def set_vocab(self):\n    if (self.dir_model / 'tokenizer.model').is_file():\n"
     "        self._set_vocab_sentencepiece()\n    else:\n        self._set_vocab_gpt2()\n", ("optional", [])),
    ("""
     def set_vocab(self):
         if cfg.is_file():
             tokenizer_class = json.load(open(cfg))['tokenizer_class']
             if tokenizer_class == 'GPT2Tokenizer':
                 return self._set_vocab_gpt2()
         path = self.dir_model / 'tokenizer.model'
         if not path.is_file():
             raise ValueError(path)
     """, ("required", ["GPT2Tokenizer"])),
    ("def set_vocab(self):\n    p = self.dir_model / 'tokenizer.model'\n    if not p.is_file():\n"
     "        p = self.dir_model / 'spiece.model'\n", ("optional", [])),
    ("def set_vocab(self):\n    if self.is_mistral_format:\n        return self._set_vocab_mistral()\n"
     "    self._set_vocab_sentencepiece()\n", ("unknown", [])),
    ("def set_vocab(self):\n    self._set_vocab_gpt2()\n    self._set_vocab_sentencepiece()\n", ("none", [])),
])
def test_set_vocab_requirement(source, expected):
    assert set_vocab_requirement([textwrap.dedent(source)]) == expected


def test_set_vocab_requirement_follows_super():
    child = "def set_vocab(self):\n    super().set_vocab()\n"
    assert set_vocab_requirement([child, "def set_vocab(self):\n    self._set_vocab_sentencepiece()\n"]) \
        == ("required", [])
    assert set_vocab_requirement([child, "def set_vocab(self):\n    self._set_vocab_gpt2()\n"]) == ("none", [])


def test_absent_or_stale_facts_mean_not_checked(replicas, derived, tmp_path):
    """An existing venv without the JSONs (or an ONNX one of another onnxruntime-genai) checks nothing
    it has no fact for."""
    none = cap.installed_facts(tmp_path / "empty", tmp_path / "empty")
    assert none.architectures is none.sentencepiece is none.onnx_architectures is None
    for name in ("phi3-nospm", "qwen3-moe"):
        assert cap.unsupported(cap.base_info(_cfg(replicas[name])), none) == {}
    stale = tmp_path / "stale"
    stale.mkdir()
    onnx = {"versions": {"onnxruntime-genai": "0.0.1"}, "architectures": []}
    (stale / cap.ONNX_JSON).write_text(json.dumps(onnx))
    assert cap.installed_facts(stale, stale).onnx_architectures is None


# --------------------------------------------------------------------------------------------
# GGUF and ONNX per base
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_replica_is_supported(replicas, derived, name):
    info = cap.base_info(_cfg(replicas[name]))
    assert info.architectures == (FAMILY_ARCHS[name],)
    assert set(cap.unsupported(info, derived)) == FAMILY_REFUSED.get(name, set())


def test_phi3_without_tokenizer_model_is_refused_for_gguf(replicas, derived, tmp_path):
    reason = cap.unsupported(cap.base_info(_cfg(replicas["phi3-nospm"])), derived)
    assert list(reason) == ["gguf"]
    assert "phi3 (Phi3ForCausalLM)" in reason["gguf"] and "tokenizer.model" in reason["gguf"]
    assert "Phi3MiniModel.set_vocab" in reason["gguf"]
    # Phi-4's GPT2Tokenizer takes the converter's tokenizer.json path: not refused
    phi4 = tmp_path / "phi4"
    shutil.copytree(replicas["phi3-nospm"], phi4)
    tc = phi4 / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "tokenizer_class": "GPT2Tokenizer"}))
    assert cap.unsupported(cap.base_info(_cfg(phi4)), derived) == {}


def test_base_without_tokenizer_files_is_refused_for_gguf(replicas, derived):
    reason = cap.unsupported(cap.base_info(_cfg(replicas["qwen3-notok"])), derived)
    assert "qwen3 (Qwen3ForCausalLM)" in reason["gguf"] and "no tokenizer.json, no tokenizer.model" in reason["gguf"]


def test_architecture_the_builder_lacks_is_refused_for_onnx(replicas, derived):
    reason = cap.unsupported(cap.base_info(_cfg(replicas["qwen3-moe"])), derived)
    assert list(reason) == ["onnx"]
    assert "no exporter for Qwen3MoeForCausalLM" in reason["onnx"] and derived.onnx_tool in reason["onnx"]
    # the pure function on a fake list: Phi3ForCausalLM is not in it
    fake = cap.Facts(architectures=None, sentencepiece=None, onnx_architectures=frozenset({"LlamaForCausalLM"}),
                     onnx_tool="x 1")
    assert "Phi3ForCausalLM" in cap.unsupported(cap.base_info(_cfg(replicas["phi3"])), fake)["onnx"]


def test_builtin_and_hub_bases_are_not_checked_here():
    assert qcfg.skipped_formats({**_cfg(Path("x"), "skip"), "model": {"base": "builtin:tiny-qwen3"}}) == {}
    assert cap.unsupported_formats({"model": {"base": "Qwen/Qwen3-0.6B"}}) == {}


# --------------------------------------------------------------------------------------------
# formats.on_unsupported
# --------------------------------------------------------------------------------------------
def test_error_lists_each_unsupported_format(replicas, installed, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(replicas["phi3-nospm"], both)
    cfg_path = both / "config.json"
    # the builder dispatches on the first architecture (one it lacks), the converter on any it has
    archs = ["Phi3ForTokenClassification", "Phi3ForCausalLM"]
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "architectures": archs}))
    with pytest.raises(qcfg.ConfigError) as e:
        qcfg.check(_cfg(both), ROOT)
    msg = str(e.value)
    assert "model.base: no gguf export: phi3 (Phi3ForTokenClassification, Phi3ForCausalLM)" in msg
    assert "tokenizer.model" in msg
    assert "model.base: no onnx export" in msg and "no exporter for Phi3ForTokenClassification" in msg
    assert msg.count("formats.on_unsupported: error") == 2


def test_skip_drops_the_formats_from_every_artifact_list(replicas, installed):
    c = _cfg(replicas["phi3-nospm"], "skip")
    with pytest.raises(qcfg.ConfigError, match=r"runs\.qat-gguf-q4_0\.qat_scheme: 'gguf-q4_0' trains for GGUF"):
        qcfg.check(c, ROOT)
    del c["runs"]["qat-gguf-q4_0"]
    qcfg.check(c, ROOT)
    assert list(qcfg.skipped_formats(c, ROOT)) == ["gguf"]
    arts = qcfg.artifacts(c, ROOT)
    assert not [a for a in arts if a[1] == "gguf"] and ("baseline", "onnx", "fp32") in arts
    assert qcfg.modelfile_quant(c, "baseline", ROOT) is None
    assert len(qcfg.artifacts(_cfg(replicas["phi3"], "skip"), ROOT)) == len(qcfg.artifacts(_cfg(replicas["phi3"])))


def _project(tmp_path: Path, base: Path, mode: str, drop_gguf_run: bool, drop_onnx_run: bool = False) -> Path:
    work = copy_project(tmp_path / "p")
    c = read_config(work)
    c["model"].update(base=str(base), name=None)
    c["formats"] = {"on_unsupported": mode}
    if drop_gguf_run:
        del c["runs"]["qat-gguf-q4_0"]
    if drop_onnx_run:
        del c["runs"]["qat-onnx-int4"]
    write_config(work, c)
    return work


def test_snakemake_fails_in_seconds_naming_the_missing_piece(replicas, installed, tmp_path):
    work = _project(tmp_path, replicas["phi3-nospm"], "error", drop_gguf_run=False)
    t0 = time.monotonic()
    proc = snakemake(work, "-n", "--cores", "1", check=False, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - t0 < 30
    out = proc.stdout + proc.stderr
    assert "model.base: no gguf export: phi3 (Phi3ForCausalLM)" in out and "tokenizer.model" in out


def test_snakemake_skip_plans_no_gguf_jobs(replicas, installed, tmp_path):
    work = _project(tmp_path, replicas["phi3-nospm"], "skip", drop_gguf_run=True)
    proc = snakemake(work, "-n", "--cores", "1", timeout=120)
    jobs = {line.split()[0] for line in proc.stdout.split("Job stats:")[1].split("total")[0].splitlines()[3:]
            if line.strip()}
    assert {"build_base", "train", "torchao_ptq", "onnx_export", "report"} <= jobs
    assert not {j for j in jobs if j.startswith("gguf") or j == "ollama_modelfile"}
    # and ONNX too for a base the ONNX model builder cannot build; the ONNX-targeted QAT run, whose
    # only file that is, is refused at parse time, naming the run
    work = _project(tmp_path / "u", replicas["qwen3-moe"], "skip", drop_gguf_run=False)
    proc = snakemake(work, "-n", "--cores", "1", check=False, timeout=120)
    assert proc.returncode != 0
    assert "runs.qat-onnx-int4.qat_scheme: 'onnx-int4' trains for ONNX, which formats.on_unsupported: skip " \
           "leaves out for this base" in proc.stdout + proc.stderr
    work = _project(tmp_path / "v", replicas["qwen3-moe"], "skip", drop_gguf_run=False, drop_onnx_run=True)
    proc = snakemake(work, "-n", "--cores", "1", timeout=120)
    assert "onnx_export" not in proc.stdout and "gguf_convert" in proc.stdout


def test_report_lists_the_skipped_formats(tmp_path):
    import polars as pl

    from qatforge import report
    from test_report import _row

    rows = [_row("baseline", None, "hf", "merged", 8.0, 90, 0.50, kld=0.0, seed=1),
            _row("baseline", None, "torchao", "int8", 4.0, 89, 0.51, kld=0.002, seed=3)]
    paths = []
    for r in rows:
        p = tmp_path / "eval" / f"{r['format']}-{r['variant']}.json"
        p.parent.mkdir(exist_ok=True)
        p.write_text(json.dumps(r))
        paths.append(p)
    skipped = {"gguf": "phi3 (Phi3ForCausalLM): no tokenizer.model", "onnx": "no export config"}
    out = tmp_path / "results"
    summary = report.build_report(paths, out / "report.csv", out / "report.md", out / "plots",
                                  accuracy_margin=0.05, skipped=skipped)
    md = (out / "report.md").read_text()
    assert "## Skipped formats" in md
    assert "- **gguf** (and the Ollama Modelfile): phi3 (Phi3ForCausalLM): no tokenizer.model" in md
    assert "- **onnx**: no export config" in md and "gguf skipped for this base" in md
    assert set(pl.read_csv(out / "report.csv")["format"]) == {"hf", "torchao"} and summary["skipped"] == skipped
    report.build_report(paths, out / "r2.csv", out / "r2.md", out / "plots2", accuracy_margin=0.05)
    assert "Skipped formats" not in (out / "r2.md").read_text()


# --------------------------------------------------------------------------------------------
# TorchAO: the build_base job's count on the meta device (capabilities.torchao)
# --------------------------------------------------------------------------------------------
USES = [("torchao.schemes", "int8-int4"), ("torchao.schemes", "int8"), ("runs.q.qat_scheme", "int4-w32")]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_torchao_scheme_finds_modules_in_every_replica(replicas, name):
    counts = check_torchao_schemes(replicas[name], USES)
    assert set(counts) == {"int8-int4", "int8", "int4-w32"} and min(counts.values()) > 0
    # int8-int4 also quantizes the input embedding: an nn.Embedding exactly (qatforge.qat's filter), which
    # Gemma's scaled embeddings (Gemma3TextScaledWordEmbedding, Gemma 4's, subclasses) are not
    assert counts["int8-int4"] == counts["int8"] + (name not in ("gemma3", "gemma4"))


def test_a_scheme_matching_no_module_is_refused_naming_key_scheme_and_family(replicas):
    with pytest.raises(qcfg.ConfigError) as e:  # group 4096 > every in_features of the replica
        check_torchao_schemes(replicas["phi3"], [*USES, ("runs.wide.qat_scheme", "int4-w4096")])
    assert "runs.wide.qat_scheme: torchao scheme 'int4-w4096' quantizes no module of phi3 (Phi3ForCausalLM)" \
        in str(e.value) and "group size 4096" in str(e.value)


def test_meta_count_is_what_torchao_quantizes(replicas):
    """The count on the meta device equals the modules quantize_for_deploy really quantizes."""
    import torch
    from transformers import AutoModelForCausalLM

    from qatforge.export.torchao import quantize_for_deploy

    counts = check_torchao_schemes(replicas["qwen3"], USES[:2])
    for scheme in ("int8-int4", "int8"):
        model = AutoModelForCausalLM.from_pretrained(replicas["qwen3"], dtype=torch.float32)
        assert len(quantize_for_deploy(model, scheme)["modules"]) == counts[scheme]


def test_build_base_records_the_counts_and_fails_before_copying(replicas, tmp_path):
    from qatforge.base import build

    out = tmp_path / "base"
    kwargs = dict(builtin={}, seed=0, log=lambda _: None)
    with pytest.raises(qcfg.ConfigError, match="int4-w4096"):
        build(str(replicas["qwen3"]), out, torchao_schemes=[("torchao.schemes", "int4-w4096")], **kwargs)
    assert not out.exists()
    build(str(replicas["qwen3"]), out, torchao_schemes=USES[:2], **kwargs)
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["provenance"]["torchao_modules"]) == {"int8-int4", "int8"}
    # copied in the dtype it is stored in (the replica is bf16), tensor for tensor
    import torch
    from safetensors.torch import load_file

    want, got = load_file(str(replicas["qwen3"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (v.dtype, v.shape) for k, v in want.items()}
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert qcfg.torchao_scheme_uses(_cfg(replicas["qwen3"])) == [
        ("torchao.schemes", "int8-int4"), ("torchao.schemes", "int8"), ("runs.qat-int8-int4.qat_scheme", "int8-int4")]

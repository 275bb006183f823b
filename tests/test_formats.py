"""The format registry: lookups, the records' named modules, the results layout, a new record."""

import importlib.util

import pytest
import yaml
from snakemake.utils import validate

from conftest import ROOT
from qatforge import parity
from qatforge.spec import config as qcfg
from qatforge.spec import formats
from qatforge.spec.capabilities import BaseInfo, Facts, unsupported
from qatforge.spec.formats import FORMATS, Format, artifact_path, lookup, merged_dir, run_dir


@pytest.fixture
def cfg():
    c = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate(c, str(ROOT / "config" / "schema.yaml"))
    return c


def test_unknown_format_is_an_error_naming_it():
    for call in (lambda: lookup("tflite"), lambda: artifact_path("r", "tflite", "x"),
                 lambda: parity.thresholds_for("tflite", "x")):
        with pytest.raises(ValueError, match="unknown format 'tflite'; known: hf, torchao, gguf, onnx"):
            call()


def test_records_name_existing_modules_and_complete_tables():
    for f in FORMATS.values():
        assert importlib.util.find_spec(f.exporter) and importlib.util.find_spec(f.runtime), f.name
        assert f.support is None or callable(formats.resolve(f.support))
        assert "default" in f.thresholds and f.eval_mem_mb > 0
    labels = [f.label for f in FORMATS.values() if f.label]
    assert len(labels) == len(set(labels))


def test_layout(cfg):
    assert merged_dir("{run}") == run_dir("{run}", "merged") == "results/runs/{run}/merged"
    assert artifact_path("b", "hf", "base") == formats.BASE_DIR == "results/base"
    assert artifact_path("b", "torchao", "int8") == "results/runs/b/torchao/int8"
    assert artifact_path("q", "torchao", "int8", qat=True) == "results/runs/q/qat_converted"
    assert artifact_path("q", "gguf", "Q4_0", model="M", qat=True) == "results/runs/q/gguf/M-Q4_0.gguf"
    assert artifact_path("b", "onnx", "int8") == "results/runs/b/onnx/int8"
    assert qcfg.run_base(cfg, "qat-int8-int4") == merged_dir("baseline")


def test_a_new_record_is_all_config_paths_and_parity_need(cfg, monkeypatch):
    tflite = Format(name="tflite", variants=lambda config, scheme: [] if scheme else ["int8"],
                    path="{run_dir}/tflite/{variant}.tflite", exporter="x", runtime="y", eval_mem_mb=1000,
                    thresholds={"default": {"kld_mean": 0.1}}, support="qatforge.spec.capabilities:onnx_reason")
    monkeypatch.setitem(FORMATS, "tflite", tflite)
    assert ("baseline", "tflite", "int8") in qcfg.artifacts(cfg)
    assert not [a for a in qcfg.artifacts(cfg) if a[0] != "baseline" and a[1] == "tflite"]  # formats: matched
    assert artifact_path("baseline", "tflite", "int8") == "results/runs/baseline/tflite/int8.tflite"
    assert parity.thresholds_for("tflite", "int8") == {"kld_mean": 0.1}
    info = BaseInfo(("Phi3ForCausalLM",), "phi3", None, frozenset({"tokenizer.json"}))
    assert set(unsupported(info, Facts(None, None, onnx_architectures=frozenset()))) == {"onnx", "tflite"}


def test_baseline_run_is_the_first_run_without_a_scheme(cfg):
    cfg["runs"] = {"zeta": {"qat_scheme": None}, "alpha": {"qat_scheme": None}, **cfg["runs"]}
    assert qcfg.baseline_run(cfg) == "zeta"
    assert qcfg.comparison_baseline(cfg, "qat-int8-int4") == "baseline"  # its teacher
    del cfg["runs"]["qat-int8-int4"]["qat"]["distill_from"]
    assert qcfg.comparison_baseline(cfg, "qat-int8-int4") == "zeta"
    assert [a for a in qcfg.artifacts(cfg) if a[1:] == formats.BASE_ARTIFACT] == [("zeta", "hf", "base")]

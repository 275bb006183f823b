# Helpers shared by the rules: config slices per wildcard, wildcard constraints, targets.
# Parse-time only: nothing here imports torch, transformers or llama_cpp.
import re

from qatforge import config as qcfg
from qatforge.qat_schemes import detect_cuda_capability

qcfg.check(config, workflow.basedir, cuda_capability=detect_cuda_capability())

MODEL = config["model"]["name"]
OUTTYPE = qcfg.outtype_name(config)
RUNS = qcfg.runs(config)
QUANTS = list(config["gguf"]["quants"])


def _alt(names):
    """A wildcard regex matching exactly these names (never a path separator)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


wildcard_constraints:
    run=_alt(RUNS),
    quant=_alt(QUANTS),
    gguf_variant=_alt(QUANTS + [OUTTYPE]),
    scheme=_alt(sorted({s for r in RUNS for s in qcfg.torchao_variants(config, r)})),
    onnx_variant=_alt(config["onnx"]["variants"]),


def run_dir(run):
    return f"results/runs/{run}"


def qat_scheme(wildcards):
    return qcfg.qat_scheme(config, wildcards.run)


def train_settings(wildcards):
    return qcfg.train_settings(config, wildcards.run)


def quant_settings(wildcards):
    return config["gguf"]["quants"][wildcards.quant]


def gguf_file(run, variant):
    return f"results/runs/{run}/gguf/{MODEL}-{variant}.gguf"


def artifact_path(run, fmt, variant):
    """Where the artifact of (run, format, variant) lives."""
    if fmt == "hf":
        return f"results/runs/{run}/merged"
    if fmt == "torchao":
        if qcfg.qat_scheme(config, run) is not None:
            return f"results/runs/{run}/qat_converted"
        return f"results/runs/{run}/torchao/{variant}"
    if fmt == "gguf":
        return gguf_file(run, variant)
    return f"results/runs/{run}/onnx/{variant}"


def eval_json(run, fmt, variant):
    return f"results/eval/{run}/{fmt}/{variant}.json"


def eval_jsons():
    return [eval_json(*a) for a in qcfg.artifacts(config)]


def all_targets():
    targets = ["results/report.csv", "results/report.md"]
    targets += [f"results/runs/{r}/gguf/Modelfile" for r in RUNS]
    if config["report"]["fail_on_parity"]:
        targets.append("results/parity.ok")
    return targets


def thresholds(fmt):
    """The report.thresholds slice of one artifact: {fmt: {variant or 'default': {...}}}."""

    def get(wildcards):
        table = config["report"].get("thresholds", {}).get(fmt, {})
        variant = getattr(wildcards, "gguf_variant", None) or getattr(wildcards, "scheme", None)
        variant = variant or getattr(wildcards, "onnx_variant", None) or "merged"
        key = next((k for k in table if k.lower() == variant.lower()), "default")
        return {fmt: {key: table[key]}} if key in table else {}

    return get


def maybe_temp(path):
    """temp() for the unquantized GGUF when gguf.keep_intermediate is false."""
    return path if config["gguf"]["keep_intermediate"] else temp(path)


def quantize_inputs(wildcards):
    """The unquantized GGUF, plus the run's imatrix when the quant asks for one."""
    inputs = {"gguf": gguf_file(wildcards.run, OUTTYPE)}
    if config["gguf"]["quants"][wildcards.quant].get("imatrix"):
        inputs["imatrix"] = f"results/runs/{wildcards.run}/gguf/imatrix.gguf"
    return inputs

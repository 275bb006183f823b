# Helpers shared by the rules: config slices per wildcard, wildcard constraints, targets.
# Parse-time only: nothing here imports torch, transformers or llama_cpp.
import os
import re

from qatforge.spec import config as qcfg
from qatforge.spec.checkpoint import SCALES_FILE
from qatforge.spec.config import sorted_keys
from qatforge.spec.formats import BASE_DIR, FORMATS, artifact_path, is_deployment_artifact, lookup, merged_dir, run_dir
from qatforge.spec.schemes import detect_cuda_capability

qcfg.check(config, workflow.basedir, cuda_capability=detect_cuda_capability())

MODEL = qcfg.model_name(config, workflow.basedir)
OUTTYPE = qcfg.outtype_name(config)
RUNS = qcfg.runs(config)
QUANTS = list(config["gguf"]["quants"])
# Every evaluated artifact as (run, format, variant): the only combinations `evaluate` accepts.
# Formats the base cannot be exported to are absent under formats.on_unsupported: skip (SKIPPED,
# {format: reason}, which the report lists).
ARTIFACT_LIST = qcfg.artifacts(config, workflow.basedir)
ARTIFACTS = frozenset(ARTIFACT_LIST)
SKIPPED = qcfg.skipped_formats(config, workflow.basedir)


def _alt(names):
    """A wildcard regex matching exactly these names (never a path separator)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


wildcard_constraints:
    run=_alt(RUNS),
    quant=_alt(QUANTS),
    format=_alt(FORMATS),
    variant=_alt(sorted({v for _, _, v in ARTIFACTS})),


def qat_scheme(wildcards):
    return qcfg.qat_scheme(config, wildcards.run)


def baseline_reference(wildcards):
    """A QAT run's artifacts are also measured against the baseline merged model (its reference)."""
    b = qcfg.comparison_baseline(config, wildcards.run)
    return run_dir(b, "reference") if b else []


def run_base(wildcards):
    """results/base, or the teacher's merged model for a distilled QAT run (a DAG edge)."""
    return qcfg.run_base(config, wildcards.run)


# Params that are dicts (or built from config dicts) go through sorted_keys(): Snakemake compares
# params by repr, so config key order must not show in them. Scalar params need nothing.
# The settings leave out threads, a resource (run_threads): the trained weights were the same bytes
# at 1 and 2 threads (measured on the default build), so changing them reruns nothing.
def train_settings(wildcards):
    return sorted_keys(qcfg.train_settings(config, wildcards.run))


def run_threads(wildcards):
    return qcfg.run_threads(config, wildcards.run)


def quant_settings(wildcards):
    return sorted_keys(config["gguf"]["quants"][wildcards.quant])


def gguf_file(run, variant):
    return artifact_path(run, "gguf", variant, model=MODEL)


def eval_artifact(wildcards):
    """The artifact an evaluation job reads; a (run, format, variant) that is none is an error."""
    key = (wildcards.run, wildcards.format, wildcards.variant)
    if key not in ARTIFACTS:
        raise ValueError(
            f"{eval_json(*key)}: run {key[0]!r} has no {key[1]} artifact {key[2]!r} in this config"
        )
    return artifact_path(*key, model=MODEL, qat=qcfg.qat_scheme(config, key[0]) is not None)


def eval_json(run, fmt, variant):
    return f"results/eval/{run}/{fmt}/{variant}.json"


def eval_jsons():
    return [eval_json(*a) for a in ARTIFACT_LIST]


def all_targets():
    targets = ["results/report.csv", "results/report.md"]
    targets += [f"results/runs/{r}/gguf/Modelfile" for r in RUNS
                if qcfg.modelfile_quant(config, r, workflow.basedir)]
    if config["report"]["fail_on_parity"]:
        targets.append("results/parity.ok")
    return targets


def thresholds(wildcards):
    """The report.thresholds slice of one artifact: {format: {variant or 'default': {...}}}."""
    fmt, variant = wildcards.format, wildcards.variant
    if not is_deployment_artifact(fmt, variant):  # not judged: no threshold edit reruns it
        return {}
    table = config["report"].get("thresholds", {}).get(fmt, {})
    if variant in table:
        key = variant
    else:  # case-insensitive match (sorted, so that key order cannot pick), else the default
        key = next((k for k in sorted(table) if k.lower() == variant.lower()), "default")
    return sorted_keys({fmt: {key: table[key]}}) if key in table else {}


def trained_quant(wildcards):
    """For the quant a GGUF-targeted QAT run ships: its scheme and LoRA targets (its types are checked)
    and, if it learned them, its block scales file (written into the file), else {}."""
    run = wildcards.run
    if qcfg.matched_gguf_quant(config, run) != wildcards.quant:
        return {}
    targets = qcfg.train_settings(config, run)["lora"]["target_modules"]
    trained = {"scheme": qcfg.qat_scheme(config, run),
               "targets": targets if isinstance(targets, str) else sorted(targets)}
    if qcfg.learned_block_scales(config, run):
        trained["block_scales"] = os.path.join(merged_dir(run), SCALES_FILE)
    return trained


def gguf_check_plan(wildcards):
    return sorted_keys(qcfg.gguf_check_plan(config))


def gguf_check(wildcards):
    """The base's GGUF check, which training waits for (ancient: its reruns retrain nothing); none
    when GGUF is skipped for this base."""
    return [] if "gguf" in SKIPPED else [ancient("results/checks/gguf.json")]


def maybe_temp(path):
    """temp() for the unquantized GGUF when gguf.keep_intermediate is false."""
    return path if config["gguf"]["keep_intermediate"] else temp(path)


def quantize_inputs(wildcards):
    """The unquantized GGUF, plus the run's imatrix when the quant asks for one, plus the merged
    checkpoint (its learned block scales) for the quant a run that learned them ships."""
    inputs = {"gguf": gguf_file(wildcards.run, OUTTYPE)}
    if config["gguf"]["quants"][wildcards.quant].get("imatrix"):
        inputs["imatrix"] = f"results/runs/{wildcards.run}/gguf/imatrix.gguf"
    run = wildcards.run
    if qcfg.learned_block_scales(config, run) and qcfg.matched_gguf_quant(config, run) == wildcards.quant:
        inputs["merged"] = merged_dir(run)
    return inputs


# ---- resources: each job's mem_mb/runtime from the base's size and the eval sizes, gpu from
# resources.gpu (qatforge.spec.resources; the slopes table bench/resource_slopes.json).
from snakemake.logging import logger

from qatforge.spec import resources as qres

qres.check_config(config)
_SLOPES = os.path.join(workflow.basedir, "bench", "resource_slopes.json")
RESOURCE_TABLE = qres.load_table(_SLOPES if os.path.isfile(_SLOPES) else qres.SLOPES_FILE)
MODEL_SIZE = qres.model_size(config, workflow.basedir)
if MODEL_SIZE.source == "fallback":
    logger.warning(f"model.base {config['model']['base']!r}: parameter count unknown at parse time (not "
                   f"local, built or in the HF cache); jobs are sized for {qres.FALLBACK_PARAMS:.0e} "
                   "parameters: set resources.params")


def rule_resources(name):
    """Resources of the `name` rule, per job (its `resources:`): mem_mb and runtime (growing with
    Snakemake's attempt), plus gpu/gpu_model when resources.gpu is set and the rule can use one."""

    def field(key):
        def get(wildcards, attempt):
            return getattr(qres.request(name, config, MODEL_SIZE, RESOURCE_TABLE, dict(wildcards.items()), attempt), key)

        return get

    out = {"mem_mb": field("mem_mb"), "runtime": field("runtime")}
    if config["resources"]["gpu"] and name in qres.GPU_RULES:
        out["gpu"] = field("gpu")
        model = config["resources"]["gpu_model"]
        if model:  # only on jobs that get a GPU (the SLURM plugin would ask for <model>:0)
            out["gpu_model"] = lambda wildcards: model if qres.gpu_count(name, config, dict(wildcards.items())) else ""
    return out

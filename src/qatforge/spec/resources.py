"""Each job's SLURM resources (``mem_mb``, ``runtime``, ``gpu``) from the base's size and the eval sizes.

Standard library only: ``rules/common.smk`` calls it at Snakefile parse time. The base's parameter
count comes from :func:`model_size` (shapes and headers, no weights read); the per-rule slopes from a
JSON table, ``bench/resource_slopes.json`` (:data:`SLOPES_FILE`), which ``make bench`` rewrites
(:func:`fit` turns one measurement into a record). One job's request::

    bf16_mib   = params * 2 / 2**20                          # the base's weights in bf16
    logits_mib = rows * tokens * vocab * 4 / 2**20           # fp32 logits held at once
    mem_mb     = max(floor_mb, format floor, mem_headroom * (fixed_mb + mem_x_bf16 * bf16_mib
                                                             + mem_x_logits * logits_mib))
    runtime    = max(floor_min, runtime_headroom * (fixed_min + min_per_bparam * params / 1e9 * work
                                                    * (gpu_runtime_factor on a GPU, else thread_factor)))

each times ``retry_factor ** (attempt - 1)`` (Snakemake's ``attempt``, so a retry gets more), the
runtime capped at ``resources.max_runtime``; ``resources.rules.<rule>`` replaces either outright.
``rows`` and ``work`` follow the record's ``work``:

    job               work 1 (params only), no logits
    step              optimizer steps of 16 sequences: max_steps * batch_size * grad_accum / 16; rows = batch_size
    checkpoint_token  tokens generated over the candidates: candidates * n_prompts * max_new_tokens; rows = batch_size
                      (candidates = ceil(max_steps / save_steps), + 1 for step 0 of a distilled run)
    token             tokens generated: (n_prompts + n_nll + speed_prompts * speed_repeats) * max_new_tokens
                      (reference: no speed prompts); logits: one conversation of data.max_tokens
                      (reference and evaluation hold one conversation's logits at a time, and the
                      reference's compact answer distributions, qatforge.answer_dists)

``tokens`` is the table's ``tokens_per_conversation`` capped at ``data.max_tokens``.
``thread_factor`` (CPU ``train``/``select_best`` jobs, which run on their run's ``train.threads``):
a kind measured on more threads than the job has takes that many times longer (linear, the safe
side); more threads than measured are not counted on to be faster.

The table's fields: ``measured`` (what the slopes were fitted on: base, params, vocab, machine, date
and the :class:`Load` of the measurement runs), ``mem_headroom``, ``runtime_headroom``, ``floor_mb``,
``floor_min``, ``retry_factor``, ``gpu_runtime_factor`` (GPU time / CPU time of the params term),
``tokens_per_conversation``, and ``kinds``: one record per rule kind (:data:`KIND_FIELDS`: fixed_mb,
mem_x_bf16, mem_x_logits, fixed_min, min_per_bparam, work; optional ``note``, and ``threads``,
the measured job's threads, which :func:`fit` records when its load has them). A kind is the rule's
name, or ``train_qat``/``select_best_qat`` for QAT runs, ``evaluate_<format>`` (else ``evaluate``),
``onnx_export_quantized`` for int4/int8 ONNX variants (:func:`kind_of`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from qatforge.spec.builtin import BUILTIN_PREFIX, TINY_QWEN3_SHAPE
from qatforge.spec.checkpoint import MANIFEST, safetensors_header
from qatforge.spec.formats import lookup

SLOPES_FILE = Path(__file__).resolve().parents[3] / "bench" / "resource_slopes.json"
KIND_FIELDS = ("fixed_mb", "mem_x_bf16", "mem_x_logits", "fixed_min", "min_per_bparam", "work")
TABLE_FIELDS = ("mem_headroom", "runtime_headroom", "floor_mb", "floor_min", "retry_factor",
                "gpu_runtime_factor", "tokens_per_conversation", "kinds")
WORKS = ("job", "step", "checkpoint_token", "token")
# Every rule with resources (the `resources.rules` override keys), and those a `resources.gpu`
# puts on a GPU (evaluate: formats evaluated by the HF runtime, see gpu_count).
RULES = ("prepare_data", "build_base", "gguf_check", "train", "select_best", "merge", "gguf_convert",
         "gguf_imatrix", "gguf_quantize", "ollama_modelfile", "torchao_ptq", "qat_convert", "onnx_export",
         "reference", "evaluate", "report", "parity_gate")
GPU_RULES = ("train", "select_best", "evaluate")
GPU_RUNTIME = "qatforge.evaluate.hf"
# A hub base that is neither in the HF cache nor given by resources.params is sized as this.
FALLBACK_PARAMS = 8e9
FALLBACK_VOCAB = 262_144
STEP_SEQUENCES = 16  # the sequences of one `step` work unit


class ResourceError(ValueError):
    """A bad slopes table or `resources` config entry (the message names the key)."""


# ---- the base's size -------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSize:
    params: int
    vocab: int
    source: str  # where the count came from (reported by the dry run's warning, tests)


def count_safetensors(directory: str | os.PathLike) -> int:
    """Parameters of a checkpoint: the element counts in its safetensors headers (no data read)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files")
    return sum(math.prod(t["shape"]) for f in files
               for name, t in safetensors_header(f)[0].items() if name != "__metadata__")


def _text_config(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    return cfg.get("text_config") or cfg


def params_from_hf_config(cfg: Mapping[str, Any]) -> int:
    """A decoder's parameter count from its ``config.json`` (llama-like layers: attention, gated
    MLP, two norms; embeddings, untied head unless tied); the fallback when no safetensors exist."""
    c = _text_config(cfg)
    try:
        hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        inter = c.get("intermediate_size") or 4 * hidden
    except KeyError as e:
        raise ResourceError(f"config.json has no {e.args[0]}: set resources.params") from None
    heads = c.get("num_attention_heads") or 1
    head_dim = c.get("head_dim") or hidden // heads
    kv = c.get("num_key_value_heads") or heads
    attn = hidden * head_dim * (2 * heads + 2 * kv) + (2 * head_dim if c.get("model_type") in ("qwen3",) else 0)
    layer = attn + 3 * hidden * inter + 2 * hidden
    tied = c.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
    return int(layers * layer + vocab * hidden * (1 if tied else 2) + hidden)


def builtin_config(builtin: Mapping[str, Any]) -> dict[str, Any]:
    """The builtin tiny Qwen3's ``config.json`` shape (:data:`~qatforge.spec.builtin.TINY_QWEN3_SHAPE`)."""
    d = TINY_QWEN3_SHAPE
    return {"model_type": "qwen3", "hidden_size": d["hidden"], "intermediate_size": d["intermediate"],
            "num_hidden_layers": d["layers"], "num_attention_heads": d["heads"],
            "num_key_value_heads": d["kv_heads"], "head_dim": d["head_dim"],
            "vocab_size": builtin.get("vocab_size", 1024), "tie_word_embeddings": False}


def _hub_snapshot(repo_id: str) -> Path | None:
    """The HF hub cache's snapshot of ``repo_id`` (refs/main, else any), if it was downloaded."""
    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub"
    root = Path(hub) / ("models--" + repo_id.replace("/", "--"))
    ref = root / "refs" / "main"
    if ref.is_file() and (root / "snapshots" / ref.read_text().strip() / "config.json").is_file():
        return root / "snapshots" / ref.read_text().strip()
    return next((s for s in sorted((root / "snapshots").glob("*")) if (s / "config.json").is_file()), None)


def _built_from(built: Path, base: str) -> Path | None:
    """``results/base`` if build_base built it from ``base`` (its manifest's source), else None."""
    try:
        return built if json.loads((built / MANIFEST).read_text())["provenance"]["source"] == base else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def size_of_dir(path: Path, source: str) -> ModelSize:
    """Parameters (safetensors headers, else config.json) and vocabulary of a checkpoint directory."""
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    try:
        params = count_safetensors(path)
    except FileNotFoundError:
        if not cfg:
            raise ResourceError(f"{path}: neither safetensors nor config.json; set resources.params") from None
        params = params_from_hf_config(cfg)
    return ModelSize(params, int(_text_config(cfg).get("vocab_size") or FALLBACK_VOCAB), source)


def model_size(config: Mapping[str, Any], workdir: str | os.PathLike = ".") -> ModelSize:
    """The base's size: ``resources.params`` (vocabulary as found), else the first that applies: the
    builtin's shape; a local directory; ``results/base`` when built from this base; the HF hub
    cache; else :data:`FALLBACK_PARAMS` (source ``fallback``: the caller warns)."""
    from qatforge.spec.formats import BASE_DIR

    base = config["model"]["base"]
    explicit = (config.get("resources") or {}).get("params")
    if base.startswith(BUILTIN_PREFIX):
        found = ModelSize(params_from_hf_config(builtin_config(config["model"].get("builtin") or {})),
                          (config["model"].get("builtin") or {}).get("vocab_size", 1024), "builtin shape")
    else:
        found = None
        local = Path(base).expanduser()
        local = local if local.is_absolute() else Path(workdir) / local
        for path, source in ((local, f"{base}: safetensors headers"),
                             (_built_from(Path(workdir) / BASE_DIR, base), f"{BASE_DIR}: safetensors headers"),
                             (_hub_snapshot(base) if base.count("/") == 1 else None, f"{base}: HF cache")):
            if path is not None and path.is_dir() and (any(path.glob("*.safetensors")) or (path / "config.json").is_file()):
                found = size_of_dir(path, source)
                break
    if explicit:
        return ModelSize(int(explicit), found.vocab if found else FALLBACK_VOCAB, "resources.params")
    return found or ModelSize(int(FALLBACK_PARAMS), FALLBACK_VOCAB, "fallback")


# ---- the table -------------------------------------------------------------------------------

def check_table(table: Mapping[str, Any], where: str = "slopes table") -> dict[str, Any]:
    """The table, checked: every field present, every kind complete with a known ``work``."""
    missing = [f for f in TABLE_FIELDS if f not in table]
    if missing:
        raise ResourceError(f"{where}: missing {', '.join(missing)}")
    for kind, rec in table["kinds"].items():
        lack = [f for f in KIND_FIELDS if f not in rec]
        if lack:
            raise ResourceError(f"{where}: kinds.{kind} lacks {', '.join(lack)}")
        if rec["work"] not in WORKS:
            raise ResourceError(f"{where}: kinds.{kind}.work is {rec['work']!r}; one of {', '.join(WORKS)}")
    absent = [r for r in RULES if r not in table["kinds"]]
    if absent:
        raise ResourceError(f"{where}: no kinds record for rule(s) {', '.join(absent)}")
    return dict(table)


def load_table(path: str | os.PathLike = SLOPES_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ResourceError(f"resource slopes table {path} not found (make bench writes it)")
    return check_table(json.loads(path.read_text()), str(path))


# ---- one job ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Load:
    """What a job's cost scales with (a measurement's settings have the same shape)."""

    params: float
    vocab: int
    tokens: int = 64  # tokens per conversation
    steps: int = 0
    batch: int = 0
    accum: int = 1
    candidates: int = 0
    n_prompts: int = 0
    n_nll: int = 0
    max_new_tokens: int = 0
    speed: int = 0  # speed_prompts * speed_repeats
    max_len: int = 0  # data.max_tokens: the longest conversation scored
    threads: int = 0  # train/select_best: the run's train.threads (0: not thread-scaled)

    def work(self, work: str) -> float:
        return {"job": 1.0,
                "step": self.steps * self.batch * self.accum / STEP_SEQUENCES,
                "checkpoint_token": self.candidates * self.n_prompts * self.max_new_tokens,
                "token": (self.n_prompts + self.n_nll + self.speed) * self.max_new_tokens}[work]

    def logits_mib(self, work: str) -> float:
        if work == "token":
            return self.max_len * self.vocab * 4 / 2**20
        rows = {"job": 0, "step": self.batch, "checkpoint_token": self.batch}[work]
        return rows * self.tokens * self.vocab * 4 / 2**20

    @property
    def bf16_mib(self) -> float:
        return self.params * 2 / 2**20


def estimate(rec: Mapping[str, Any], load: Load, gpu_factor: float | None = None) -> tuple[float, float]:
    """(MiB, minutes) a job of this kind needs, before headroom, floors and retries; ``gpu_factor``
    scales the params term of the runtime on a GPU (the table's ``gpu_runtime_factor``), on a CPU
    :func:`thread_factor` does."""
    mem = rec["fixed_mb"] + rec["mem_x_bf16"] * load.bf16_mib + rec["mem_x_logits"] * load.logits_mib(rec["work"])
    minutes = rec["min_per_bparam"] * load.params / 1e9 * load.work(rec["work"])
    return mem, rec["fixed_min"] + minutes * (thread_factor(rec, load) if gpu_factor is None else gpu_factor)


def thread_factor(rec: Mapping[str, Any], load: Load) -> float:
    """How many times longer a job runs on ``load.threads`` than its kind's measurement on
    ``rec["threads"]``: linear below, 1 at or above (see the module docstring)."""
    measured = rec.get("threads", 0)
    return max(1.0, measured / load.threads) if measured and load.threads else 1.0


def fit(rec: Mapping[str, Any], load: Load, mem_mib: float, seconds: float) -> dict[str, Any]:
    """``rec`` with ``mem_x_bf16`` and ``min_per_bparam`` fitted to one measurement at ``load``:
    :func:`estimate` then gives the measured ``mem_mib`` (``fixed_mb`` and ``mem_x_logits`` kept)
    and the measured time plus ``fixed_min`` (start-up margin, the builtin's warm-up: not fitted)."""
    mem_rest = mem_mib - rec["fixed_mb"] - rec["mem_x_logits"] * load.logits_mib(rec["work"])
    scale = load.params / 1e9 * load.work(rec["work"])
    fitted = {k: v for k, v in rec.items() if k != "threads"} | {
        "mem_x_bf16": round(max(mem_rest, 0) / load.bf16_mib, 3),
        "min_per_bparam": round(seconds / 60 / scale, 6) if scale else 0.0}
    return fitted | {"threads": load.threads} if load.threads else fitted


def refit(table: Mapping[str, Any]) -> dict[str, Any]:
    """The table with every kind's slopes refitted (:func:`fit`) from ``measured.runs.<kind>``
    (``mem_mib``, ``seconds``, optional ``load`` overrides of ``measured.load``): what ``make bench``
    calls after recording its measurements."""
    m = table["measured"]
    kinds = dict(table["kinds"])
    for kind, run in m["runs"].items():
        if kind not in kinds:
            raise ResourceError(f"measured.runs.{kind}: no kinds.{kind} record to fit")
        kinds[kind] = fit(kinds[kind], Load(**{**m["load"], **run.get("load", {})}), run["mem_mib"], run["seconds"])
    return {**table, "kinds": kinds}


def kind_of(rule: str, config: Mapping[str, Any], wildcards: Mapping[str, str], kinds: Mapping[str, Any]) -> str:
    """The table record a job uses (see the module docstring)."""
    from qatforge.spec import config as qcfg

    if rule in ("train", "select_best") and qcfg.qat_scheme(config, wildcards["run"]) is not None:
        return f"{rule}_qat" if f"{rule}_qat" in kinds else rule
    if rule == "evaluate":
        return f"evaluate_{wildcards['format']}" if f"evaluate_{wildcards['format']}" in kinds else rule
    if rule == "onnx_export" and config["onnx"]["variants"][wildcards["variant"]]["precision"] != "fp32":
        return "onnx_export_quantized" if "onnx_export_quantized" in kinds else rule
    return rule


def job_load(rule: str, config: Mapping[str, Any], size: ModelSize, wildcards: Mapping[str, str],
             tokens_per_conversation: int) -> Load:
    """The :class:`Load` of one job from the config (and its run's training settings)."""
    from qatforge.spec import config as qcfg

    ev = config["eval"]
    load = Load(size.params, size.vocab, min(tokens_per_conversation, config["data"]["max_tokens"]),
                max_len=config["data"]["max_tokens"])
    if rule in ("train", "select_best"):
        t = qcfg.train_settings(config, wildcards["run"])
        candidates = math.ceil(t["max_steps"] / t["save_steps"]) + int(bool(t.get("distill")))
        load = replace(load, steps=t["max_steps"], batch=t["batch_size"], accum=t["grad_accum"],
                       candidates=candidates, n_prompts=ev["n_prompts"], max_new_tokens=ev["max_new_tokens"],
                       threads=qcfg.run_threads(config, wildcards["run"]))
    elif rule in ("reference", "evaluate"):
        load = replace(load, n_prompts=ev["n_prompts"], n_nll=ev["n_nll"], max_new_tokens=ev["max_new_tokens"],
                       speed=ev["speed_prompts"] * ev["speed_repeats"] if rule == "evaluate" else 0)
    return load


def gpu_count(rule: str, config: Mapping[str, Any], wildcards: Mapping[str, str]) -> int:
    """GPUs of one job: ``resources.gpu`` (true = 1) for train, select_best and the evaluation of
    formats the HF runtime evaluates (hf, torchao); 0 for every other job."""
    gpu = (config.get("resources") or {}).get("gpu") or 0
    n = 1 if gpu is True else int(gpu)
    if rule not in GPU_RULES or (rule == "evaluate" and lookup(wildcards["format"]).runtime != GPU_RUNTIME):
        return 0
    return n


@dataclass(frozen=True)
class Request:
    mem_mb: int
    runtime: int  # minutes
    gpu: int = 0
    kind: str = ""


def request(rule: str, config: Mapping[str, Any], size: ModelSize, table: Mapping[str, Any],
            wildcards: Mapping[str, str] | None = None, attempt: int = 1) -> Request:
    """What one job asks SLURM for (the module docstring's formula)."""
    wildcards = wildcards or {}
    res = config.get("resources") or {}
    kind = kind_of(rule, config, wildcards, table["kinds"])
    rec = table["kinds"][kind]
    gpus = gpu_count(rule, config, wildcards)
    mem, minutes = estimate(rec, job_load(rule, config, size, wildcards, table["tokens_per_conversation"]),
                            table["gpu_runtime_factor"] if gpus else None)
    grow = table["retry_factor"] ** (max(attempt, 1) - 1)
    floor_mb = max(table["floor_mb"], lookup(wildcards["format"]).eval_mem_mb if rule == "evaluate" else 0)
    mem_mb = math.ceil(max(floor_mb, table["mem_headroom"] * mem) * grow / 100) * 100
    runtime = math.ceil(max(table["floor_min"], table["runtime_headroom"] * minutes) * grow)
    if res.get("max_runtime"):
        runtime = min(runtime, res["max_runtime"])
    over = (res.get("rules") or {}).get(rule) or {}
    return Request(int(over.get("mem_mb", mem_mb)), int(over.get("runtime", runtime)), gpus, kind)


def check_config(config: Mapping[str, Any]) -> None:
    """The ``resources`` section's rule names exist (the schema checks the rest)."""
    unknown = sorted(set((config.get("resources") or {}).get("rules") or {}) - set(RULES))
    if unknown:
        raise ResourceError(f"resources.rules: no rule named {', '.join(unknown)}; rules: {', '.join(RULES)}")


def representative_jobs(config: Mapping[str, Any]) -> list[tuple[str, str, dict[str, str]]]:
    """(label, rule, wildcards): one job of every rule kind in ``config`` (for :func:`markdown`)."""
    from qatforge.spec import config as qcfg

    base, qat = qcfg.baseline_runs(config)[:1], qcfg.qat_runs(config)[:1]
    jobs = [(r, r, {}) for r in ("prepare_data", "build_base", "gguf_check")]
    for run in base + qat:
        tag = " (QAT)" if run in qat else ""
        jobs += [(f"{r}{tag}", r, {"run": run}) for r in ("train", "select_best")]
    run = (base + qat)[0]
    jobs += [(r, r, {"run": run}) for r in ("merge", "reference", "gguf_convert", "gguf_imatrix", "torchao_ptq")]
    jobs += [(f"gguf_quantize {q}", "gguf_quantize", {"run": run, "quant": q}) for q in list(config["gguf"]["quants"])[:1]]
    jobs += [("qat_convert", "qat_convert", {"run": r}) for r in qat]
    for quantized in (False, True):  # one fp32 variant, one quantized
        v = next((v for v, spec in config["onnx"]["variants"].items() if (spec["precision"] != "fp32") == quantized), None)
        jobs += [(f"onnx_export {v}", "onnx_export", {"run": run, "variant": v})] if v else []
    for fmt, variant in (("hf", "merged"), ("torchao", (config["torchao"]["schemes"] or ["int8"])[0]),
                         ("gguf", next(iter(config["gguf"]["quants"]), "Q8_0")), ("onnx", next(iter(config["onnx"]["variants"]), "fp32"))):
        jobs.append((f"evaluate {fmt}", "evaluate", {"run": run, "format": fmt, "variant": variant}))
    return jobs


def markdown(config: Mapping[str, Any], sizes: Mapping[str, ModelSize], table: Mapping[str, Any],
             gpu_only: bool = False) -> str:
    """A markdown table of what each kind of job requests (``mem_mb`` / minutes) at each size
    (``gpu_only``: the jobs that get a GPU)."""
    head = "| job | " + " | ".join(sizes) + " |\n| --- |" + " --- |" * len(sizes) + "\n"
    rows = []
    for label, rule, w in representative_jobs(config):
        if gpu_only and not gpu_count(rule, config, w):
            continue
        cells = [request(rule, config, s, table, w) for s in sizes.values()]
        rows.append(f"| {label} | " + " | ".join(f"{c.mem_mb:,} MB, {c.runtime:,} min" for c in cells) + " |")
    return head + "\n".join(rows) + "\n"

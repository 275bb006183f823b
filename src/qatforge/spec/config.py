"""Checks of a schema-validated config that JSON schema cannot express, and per-run slices.

Imported by the Snakefile at parse time: keep it free of torch/transformers/llama_cpp imports.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from qatforge.spec.builtin import BUILTIN_MODELS, BUILTIN_NAME, BUILTIN_PREFIX
from qatforge.spec.capabilities import unsupported_formats
from qatforge.spec.formats import BASE_ARTIFACT, BASE_DIR, FORMATS, MERGED_ARTIFACT, lookup, merged_dir, outtype_name
from qatforge.spec.llamacpp_paths import known_pre_tokenizers
from qatforge.spec.quant_types import check_quant

SAFE_NAME = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
TRAIN_KEYS = ("max_steps", "save_steps", "batch_size", "grad_accum", "lr", "lora")


class ConfigError(ValueError):
    """A config problem, with the offending key in the message."""


def model_name(config: dict, workdir: str | Path = ".") -> str:
    """``model.name``, or when unset a file-name-safe name from the base: ``TinyQwen3`` for the
    builtin, else its ``config.json`` ``_name_or_path`` (last component) or its directory / hub name."""
    if config["model"].get("name"):
        return config["model"]["name"]
    base = config["model"]["base"]
    if base.startswith(BUILTIN_PREFIX):
        return BUILTIN_NAME
    path = Path(base) if Path(base).is_absolute() else Path(workdir) / base
    raw = ""
    if (path / "config.json").is_file():
        raw = str(json.loads((path / "config.json").read_text()).get("_name_or_path") or "")
    raw = (raw or base).rstrip("/").replace("\\", "/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", raw).strip(".-")[:64] or "model"
    return name if SAFE_NAME.match(name) else "model"


def runs(config: dict) -> list[str]:
    return list(config["runs"])


def qat_scheme(config: dict, run: str) -> str | None:
    return config["runs"][run].get("qat_scheme")


def teacher(config: dict, run: str) -> str | None:
    """The run a QAT run distills from (its merged model is the run's base), or None."""
    return (config["runs"][run].get("qat") or {}).get("distill_from") if qat_scheme(config, run) else None


def comparison_baseline(config: dict, run: str) -> str | None:
    """The baseline run a QAT run's artifacts are compared with (recorded in their evaluation):
    its teacher, else :func:`baseline_run`."""
    if qat_scheme(config, run) is None:
        return None
    return teacher(config, run) or baseline_run(config)


def run_base(config: dict, run: str) -> str:
    """The base checkpoint a run's adapter trains on and merges into."""
    t = teacher(config, run)
    return merged_dir(t) if t else BASE_DIR


def baseline_runs(config: dict) -> list[str]:
    return [r for r in runs(config) if qat_scheme(config, r) is None]


def baseline_run(config: dict) -> str | None:
    """The baseline run: the first run without a QAT scheme (None without one). The report's
    baseline; the base model is evaluated as a row of it (``formats.BASE_ARTIFACT``), which is how
    the report knows it."""
    return next(iter(baseline_runs(config)), None)


def qat_runs(config: dict) -> list[str]:
    return [r for r in runs(config) if qat_scheme(config, r) is not None]


# Training options added after trees were built, with the default that behaves as before they existed.
LATER_OPTIONS = {"block_scales": "format", "sampling": "random"}


def train_settings(config: dict, run: str) -> dict[str, Any]:
    """The training settings of one run: ``train`` defaults with the run's overrides applied; not
    its threads (:func:`run_threads`), a resource: the weights do not depend on them."""
    base = copy.deepcopy(config["train"])
    over = config["runs"][run].get("train") or {}
    for key, value in over.items():
        if key == "lora":
            base["lora"] = {**base.get("lora", {}), **value}
        else:
            base[key] = value
    base.pop("select_metric", None)
    base.pop("threads", None)
    base["qat_scheme"] = qat_scheme(config, run)
    if base["qat_scheme"] is not None:  # runs.<run>.qat → TrainSettings (whose defaults fill the rest)
        q = config["runs"][run].get("qat") or {}
        base.update({"qat_mode" if k == "mode" else k: v for k, v in q.items() if k != "distill_from"})
        base["distill"] = teacher(config, run) is not None
    for key, default in LATER_OPTIONS.items():  # at their default: left out, so runs built before stay fresh
        if base.get(key) == default:
            del base[key]
    base["seed"] = config["seed"]
    return base


def run_threads(config: dict, run: str) -> int:
    """The threads of a run's train and select_best jobs: ``runs.<run>.train.threads``, else
    ``train.threads``."""
    return (config["runs"][run].get("train") or {}).get("threads", config["train"]["threads"])


def learned_block_scales(config: dict, run: str) -> bool:
    """Whether a QAT run learns its block scales (``runs.<run>.qat.block_scales: learned``)."""
    return qat_scheme(config, run) is not None and (config["runs"][run].get("qat") or {}).get(
        "block_scales", "format") == "learned"


def matched_gguf_quant(config: dict, run: str) -> str | None:
    """The GGUF quant a GGUF-targeted QAT run trained for (``gguf.quants.<type>``), else None."""
    from qatforge.spec.schemes import gguf_type

    scheme = qat_scheme(config, run)
    return gguf_type(scheme) if scheme else None


def gguf_check_plan(config: dict) -> dict[str, dict[str, Any]]:
    """What the ``gguf_check`` job checks of a GGUF-targeted QAT run on the base before training:
    ``{run: {"quant", "spec", "scheme", "targets"}}`` (the ``gguf.quants`` entry it ships as,
    without its unset options, and its LoRA targets)."""
    from qatforge.spec.schemes import canonical

    plan = {}
    for run in qat_runs(config):
        quant = matched_gguf_quant(config, run)
        if quant is None or quant not in config["gguf"]["quants"]:
            continue
        spec = set_options(config["gguf"]["quants"][quant])
        targets = train_settings(config, run)["lora"]["target_modules"]
        plan[run] = {"quant": quant, "spec": spec, "scheme": canonical(qat_scheme(config, run)),
                     "targets": targets if isinstance(targets, str) else sorted(targets)}
    return plan


def modelfile_quant(config: dict, run: str, workdir: str | Path = ".") -> str | None:
    """The GGUF quant a run's Ollama Modelfile points at (a GGUF scheme's own type, else
    gguf.default_quant), or None when the run exports no such GGUF (or GGUF is skipped)."""
    from qatforge.spec.schemes import gguf_type

    scheme = qat_scheme(config, run)
    q = (gguf_type(scheme) if scheme else None) or config["gguf"]["default_quant"]
    return q if (run, "gguf", q) in artifacts(config, workdir) else None


def torchao_variants(config: dict, run: str) -> list[str]:
    """TorchAO artifacts of a run (the torchao record's variants)."""
    return lookup("torchao").variants(config, qat_scheme(config, run))


def torchao_scheme_uses(config: dict) -> list[tuple[str, str]]:
    """Every torchao scheme the config quantizes with, as (config key, scheme): ``torchao.schemes``
    (PTQ of the baseline runs) and the ``qat_scheme`` of each torchao QAT run (not GGUF- or ONNX-targeted)."""
    uses = []
    for run in runs(config):
        key = "torchao.schemes" if qat_scheme(config, run) is None else f"runs.{run}.qat_scheme"
        uses += [(key, s) for s in torchao_variants(config, run)]
    return list(dict.fromkeys(uses))


def on_unsupported(config: dict) -> str:
    """``formats.on_unsupported``: ``error`` or ``skip`` (the schema default is error)."""
    return (config.get("formats") or {}).get("on_unsupported", "error")


def skipped_formats(config: dict, workdir: str | Path = ".") -> dict[str, str]:
    """``{format: reason}`` left out of every target: with ``formats.on_unsupported: skip``, the
    configured formats the base cannot be exported to (``capabilities.unsupported_formats``)."""
    if on_unsupported(config) != "skip":
        return {}
    return {f: r for f, r in unsupported_formats(config, workdir).items() if f in _used_formats(config)}


def _used_formats(config: dict) -> set[str]:
    """The formats the config's artifacts are in (all of them while a scheme is unknown: _check_schemes names it)."""
    try:
        return {fmt for _, fmt, _ in _configured_artifacts(config)}
    except ValueError:
        return set(FORMATS)


def artifacts(config: dict, workdir: str | Path = ".") -> list[tuple[str, str, str]]:
    """Every evaluated artifact as (run, format, variant); the base model is a row of the
    :func:`baseline_run` (``formats.BASE_ARTIFACT``), and there is none without one. Formats the
    base cannot be exported to are absent under ``formats.on_unsupported: skip`` (:func:`skipped_formats`)."""
    skipped = skipped_formats(config, workdir)
    return [a for a in _configured_artifacts(config) if a[1] not in skipped]


def _configured_artifacts(config: dict) -> list[tuple[str, str, str]]:
    """:func:`artifacts` before any format is skipped: each format's variants of each run (a run
    with ``formats: matched``: its merged model and the artifact of its quantizer)."""
    from qatforge.spec.schemes import matched_artifact

    base_run, out = baseline_run(config), []
    for run in runs(config):
        scheme = qat_scheme(config, run)
        if config["runs"][run].get("formats") == "matched" and scheme:
            arts = [MERGED_ARTIFACT, matched_artifact(scheme)]
        else:
            arts = [(f.name, v) for f in FORMATS.values() for v in f.variants(config, scheme)]
        if run == base_run:  # the base model, after the merged model
            arts.insert(arts.index(MERGED_ARTIFACT) + 1, BASE_ARTIFACT)
        out += [(run, *a) for a in arts]
    return out


def sorted_keys(value: Any) -> Any:
    """``value`` with the keys of every dict in sorted order, recursively (lists keep their order).

    Snakemake compares a job's params by repr, and a dict's repr follows its key order: rule params
    built from the config pass through this so that reordering config keys reruns nothing.
    """
    if isinstance(value, dict):
        return {k: sorted_keys(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return type(value)(sorted_keys(v) for v in value)
    return value


def _check_base(config: dict, workdir: Path) -> list[str]:
    base = config["model"]["base"]
    if base.startswith(BUILTIN_PREFIX):
        name = base[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            return [f"model.base: unknown builtin model {name!r}; builtin models: {', '.join(BUILTIN_MODELS)}"]
        return []
    path = Path(base) if Path(base).is_absolute() else workdir / base
    looks_local = base.startswith((".", "/", "~")) or path.exists()
    if not looks_local:
        return []  # a hub id: resolved by from_pretrained when the base is built
    if not path.is_dir():
        return [f"model.base: {base!r} does not exist or is not a directory"]
    cfg = path / "config.json"
    if not cfg.is_file():
        return [f"model.base: {base!r} has no config.json, so it is not a Hugging Face model directory"]
    raw = json.loads(cfg.read_text())
    archs = raw.get("architectures") or []
    # a multimodal checkpoint (Qwen3.5, Gemma 4, Mistral 3) is trained and exported as its text model
    multimodal = bool(archs) and archs[0].endswith("ForConditionalGeneration") and isinstance(
        raw.get("text_config"), dict)
    if not multimodal and not any(a.endswith("ForCausalLM") for a in archs):
        return [f"model.base: {base!r} is neither a causal LM nor a *ForConditionalGeneration with a text_config "
                f"(architectures: {archs or 'none'})"]
    problems = []  # (which formats it can be exported to: _check_formats)
    tok_cfg = path / "tokenizer_config.json"
    tok = json.loads(tok_cfg.read_text()) if tok_cfg.is_file() else {}
    if not (tok.get("chat_template") or (path / "chat_template.jinja").is_file()):
        problems.append(f"model.base: the tokenizer of {base!r} has no chat template")
    if not tok.get("eos_token"):
        problems.append(f"model.base: the tokenizer of {base!r} has no eos_token")
    return problems


def _check_schemes(config: dict, cuda_capability: tuple[int, int] | None) -> list[str]:
    from qatforge.spec import schemes

    def parsed(scheme: Any) -> Any:
        """A valid scheme parsed; None for an invalid one (reported)."""
        try:
            return schemes.parse_scheme(scheme)
        except ValueError:
            return None

    problems = []
    for run in runs(config):
        scheme = qat_scheme(config, run)
        if scheme is not None:
            problems += [f"runs.{run}.qat_scheme: {p}" for p in schemes.problems(scheme, cuda_capability)]
    for scheme in config["torchao"]["schemes"]:
        problems += [f"torchao.schemes: {p}" for p in schemes.problems(scheme, cuda_capability)]
    for scheme in config["torchao"]["schemes"]:
        s = parsed(scheme)
        if s is not None and s.target != "torchao":
            problems.append(f"torchao.schemes: {scheme!r} is a {s.target.upper()}-targeted QAT scheme, not a torchao one")
    for run in runs(config):
        scheme = qat_scheme(config, run)
        s = parsed(scheme) if scheme is not None else None
        if learned_block_scales(config, run) and not (s is not None and s.scale_grid()):
            problems.append(f"runs.{run}.qat.block_scales: learned block scales are written into GGUF Q4_0, ONNX "
                            f"int4 (block 32) and TorchAO int8-int4 files only; qat_scheme {scheme!r} is none of them")
        mode = (config["runs"][run].get("qat") or {}).get("mode", "merged")
        if learned_block_scales(config, run) and mode != "merged":
            problems.append(f"runs.{run}.qat.block_scales: learned block scales train merge-exact only (mode: merged)")
        if s is None or s.target == "torchao":
            continue
        if mode != "merged":
            problems.append(f"runs.{run}.qat.mode: the {s.target.upper()} scheme {scheme!r} trains merge-exact only "
                            "(mode: merged)")
        if s.gguf:
            t, want = s.gguf.weights, s.gguf.quant_spec()
            if not _same_quant(config["gguf"]["quants"].get(t), want):
                shown = ", ".join(f"{k}: {v}" for k, v in want.items())
                problems.append(f"runs.{run}.qat_scheme: {scheme!r} ships as gguf.quants.{t}, which must exist as "
                                f"{{{shown}}} (llama.cpp's QAT mix, the types the run trains under; no imatrix, "
                                f"no other overrides)")
        else:
            v, want = s.onnx.variant, s.onnx.builder_settings()
            if (config.get("onnx") or {}).get("variants", {}).get(v) != want:
                shown = ", ".join(f"{k}: {x}" for k, x in want.items())
                problems.append(f"runs.{run}.qat_scheme: {scheme!r} ships as onnx.variants.{v}, which must exist as "
                                f"{{{shown}}} (the MatMulNBits the run trains under; no other builder options)")
    for run in runs(config):
        if config["runs"][run].get("formats") == "matched" and qat_scheme(config, run) is None:
            problems.append(f"runs.{run}.formats: 'matched' needs a QAT run (qat_scheme set); a baseline run exports all")
    for run in runs(config):
        t = (config["runs"][run].get("qat") or {}).get("distill_from")
        if t is None:
            continue
        key = f"runs.{run}.qat.distill_from"
        if qat_scheme(config, run) is None:
            problems.append(f"{key}: only a QAT run (qat_scheme set) distills; {run!r} is a baseline run")
        elif t not in config["runs"]:
            problems.append(f"{key}: {t!r} is not a run (runs: {', '.join(runs(config))})")
        elif qat_scheme(config, t) is not None:
            problems.append(f"{key}: the teacher {t!r} must be a baseline run (qat_scheme null)")
    return problems


def set_options(spec: dict) -> dict:
    """A ``gguf.quants`` entry without its unset options (the schema fills them with None, false, {})."""
    return {k: v for k, v in spec.items() if v not in (None, False, {})}


def _same_quant(spec: dict | None, want: dict[str, str]) -> bool:
    """Whether a ``gguf.quants`` entry writes exactly ``want`` (unset and false options aside)."""
    return spec is not None and set_options(spec) == want


def _check_gguf(config: dict) -> list[str]:
    g = config["gguf"]
    problems = []
    names = known_pre_tokenizers()  # None before `make install`: the converter then reports it
    if names is not None and g["pre_tokenizer"] not in names:
        problems.append(f"gguf.pre_tokenizer: {g['pre_tokenizer']!r} is not a pre-tokenizer llama.cpp knows; "
                        f"valid names: {', '.join(names)}")
    for name, spec in g["quants"].items():
        options = {k: v for k, v in spec.items() if k not in ("type", "imatrix")}
        try:
            check_quant(spec["type"], bool(spec.get("imatrix")), options)
        except ValueError as e:
            key = "type" if str(e).startswith("unknown llama.cpp quantization type") else None
            problems.append(f"gguf.quants.{name}{'.' + key if key else ''}: {e}")
    if outtype_name(config) in g["quants"]:
        problems.append(
            f"gguf.quants.{outtype_name(config)}: duplicate artifact name, it is the name of the "
            f"unquantized conversion (gguf.outtype: {g['outtype']})"
        )
    lowered = {}
    for name in g["quants"]:
        if name.lower() in lowered:
            problems.append(f"gguf.quants: duplicate artifact names {lowered[name.lower()]!r} and {name!r}")
        lowered[name.lower()] = name
    if g["default_quant"] not in g["quants"]:
        problems.append(
            f"gguf.default_quant: {g['default_quant']!r} is not one of gguf.quants ({', '.join(g['quants'])})"
        )
    return problems


def _check_names(config: dict) -> list[str]:
    problems = []
    for section, names in (("runs", runs(config)), ("gguf.quants", list(config["gguf"]["quants"]))):
        for n in names:
            if not SAFE_NAME.match(n):
                problems.append(f"{section}.{n}: unsafe name (letters, digits, '_.+-', no '..' or '/')")
    lowered: dict[str, str] = {}
    for run in runs(config):
        if run.lower() in lowered:
            problems.append(f"runs: duplicate artifact names {lowered[run.lower()]!r} and {run!r}")
        lowered[run.lower()] = run
    return problems


def _check_formats(config: dict, workdir: Path) -> list[str]:
    """Each configured format the base cannot be exported to (``formats.on_unsupported: error``);
    under ``skip``, a GGUF- or ONNX-targeted QAT run whose only purpose, that file, is skipped."""
    from qatforge.spec.schemes import parse_scheme
    from qatforge.spec.schemes import problems as scheme_problems

    if on_unsupported(config) == "skip":
        skipped = skipped_formats(config, workdir)
        out = []
        for run in qat_runs(config):
            scheme = qat_scheme(config, run)
            target = None if scheme_problems(scheme) else parse_scheme(scheme).target
            if target in skipped and target != "torchao":
                out.append(f"runs.{run}.qat_scheme: {scheme!r} trains for {target.upper()}, which "
                           f"formats.on_unsupported: skip leaves out for this base ({skipped[target]}); remove the "
                           "run or use a torchao scheme")
        return out
    bad = unsupported_formats(config, workdir)
    used = _used_formats(config) if bad else set()
    return [f"model.base: no {fmt} export: {reason} (formats.on_unsupported: error; set it to skip to leave "
            f"{fmt} out)" for fmt, reason in bad.items() if fmt in used]


def _check_data(config: dict, workdir: Path) -> list[str]:
    """Cheap checks only: the dataset is not read here (prepare_data checks the split sizes)."""
    d = config["data"]
    problems = []
    if d["dev_fraction"] + d["test_fraction"] >= 1:
        problems.append(
            f"data.dev_fraction + data.test_fraction: {d['dev_fraction']} + {d['test_fraction']} "
            f"leaves no training split (the sum must be < 1)"
        )
    if not (workdir / d["path"]).exists():
        problems.append(f"data.path: {d['path']!r} does not exist")
    return problems


def check(config: dict, workdir: str | Path = ".", cuda_capability: tuple[int, int] | None = None) -> None:
    """Raise ConfigError listing every problem of a schema-validated config."""
    workdir = Path(workdir)
    base = _check_base(config, workdir)
    problems = (
        _check_names(config)
        + base
        + ([] if base else _check_formats(config, workdir))
        + _check_schemes(config, cuda_capability)
        + _check_gguf(config)
        + _check_data(config, workdir)
    )
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


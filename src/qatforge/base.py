"""The run's base model: the builtin tiny Qwen3 (shipped with the project, or built and warmed up
locally for another recipe) or a real checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from qatforge.capabilities.torchao import check_torchao_schemes
from qatforge.io import atomic_dir, read_json, write_manifest
from qatforge.spec.builtin import BUILTIN_PREFIX


# The builtin base's stored dtype (float32: what the warm-up trains; the default pipeline's figures rest on it) and its
# warm-up sequence length when the config gives none (model.builtin.max_len).
BUILTIN_DTYPE = "float32"
BUILTIN_MAX_LEN = 256


def builtin_recipe(builtin: dict[str, Any], seed: int) -> dict[str, Any]:
    """Everything that decides the builtin base's weights (with the code and library versions,
    which ``base_cache.recipe_key`` adds). The outliers are planted after the cache, so they are not
    part of it; nor is the dataset (``data.max_tokens``): the warm-up has its own ``max_len``."""
    warmup = {k: v for k, v in builtin.items() if k != "outliers"}
    return {"model": "tiny-qwen3", "seed": seed, "dtype": BUILTIN_DTYPE, "max_len": BUILTIN_MAX_LEN, **warmup}


def train_builtin(recipe: dict[str, Any], out_dir: str | Path, *, threads: int = 1) -> dict[str, Any]:
    """Build the builtin base of ``recipe`` (``builtin_recipe``) into ``out_dir``: the tokenizer and
    full-parameter warm-up on its own corpus (``datagen.base_corpus``). Returns the warm-up metrics."""
    from qatforge import datagen, tiny

    return tiny.build_base(
        [r["messages"] for r in datagen.base_corpus(recipe["corpus_seed"], recipe["corpus_size"])],
        out_dir,
        steps=recipe["steps"],
        batch_size=recipe["batch_size"],
        lr=recipe["lr"],
        seed=recipe["seed"],
        vocab_size=recipe.get("vocab_size", 1024),
        max_len=recipe["max_len"],
        dtype=recipe["dtype"],
        threads=threads,
    )


def warm_builtin(
    recipe: dict[str, Any],
    out_dir: str | Path,
    *,
    shipped: str | Path | None = None,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The warmed-up builtin base of ``recipe`` in ``out_dir``, from the first that has it: the
    checkpoint shipped in ``shipped`` (when its record's recipe is ``recipe``; hashes checked), the
    machine cache, or a fresh build (then cached). Returns the warm-up metrics with ``cache``
    ("shipped", "hit" or "miss") and ``recipe_key``."""
    from qatforge import base_cache

    key = base_cache.recipe_key(recipe)
    if shipped and base_cache.shipped_recipe(shipped) == recipe:
        base_cache.copy_shipped(shipped, out_dir, log=log)
        info = read_json(Path(out_dir) / "warmup.json")["metrics"] | {"cache": "shipped"}
    elif base_cache.fetch(key, out_dir, log=log):
        info = read_json(Path(out_dir) / "warmup.json")["metrics"] | {"cache": "hit"}
    else:
        if shipped:
            log(f"the config's builtin recipe is not the one shipped in {shipped}: building the base")
        info = train_builtin(recipe, out_dir, threads=threads) | {"cache": "miss"}
        base_cache.store(key, out_dir, log=log)
    return info | {"recipe_key": key}


def build(
    base: str,
    out_dir: str | Path,
    *,
    builtin: dict[str, Any],
    seed: int,
    shipped: str | Path | None = None,
    trust_remote_code: bool = False,
    threads: int = 1,
    torchao_schemes: Sequence[tuple[str, str]] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the base checkpoint to ``out_dir`` (safetensors, tokenizer, chat template).

    The builtin base is trained on its own warm-up corpus (``datagen.base_corpus``), never on the
    dataset; it is copied from ``shipped`` (the checkpoint the project ships) when the recipe is the
    shipped one, else taken from the machine cache or built (``warm_builtin``); then
    ``builtin["outliers"]`` are planted (``outliers.plant``). Each (config key, scheme) of ``torchao_schemes`` must find
    modules to quantize (``capabilities.torchao.check_torchao_schemes``, before a local base's
    weights are loaded); the counts go into the manifest.
    """
    import torch

    torch.set_num_threads(threads)
    if base.startswith(BUILTIN_PREFIX):
        from qatforge import outliers

        info = warm_builtin(builtin_recipe(builtin, seed), out_dir, shipped=shipped, threads=threads, log=log)
        planted = builtin.get("outliers") or {}
        info["outliers"] = outliers.plant(out_dir, channels=planted.get("channels", 0),
                                          scale=planted.get("scale", 1), seed=seed)
        if info["outliers"]["channels"]:
            log(f"planted outlier channels {info['outliers']['channels']} (x{info['outliers']['scale']})")
        counts = check_torchao_schemes(out_dir, torchao_schemes)
    else:
        import tempfile

        from qatforge.model import check_chat_tokenizer, load_causal_lm, load_tokenizer, save_tokenizer

        tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
        check_chat_tokenizer(tokenizer, base)
        Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".text-model-", dir=Path(out_dir).parent) as work:
            text = conditional_generation_text(base)
            if text is not None:  # a multimodal checkpoint: its text model is the base
                source, text_info = write_text_model(base, Path(work) / "text", log=log)
            else:
                source, text_info = base, None
            counts = check_torchao_schemes(source, torchao_schemes, trust_remote_code=trust_remote_code)
            # in the dtype it is stored in: a bf16 checkpoint upcast here would double the base on
            # disk and the memory of every job that loads it (merge, the reference, evaluation)
            model = load_causal_lm(source, dtype="auto", trust_remote_code=trust_remote_code)
            with atomic_dir(out_dir) as tmp:
                model.save_pretrained(tmp)
                save_tokenizer(tokenizer, tmp)
        info = {"source": base, "parameters": sum(p.numel() for p in model.parameters())}
        if text_info:
            info["text_model"] = text_info
        log(f"copied base {base} into {out_dir}")
    if counts:
        log(f"torchao modules to quantize per scheme: {counts}")
    write_manifest(out_dir, {"stage": "base", "source": base, "seed": seed, "info": info, "torchao_modules": counts})
    return info


def conditional_generation_text(base: str) -> dict[str, Any] | None:
    """The ``text_config`` of a local multimodal checkpoint (``config.json`` whose first architecture
    is a ``*ForConditionalGeneration`` with a ``text_config``: Qwen3.5, Gemma 4, Mistral 3 are
    published so), or None. Such a base is fine-tuned and exported as its text model."""
    import json

    cfg = Path(str(base)).expanduser() / "config.json"
    if not cfg.is_file():
        return None
    raw = json.loads(cfg.read_text())
    archs = raw.get("architectures") or []
    if archs and archs[0].endswith("ForConditionalGeneration") and isinstance(raw.get("text_config"), dict):
        return raw["text_config"]
    return None


def write_text_model(base: str, out_dir: Path, *, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Write the text model of the multimodal checkpoint ``base`` to ``out_dir`` as its own
    transformers text CausalLM (``Qwen3_5ForCausalLM``, ``Gemma4ForCausalLM``, ``Ministral3ForCausalLM``):
    config.json is the text config with that architecture, the weights are the language model's and
    the LM head's under ``model.*`` / ``lm_head.*``; the vision (and audio) towers and projectors are
    dropped. The full model is loaded with its own transformers class (never remote code), so any key
    layout transformers reads is read, and the text modules are moved, not copied.

    MTP: transformers never loads a checkpoint's ``mtp.*`` tensors (Qwen3.5), so the text model has
    none; its config says ``mtp_num_hidden_layers: 0`` (llama.cpp's converter and the onnxruntime-genai
    builder otherwise look for MTP weights that are not there). Returns (out_dir, what was dropped)."""
    import json

    import torch
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from qatforge.model import ModelError

    base_dir = Path(str(base)).expanduser()
    arch = json.loads((base_dir / "config.json").read_text())["architectures"][0]
    full_cls = getattr(transformers, arch, None)
    if full_cls is None:
        raise ModelError(f"{base}: transformers has no class {arch} (remote code is not used for multimodal bases)")
    config = AutoConfig.from_pretrained(str(base_dir))
    text_cfg = config.get_text_config()
    text_cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(text_cfg), None)
    if text_cls is None:
        raise ModelError(f"{base}: {arch}'s text config ({type(text_cfg).__name__}) has no causal-LM class in transformers")
    full = full_cls.from_pretrained(str(base_dir), dtype=torch.float32)
    decoder = full.model.language_model if hasattr(full.model, "language_model") else full.get_decoder()
    with torch.device("meta"):
        text = text_cls(text_cfg)
    if type(text.model) is not type(decoder):
        raise ModelError(f"{base}: {arch}'s language model is {type(decoder).__name__}, "
                         f"{text_cls.__name__} expects {type(text.model).__name__}")
    text.model = decoder  # moved, not copied (a tied head stays tied to the same tensor)
    text.lm_head = full.get_output_embeddings()
    text.generation_config = full.generation_config
    meta = [n for n, p in text.named_parameters() if p.is_meta]
    if meta:
        raise ModelError(f"{base}: parameters {meta[:5]} of {text_cls.__name__} are not in {arch}")
    dropped_mtp = int(getattr(text_cfg, "mtp_num_hidden_layers", 0) or 0)
    if dropped_mtp:
        text.config.mtp_num_hidden_layers = 0
    text.config.architectures = [text_cls.__name__]
    text.config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", text_cfg.tie_word_embeddings))
    kept = {id(p) for p in text.parameters()}
    dropped = sorted({n.split(".")[1] if n.startswith("model.") else n.split(".")[0]
                      for n, p in full.named_parameters() if id(p) not in kept})
    text.save_pretrained(out_dir)
    info = {"from": arch, "as": text_cls.__name__, "dropped_modules": dropped, "dropped_mtp_layers": dropped_mtp}
    log(f"{base}: {arch} -> its text model {text_cls.__name__} (dropped {', '.join(dropped) or 'nothing'}"
        f"{f', {dropped_mtp} MTP layer(s)' if dropped_mtp else ''})")
    return out_dir, info


def default_recipe(config: str | Path = "config/config.yaml", schema: str | Path = "config/schema.yaml") -> dict[str, Any]:
    """The builtin recipe of a config file, the schema's defaults filled in for ``seed`` and the
    ``model.builtin`` keys it leaves out (as the Snakefile's validation fills them)."""
    import yaml

    cfg = yaml.safe_load(Path(config).read_text()) or {}
    props = yaml.safe_load(Path(schema).read_text())["properties"]
    defaults = {k: v["default"] for k, v in props["model"]["properties"]["builtin"]["properties"].items()
                if "default" in v}
    builtin = {**defaults, **((cfg.get("model") or {}).get("builtin") or {})}
    return builtin_recipe(builtin, cfg.get("seed", props["seed"].get("default")))


def ship_builtin(shipped_dir: str | Path, recipe: dict[str, Any], *, threads: int = 2) -> dict[str, Any]:
    """Build the builtin base of ``recipe`` afresh (no cache) and make it the shipped base in
    ``shipped_dir`` (``base_cache.ship``). Returns the shipped record."""
    import tempfile

    import torch

    from qatforge import base_cache

    torch.set_num_threads(threads)
    Path(shipped_dir).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ship-", dir=Path(shipped_dir).parent) as work:
        train_builtin(recipe, Path(work) / "base", threads=threads)
        return base_cache.ship(Path(work) / "base", shipped_dir, recipe, threads)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m qatforge.base --ship assets/builtin/tiny-qwen3``: rebuild the shipped builtin base
    of the config's recipe (run from the project root; ~8 min of CPU for the default recipe)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m qatforge.base", description=main.__doc__)
    ap.add_argument("--ship", required=True, help="the shipped base's directory (assets/builtin/tiny-qwen3)")
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--schema", default="config/schema.yaml")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the config's train.threads)")
    args = ap.parse_args(argv)
    record = ship_builtin(args.ship, default_recipe(args.config, args.schema), threads=args.threads)
    print(json.dumps(record, indent=2, sort_keys=True))


if __name__ == "__main__":
    import qatforge.quiet  # noqa: F401

    main()

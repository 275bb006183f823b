"""TorchAO: the modules each configured scheme quantizes, counted on the base's config built on the
meta device (no weights) by the build_base job, before any training. Imports torch lazily; kept out
of ``qatforge.base``, whose source is part of the builtin base's cache key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from qatforge.spec.capabilities import family
from qatforge.spec.config import ConfigError
from qatforge.spec.schemes import Scheme, parse_scheme


def quantizable_modules(model: Any, scheme: Scheme) -> int:
    """How many modules of ``model`` torchao quantizes with ``scheme``: those its linear filter
    selects (``qatforge.qat.scheme_config``), plus the input embeddings when the scheme quantizes them."""
    from qatforge.qat import embedding_filter, scheme_config

    _, emb_cfg, linear_filter = scheme_config(scheme)
    return sum(1 for fqn, m in model.named_modules()
               if linear_filter(m, fqn) or (emb_cfg is not None and embedding_filter(m, fqn)))


def check_torchao_schemes(
    source: str | Path, uses: Sequence[tuple[str, str]], *, trust_remote_code: bool = False
) -> dict[str, int]:
    """``{scheme: modules it quantizes}`` for each (config key, scheme) of ``uses``, counted on the
    model of ``source``'s config built on the meta device (no weights); a scheme that finds none
    raises ConfigError naming the key, the scheme and the family."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not uses:
        return {}
    cfg = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # a multimodal base is trained as its text model (base.write_text_model)
        model = AutoModelForCausalLM.from_config(cfg.get_text_config(), trust_remote_code=trust_remote_code)
    schemes = {s: parse_scheme(s) for _, s in uses}
    counts = {s: quantizable_modules(model, scheme) for s, scheme in schemes.items()}
    fam = family(cfg.to_dict())
    groups = {s: scheme.group_size or 1 for s, scheme in schemes.items()}
    bad = [f"{key}: torchao scheme {s!r} quantizes no module of {fam}: no plain nn.Linear"
           + (f" with in_features divisible by its group size {groups[s]}" if groups[s] > 1 else "")
           for key, s in uses if not counts[s]]
    if bad:
        raise ConfigError("invalid config for this base:\n  - " + "\n  - ".join(bad))
    return counts

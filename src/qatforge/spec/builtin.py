"""The builtin bases (``model.base: builtin:<name>``, built by :mod:`qatforge.tiny`): names and
shape, no imports, read at parse time by :mod:`qatforge.spec.config` and :mod:`qatforge.spec.capabilities`."""

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-qwen3",)
BUILTIN_NAME = "TinyQwen3"  # the default model.name of a builtin base
# The builtin tiny Qwen3's shape (qatforge.tiny.build_model's defaults; read at parse time for its
# resources). Every row length is a multiple of 256 so llama.cpp K-quants apply to every weight.
TINY_QWEN3_SHAPE = {"hidden": 256, "intermediate": 768, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 64}

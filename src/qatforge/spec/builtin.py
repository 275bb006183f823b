"""The builtin bases (``model.base: builtin:<name>``, built by :mod:`qatforge.tiny`): names only,
no imports, read at parse time by :mod:`qatforge.spec.config` and :mod:`qatforge.spec.capabilities`."""

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-qwen3",)
BUILTIN_NAME = "TinyQwen3"  # the default model.name of a builtin base

"""Silence the known, harmless noise of ``import torchao`` on a CPU-only torch; nothing else.

Importing this module (stdlib only: no torch) installs ``logging`` filters, by message:

* ``torchao``: "Failed to load .../torchao/_C_mxfp8*.so" and "..._C_cutlass_90a*.so", the CUDA-only
  kernels (MXFP8, Hopper CUTLASS) a CPU wheel cannot load; torchao logs each at WARNING.
* ``torch.utils._pytree``: "<enum ...> is an Enum subclass and is now natively supported by
  torch.compile ...", logged for each torchao enum torchao still registers as a pytree constant.
* ``torchao.kernel.intmm``: "Warning: Detected no triton, ...", when Triton is not installed; its
  kernels are CUDA-only, so the record is dropped only where torch sees no CUDA device.

All are ``logging`` records (not ``warnings``), so a filter on the logger that emits them drops
exactly those records before any handler sees them; other messages of these loggers, and every
``warnings.warn``, still show. Scripts import it first (``import qatforge.quiet``).
"""

from __future__ import annotations

import logging
import re
import sys

# The torchao extension libraries that only load with CUDA (named by file, not "any .so").
CUDA_ONLY_LIBS = re.compile(r"^Failed to load \S*torchao[/\\]_C_(mxfp8|cutlass_90a)\b[^/\\]*\.so\b")
ENUM_PYTREE = "is an Enum subclass and is now natively supported by torch.compile"
NO_TRITON = "Warning: Detected no triton, on systems without Triton certain kernels will not work"


def known_noise(record: logging.LogRecord) -> bool:
    """Whether ``record`` is one of the known import-time messages (see the module docstring)."""
    if record.name == "torchao":
        return bool(CUDA_ONLY_LIBS.match(record.getMessage()))
    if record.name == "torch.utils._pytree" and ENUM_PYTREE in str(record.msg):
        enum = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return getattr(enum, "__module__", "").split(".")[0] == "torchao"
    if record.name == "torchao.kernel.intmm" and record.getMessage() == NO_TRITON:
        return not _cuda_available()
    return False


def _cuda_available() -> bool:
    """Whether the torch that is already imported (the record's emitter imports it) sees a CUDA device."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not known_noise(record)


def install() -> None:
    """Add the filter to the emitting loggers (idempotent; the loggers need not exist yet)."""
    for name in ("torchao", "torch.utils._pytree", "torchao.kernel.intmm"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise())


install()

"""``qatforge.quiet``: ``import torchao`` leaves no known noise on stderr; real warnings still show."""

import logging
import subprocess
import sys

from qatforge import quiet

NOISE = ("Failed to load", "_C_mxfp8", "_C_cutlass_90a", "Enum subclass", "_pytree", "Detected no triton")


def _stderr(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def test_torchao_import_is_quiet_but_real_warnings_show():
    err = _stderr("import qatforge.quiet, torchao, warnings, logging\n"
                  "warnings.warn('real warning')\n"
                  "logging.getLogger('torchao').warning('real torchao message')")
    assert not [line for line in err.splitlines() if any(n in line for n in NOISE)], err
    assert "UserWarning: real warning" in err and "real torchao message" in err


def test_a_script_import_path_is_quiet_and_the_filter_is_what_does_it():
    """scripts/*.py import qatforge.quiet first, then the library, which imports torchao when used.
    Without the filter the noise is there (the pinned torchao 0.18 on a CPU torch emits it)."""
    # with a root handler, as the jobs' logs have (runlog): the intmm logger's own is a NullHandler
    path = "import logging\nlogging.basicConfig()\nfrom qatforge.base import build\nimport torchao, torchao.kernel.intmm"
    err = _stderr("import qatforge.quiet\n" + path)
    assert not [line for line in err.splitlines() if any(n in line for n in NOISE)], err
    loud = _stderr(path)
    assert "_C_cutlass_90a" in loud and "Enum subclass" in loud and "Detected no triton" in loud


def test_only_the_known_records_are_dropped():
    def rec(name, msg, *args):
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)

    lib = "/x/site-packages/torchao/_C_cutlass_90a.abi3.so"
    assert quiet.known_noise(rec("torchao", f"Failed to load {lib}: Could not load this library: {lib}"))
    assert quiet.known_noise(rec("torchao", "Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: e"))
    assert not quiet.known_noise(rec("torchao", "Failed to load /x/torchao/_C.abi3.so: e"))  # the CPU kernels
    assert not quiet.known_noise(rec("torchao", "Skipping import of cpp extensions due to incompatible torch"))
    enum_msg = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
    torchao_enum = type("KernelPreference", (), {"__module__": "torchao.quantization.quantize_.common"})
    assert quiet.known_noise(rec("torch.utils._pytree", enum_msg, torchao_enum))
    assert not quiet.known_noise(rec("torch.utils._pytree", enum_msg, type("Mine", (), {"__module__": "mylib"})))
    assert not quiet.known_noise(rec("mylib", f"Failed to load {lib}: e"))
    assert quiet.known_noise(rec("torchao.kernel.intmm", quiet.NO_TRITON))  # this CPU-only torch
    assert not quiet.known_noise(rec("torchao.kernel.intmm", "another intmm message"))


def test_no_triton_shows_where_cuda_is(monkeypatch):
    """The Triton kernels are CUDA's: with a CUDA device their absence is real news, not noise."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    record = logging.LogRecord("torchao.kernel.intmm", logging.WARNING, __file__, 1, quiet.NO_TRITON, (), None)
    assert not quiet.known_noise(record)

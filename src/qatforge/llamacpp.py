"""Locate (and install) the pinned llama.cpp pieces qatforge uses outside the llama-cpp-python wheel.

The llama-cpp-python sdist vendors the full llama.cpp tree. ``make install`` copies from it, once:

    <prefix>/share/llama.cpp/convert_hf_to_gguf.py     the HF -> GGUF converter
    <prefix>/share/llama.cpp/conversion/               its model-class package
    <prefix>/share/llama.cpp/gguf-py/gguf/             the converter's own gguf package (not PyPI's)
    <prefix>/share/llama.cpp/models/templates/         chat templates some model classes read
    <prefix>/share/llama.cpp/LICENSE
    <prefix>/share/llama.cpp/source.json               versions: llama-cpp-python, llama.cpp commit, ggml
    <prefix>/bin/llama-imatrix                         importance-matrix tool built from the same tree

``<prefix>`` is ``sys.prefix`` (the venv); ``QATFORGE_LLAMA_CPP_DIR`` overrides the share directory
(and may hold ``llama-imatrix`` itself). Run ``python -m qatforge.llamacpp install --sdist DIR``
to create the layout. Nothing here imports llama_cpp, torch or transformers.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

ENV_DIR = "QATFORGE_LLAMA_CPP_DIR"
IMATRIX_TOOL = "llama-imatrix"
SOURCE_INFO = "source.json"
_HINT = "run `make install` (it unpacks llama.cpp from the pinned llama-cpp-python sdist)"


def share_dir() -> Path:
    """Directory holding the vendored converter: ``$QATFORGE_LLAMA_CPP_DIR`` or ``<sys.prefix>/share/llama.cpp``."""
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else Path(sys.prefix) / "share" / "llama.cpp"


def find_converter() -> Path:
    """Path of the vendored ``convert_hf_to_gguf.py`` (checked together with ``conversion/`` and ``gguf-py/``)."""
    root = share_dir()
    script = root / "convert_hf_to_gguf.py"
    missing = [p for p in (script, root / "conversion" / "__init__.py", root / "gguf-py" / "gguf" / "__init__.py")
               if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"llama.cpp converter not found: missing {', '.join(str(m) for m in missing)}; {_HINT}"
            f" (or set {ENV_DIR} to a llama.cpp checkout)"
        )
    return script


def find_gguf_py() -> Path:
    """Directory to put first on PYTHONPATH so ``import gguf`` gets the converter's own gguf-py."""
    return find_converter().parent / "gguf-py"


def find_imatrix_tool() -> Path:
    """Path of the ``llama-imatrix`` executable built from the same llama.cpp sources."""
    candidates = []
    if os.environ.get(ENV_DIR):
        root = Path(os.environ[ENV_DIR])
        candidates += [root / IMATRIX_TOOL, root / "bin" / IMATRIX_TOOL, root / "build" / "bin" / IMATRIX_TOOL]
    candidates.append(Path(sys.prefix) / "bin" / IMATRIX_TOOL)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(
        f"{IMATRIX_TOOL} not found (looked in {', '.join(str(c) for c in candidates)}); {_HINT}"
    )


def source_info() -> dict[str, Any]:
    """Versions of the vendored llama.cpp (``source.json`` written at install; ``{}`` if absent)."""
    import json

    path = share_dir() / SOURCE_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_sdist_info(sdist: Path) -> dict[str, Any]:
    """llama-cpp-python version, llama.cpp commit and ggml version of an unpacked sdist."""
    info: dict[str, Any] = {}
    pkg_init = sdist / "llama_cpp" / "__init__.py"
    if pkg_init.is_file():
        m = re.search(r'__version__\s*=\s*"([^"]+)"', pkg_init.read_text())
        if m:
            info["llama_cpp_python"] = m.group(1)
    changelog = sdist / "CHANGELOG.md"
    version = info.get("llama_cpp_python")
    if changelog.is_file() and version:
        # "## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098"
        section = changelog.read_text().split(f"## [{version}]", 1)
        if len(section) == 2:
            body = section[1].split("\n## [", 1)[0]
            m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", body)
            if m:
                info["llama_cpp_commit"] = m.group(1)
    ggml_cmake = sdist / "vendor" / "llama.cpp" / "ggml" / "CMakeLists.txt"
    if ggml_cmake.is_file():
        parts = dict(re.findall(r"set\(GGML_VERSION_(MAJOR|MINOR|PATCH)\s+(\d+)\)", ggml_cmake.read_text()))
        if len(parts) == 3:
            info["ggml"] = f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}"
    return info


def install(sdist: str | os.PathLike, prefix: str | os.PathLike = sys.prefix,
            imatrix_tool: str | os.PathLike | None = None) -> dict[str, Any]:
    """Copy the converter, its gguf-py and (optionally) a built ``llama-imatrix`` into ``prefix``.

    ``sdist`` is the unpacked llama-cpp-python source distribution. The share directory is
    replaced atomically; returns the recorded source info.
    """
    from qatforge.io import atomic_dir, write_json

    sdist, prefix = Path(sdist), Path(prefix)
    src = sdist / "vendor" / "llama.cpp"
    needed = [src / "convert_hf_to_gguf.py", src / "conversion", src / "gguf-py" / "gguf"]
    for p in needed:
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: {sdist} is not an unpacked llama-cpp-python sdist")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    info = _read_sdist_info(sdist)
    with atomic_dir(prefix / "share" / "llama.cpp") as tmp:
        shutil.copy2(src / "convert_hf_to_gguf.py", tmp / "convert_hf_to_gguf.py")
        shutil.copytree(src / "conversion", tmp / "conversion", ignore=ignore)
        shutil.copytree(src / "gguf-py" / "gguf", tmp / "gguf-py" / "gguf", ignore=ignore)
        for extra in ("LICENSE", "pyproject.toml"):
            if (src / "gguf-py" / extra).is_file():
                shutil.copy2(src / "gguf-py" / extra, tmp / "gguf-py" / extra)
        if (src / "models" / "templates").is_dir():
            shutil.copytree(src / "models" / "templates", tmp / "models" / "templates")
        if (src / "LICENSE").is_file():
            shutil.copy2(src / "LICENSE", tmp / "LICENSE")
        write_json(tmp / SOURCE_INFO, info)
    if imatrix_tool is not None:
        tool = Path(imatrix_tool)
        if not (tool.is_file() and os.access(tool, os.X_OK)):
            raise FileNotFoundError(f"{tool} is not an executable {IMATRIX_TOOL}")
        dest = prefix / "bin" / IMATRIX_TOOL
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp_dest = dest.with_name(f".{IMATRIX_TOOL}.tmp")
        shutil.copy2(tool, tmp_dest)
        os.replace(tmp_dest, dest)
    return info


def run_converter(argv: list[str], pre_tokenizer: str | None = None, report: str | None = None) -> None:
    """Run the vendored ``convert_hf_to_gguf.main()`` in this process with ``argv``.

    The vendored gguf-py is put first on ``sys.path``. When ``pre_tokenizer`` is given it is used
    only if llama.cpp does not recognise the tokenizer (its ``get_vocab_base_pre`` hash lookup
    raises ``NotImplementedError``); the vendored files are not modified. ``report`` receives
    JSON ``{"pre_tokenizer": name, "recognized": bool}``.
    """
    import importlib.util
    import json
    import logging

    script = find_converter()
    gguf_py = script.parent / "gguf-py"
    sys.path[:0] = [str(gguf_py), str(script.parent)]
    import gguf  # noqa: F401  (must be the vendored one)

    if not Path(gguf.__file__).resolve().is_relative_to(gguf_py.resolve()):
        raise ImportError(f"imported gguf from {gguf.__file__}, expected the vendored copy in {gguf_py}")
    from conversion import base

    original = base.TextModel.get_vocab_base_pre
    used: dict[str, Any] = {}

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            res = original(self, tokenizer)
        except NotImplementedError:
            if not pre_tokenizer:
                raise
            logging.getLogger("qatforge").warning(
                "llama.cpp does not recognise this BPE tokenizer; using pre-tokenizer %r", pre_tokenizer)
            used.update(pre_tokenizer=pre_tokenizer, recognized=False)
            return pre_tokenizer
        used.update(pre_tokenizer=res, recognized=True)
        return res

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv = [str(script), *argv]
    module.main()
    if report:
        Path(report).write_text(json.dumps(used))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qatforge.llamacpp", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install", help="copy converter + gguf-py (+ llama-imatrix) into the venv")
    p.add_argument("--sdist", required=True, help="unpacked llama-cpp-python sdist directory")
    p.add_argument("--prefix", default=sys.prefix, help="venv prefix (default: this interpreter's)")
    p.add_argument("--imatrix-tool", help="built llama-imatrix executable to install into <prefix>/bin")
    sub.add_parser("where", help="print the located converter and imatrix tool")
    c = sub.add_parser("convert", help="run the vendored convert_hf_to_gguf.py (args after --)")
    c.add_argument("--pre-tokenizer", help="llama.cpp pre-tokenizer name used when the hash is unknown")
    c.add_argument("--report", help="write which pre-tokenizer was used (JSON) here")
    c.add_argument("converter_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "install":
        info = install(args.sdist, args.prefix, args.imatrix_tool)
        print(f"installed llama.cpp converter into {Path(args.prefix) / 'share' / 'llama.cpp'}: {info}")
    elif args.cmd == "convert":
        rest = args.converter_args[1:] if args.converter_args[:1] == ["--"] else args.converter_args
        run_converter(rest, args.pre_tokenizer, args.report)
    else:
        print(find_converter())
        print(find_imatrix_tool())
    return 0


if __name__ == "__main__":
    sys.exit(main())

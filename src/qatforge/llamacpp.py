"""Locate (and install) the pinned llama.cpp pieces qatforge uses.

The llama-cpp-python sdist vendors the full llama.cpp tree. ``make install`` compiles it once per
machine (``tools/install_llama_cpp.sh``: one cmake build, shared libraries) and lays it out as:

    <prefix>/share/llama.cpp/convert_hf_to_gguf.py     the HF -> GGUF converter
    <prefix>/share/llama.cpp/conversion/               its model-class package
    <prefix>/share/llama.cpp/gguf-py/gguf/             the converter's own gguf package (not PyPI's)
    <prefix>/share/llama.cpp/models/templates/         chat templates some model classes read
    <prefix>/share/llama.cpp/LICENSE
    <prefix>/share/llama.cpp/source.json               versions: llama-cpp-python, llama.cpp commit, ggml
    <site-packages>/llama_cpp/lib/                     libllama, libggml* and the tools (llama-quantize,
                                                       llama-imatrix, llama-perplexity, llama-bench)
    <prefix>/bin/<tool>                                symlinks to those tools

``<prefix>`` is ``sys.prefix`` (the venv); ``QATFORGE_LLAMA_CPP_DIR`` overrides the share directory
(and may hold the tools themselves). Run ``python -m qatforge.llamacpp install --sdist DIR --build DIR``
to create the layout. Nothing here imports llama_cpp, torch or transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from qatforge.spec.llamacpp_paths import (  # noqa: F401  (re-exported)
    ARCHITECTURES,
    ENV_DIR,
    PRE_TOKENIZERS,
    converter_architectures,
    known_pre_tokenizers,
    pre_tokenizer_names,
    share_dir,
)

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
SOURCE_INFO = "source.json"
_HINT = "run `make install` (it unpacks llama.cpp from the pinned llama-cpp-python sdist)"


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


def bindings_lib_dir() -> Path | None:
    """``llama_cpp/lib`` of the installed bindings (found without importing them), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def find_tool(name: str) -> Path:
    """Path of one of llama.cpp's ``TOOLS`` built from the pinned sources."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; qatforge installs {', '.join(TOOLS)}")
    candidates = []
    if os.environ.get(ENV_DIR):
        root = Path(os.environ[ENV_DIR])
        candidates += [root / name, root / "bin" / name, root / "build" / "bin" / name]
    candidates.append(Path(sys.prefix) / "bin" / name)
    lib = bindings_lib_dir()
    if lib is not None:
        candidates.append(lib / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(f"{name} not found (looked in {', '.join(str(c) for c in candidates)}); {_HINT}")


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
            build: str | os.PathLike | None = None) -> dict[str, Any]:
    """Copy the converter and its gguf-py into ``prefix``; with ``build``, the compiled llama.cpp too.

    ``sdist`` is the unpacked llama-cpp-python source distribution; ``build`` a directory holding
    the shared libraries and ``TOOLS`` of one cmake build of its sources. The libraries and tools
    go into the installed bindings' ``llama_cpp/lib`` (where they load from), with symlinks to the
    tools in ``<prefix>/bin``. The share directory is replaced atomically; returns the source info.
    """
    from qatforge.io import atomic_dir, write_json

    sdist, prefix = Path(sdist), Path(prefix)
    src = sdist / "vendor" / "llama.cpp"
    needed = [src / "convert_hf_to_gguf.py", src / "conversion", src / "gguf-py" / "gguf", src / "src" / "llama-vocab.cpp"]
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
        write_json(tmp / PRE_TOKENIZERS, pre_tokenizer_names(src / "src" / "llama-vocab.cpp"))
        write_json(tmp / ARCHITECTURES, converter_architectures(tmp))
    if build is not None:
        _install_build(Path(build), prefix)
    return info


def _install_build(build: Path, prefix: Path) -> None:
    """Libraries and tools of ``build`` into the bindings' ``llama_cpp/lib``; tool symlinks in ``prefix/bin``."""
    missing = [t for t in TOOLS if not os.access(build / t, os.X_OK)]
    if missing or not (build / "libllama.so").is_file():
        raise FileNotFoundError(f"{build} is not a llama.cpp build: missing {', '.join(missing or ['libllama.so'])}")
    lib = bindings_lib_dir()
    if lib is None:
        raise FileNotFoundError("llama_cpp (llama-cpp-python) is not installed in this interpreter")
    lib.mkdir(parents=True, exist_ok=True)
    for f in sorted(build.iterdir()):
        if f.name in TOOLS or f.name.startswith("lib"):
            tmp = lib / f".{f.name}.tmp"
            tmp.unlink(missing_ok=True)
            shutil.copy2(f, tmp, follow_symlinks=False)  # libX.so -> libX.so.0 links stay links
            os.replace(tmp, lib / f.name)
    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    for t in TOOLS:
        link = prefix / "bin" / t
        tmp = link.with_name(f".{t}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(lib / t)
        os.replace(tmp, link)


def run_converter(argv: list[str], pre_tokenizer: str | None = None, report: str | None = None,
                  add_space_prefix: bool | None = None) -> None:
    """Run the vendored ``convert_hf_to_gguf.main()`` in this process with ``argv``.

    The vendored gguf-py is put first on ``sys.path``. When ``pre_tokenizer`` is given it is used
    only if llama.cpp does not recognise the tokenizer (its ``get_vocab_base_pre`` hash lookup
    raises ``NotImplementedError``); ``add_space_prefix`` (not None) is written as
    ``tokenizer.ggml.add_space_prefix`` whatever the converter chose; the vendored files are not
    modified. ``report`` receives JSON ``{"pre_tokenizer": name, "recognized": bool}``.
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
    if add_space_prefix is not None:  # set last, just before the header (and so the key count) is written
        write_header = gguf.GGUFWriter.write_header_to_file

        def write_header_to_file(self, *args, **kwargs):
            self.add_add_space_prefix(add_space_prefix)
            return write_header(self, *args, **kwargs)

        gguf.GGUFWriter.write_header_to_file = write_header_to_file
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
    p = sub.add_parser("install", help="copy converter + gguf-py (+ a llama.cpp build) into the venv")
    p.add_argument("--sdist", required=True, help="unpacked llama-cpp-python sdist directory")
    p.add_argument("--prefix", default=sys.prefix, help="venv prefix (default: this interpreter's)")
    p.add_argument("--build", help="directory with the shared libraries and tools of one llama.cpp build")
    sub.add_parser("where", help="print the located converter and tools")
    c = sub.add_parser("convert", help="run the vendored convert_hf_to_gguf.py (args after --)")
    c.add_argument("--pre-tokenizer", help="llama.cpp pre-tokenizer name used when the hash is unknown")
    c.add_argument("--report", help="write which pre-tokenizer was used (JSON) here")
    c.add_argument("--add-space-prefix", choices=("true", "false"),
                   help="write tokenizer.ggml.add_space_prefix with this value")
    c.add_argument("converter_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "install":
        info = install(args.sdist, args.prefix, args.build)
        print(f"installed llama.cpp converter into {Path(args.prefix) / 'share' / 'llama.cpp'}: {info}")
    elif args.cmd == "convert":
        rest = args.converter_args[1:] if args.converter_args[:1] == ["--"] else args.converter_args
        prefix = None if args.add_space_prefix is None else args.add_space_prefix == "true"
        run_converter(rest, args.pre_tokenizer, args.report, prefix)
    else:
        print(find_converter())
        for tool in TOOLS:
            print(find_tool(tool))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Install-time facts for :mod:`qatforge.spec.capabilities`: ``python -m qatforge.capabilities write``.

Imports llama.cpp's converter (its own registry and MRO: torch, the vendored gguf-py) and reads
the ONNX model builder's source, so it runs once, in its own process, at ``make install``; nothing at parse time imports it.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from qatforge.spec.capabilities import ONNX_JSON, SENTENCEPIECE_JSON, SPM_FILE, onnx_versions, share_dir

_SPM_METHODS = ("_set_vocab_sentencepiece", "_create_vocab_sentencepiece")


def _self_call(node: ast.AST) -> str | None:
    """``name`` of a ``self.name(...)`` call, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"):
        return node.func.attr
    return None


def _is_parent_set_vocab(node: ast.AST) -> bool:
    """``super().set_vocab()`` (or ``Base.set_vocab(self)``)."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "set_vocab"
            and _self_call(node) is None)


def _mentions(node: ast.AST, text: str) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == text for n in ast.walk(node))


def _calls_spm(node: ast.AST) -> bool:
    return any(_self_call(n) in _SPM_METHODS for n in ast.walk(node))


def _tokenizer_class_test(test: ast.AST) -> list[str] | None:
    """The class names of ``tokenizer_class == "X"`` / ``in ("X", ...)``, else None."""
    if not (isinstance(test, ast.Compare) and all(isinstance(op, (ast.Eq, ast.In)) for op in test.ops)):
        return None
    left = list(ast.walk(test.left))
    if not any((isinstance(n, ast.Name) and n.id == "tokenizer_class")
               or (isinstance(n, ast.Constant) and n.value == "tokenizer_class") for n in left):
        return None
    names = [n.value for c in test.comparators for n in ast.walk(c)
             if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return names or None


def _return_guards(stmt: ast.stmt) -> list[str] | None:
    """The tokenizer classes under which a compound statement returns early; None when some return
    depends on anything else."""
    found: list[str] = []

    def visit(stmts: Sequence[ast.stmt], guard: list[str] | None) -> bool:
        for s in stmts:
            if isinstance(s, ast.Return):
                if guard is None:
                    return False
                found.extend(guard)
            elif isinstance(s, ast.If):
                inner = _tokenizer_class_test(s.test)
                if not (visit(s.body, guard if inner is None else inner) and visit(s.orelse, guard)):
                    return False
            elif not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                blocks = [getattr(s, f, None) or [] for f in ("body", "orelse", "finalbody")]
                blocks += [h.body for h in getattr(s, "handlers", None) or []]
                if not all(visit(b, guard) for b in blocks):
                    return False
        return True

    return found if visit([stmt], None) else None


def _raises_unless_file(stmt: ast.stmt, var: str) -> bool | None:
    """For ``if not <var>.is_file(): ...``: whether its body raises or exits; None for another statement."""
    t = stmt.test if isinstance(stmt, ast.If) else None
    if not (isinstance(t, ast.UnaryOp) and isinstance(t.op, ast.Not) and isinstance(t.operand, ast.Call)
            and isinstance(t.operand.func, ast.Attribute) and t.operand.func.attr in ("is_file", "exists")
            and isinstance(t.operand.func.value, ast.Name) and t.operand.func.value.id == var):
        return None
    return any(isinstance(n, ast.Raise) or (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                                            and n.func.attr == "exit")
               for s in stmt.body for n in ast.walk(s))


def set_vocab_requirement(sources: Sequence[str]) -> tuple[str, list[str]]:
    """Whether a converter class's ``set_vocab`` needs ``tokenizer.model``, from the source of each
    ``set_vocab`` on its MRO (most derived first).

    Returns ``("required", unless_tokenizer_classes)`` when a top-level statement reads it with no
    fallback (``_set_vocab_sentencepiece()``, ``_create_vocab_sentencepiece()``, or a ``tokenizer.model``
    path whose absence raises) and only ``tokenizer_class`` tests return before it;
    ``("optional", [])`` when the read is guarded (``try``/``if``: the converter falls back);
    ``("none", [])`` when another vocabulary is set first; ``("unknown", [])`` when an early return
    depends on anything else.
    """
    if not sources:
        return "none", []
    body = ast.parse(textwrap.dedent(sources[0])).body[0].body
    unless: list[str] = []
    conditional = False
    spm_path: str | None = None

    def required(extra: Sequence[str] = ()) -> tuple[str, list[str]]:
        return ("unknown", []) if conditional else ("required", sorted(set(unless) | set(extra)))

    for st in body:
        value = st.value if isinstance(st, (ast.Expr, ast.Return, ast.Assign)) else None
        if value is not None and _self_call(value) in _SPM_METHODS:
            return required()
        if value is not None and _is_parent_set_vocab(value):
            kind, extra = set_vocab_requirement(sources[1:])
            return required(extra) if kind == "required" else (kind, [])
        if value is not None and (_self_call(value) or "").startswith("_set_vocab_"):
            return "none", []
        if isinstance(st, ast.Assign) and _mentions(st, SPM_FILE) and isinstance(st.targets[0], ast.Name):
            spm_path = st.targets[0].id
            continue
        if spm_path is not None and (raises := _raises_unless_file(st, spm_path)) is not None:
            return required() if raises else ("optional", [])
        if isinstance(st, ast.Return):
            return "none", []
        if isinstance(st, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            if _mentions(st, SPM_FILE) or _calls_spm(st):
                return "optional", []
            if any(isinstance(n, ast.Return) for n in ast.walk(st)):
                guards = _return_guards(st)
                conditional |= guards is None
                unless += guards or []
    return ("unknown", []) if spm_path is not None else ("none", [])


def sentencepiece_architectures(converter_root: str | Path) -> dict[str, Any]:
    """``{"architectures": {arch: {"class", "unless_tokenizer_class"}}, "unknown": [...]}`` for the
    converter's text-model classes whose ``set_vocab`` needs ``tokenizer.model``.

    Imports the converter's ``conversion`` package (its own registry and MRO; needs torch and the
    vendored gguf-py, so it changes ``sys.path``: run it in its own process, as ``write`` does).
    """
    root = Path(converter_root)
    sys.path[:0] = [str(root / "gguf-py"), str(root)]
    import conversion

    if not conversion.TEXT_MODEL_MAP:
        raise ValueError(f"{root}: the converter registers no text models")
    out: dict[str, Any] = {}
    unknown = []
    for arch in sorted(conversion.TEXT_MODEL_MAP):
        try:
            cls = conversion.get_model_class(arch)
        except Exception:  # an architecture the package fails to load is not checked  # noqa: BLE001
            unknown.append(arch)
            continue
        owners = [k for k in cls.__mro__ if "set_vocab" in vars(k)]
        kind, unless = set_vocab_requirement([inspect.getsource(vars(k)["set_vocab"]) for k in owners])
        if kind == "required":
            out[arch] = {"class": owners[0].__name__, "unless_tokenizer_class": unless}
        elif kind == "unknown":
            unknown.append(arch)
    return {"architectures": out, "unknown": unknown}


def onnx_architectures() -> list[str]:
    """The architectures ONNX Runtime GenAI's model builder exports (``onnx_archs.builder_architectures``)."""
    from qatforge.spec.onnx_archs import builder_architectures

    archs = builder_architectures()
    if not archs:
        raise ValueError("onnxruntime_genai's model builder is not installed, or dispatches on no architecture")
    return archs


def write(gguf_dir: str | Path | None = None, onnx_dir: str | Path | None = None) -> list[Path]:
    """Write :data:`SENTENCEPIECE_JSON` (into ``gguf_dir``, default the converter's share directory)
    and :data:`ONNX_JSON` (into ``onnx_dir``, default :func:`share_dir`); returns the paths."""
    from qatforge.io import write_json
    from qatforge.llamacpp import find_converter, source_info

    converter = find_converter().parent
    spm = {"llama_cpp": source_info(), **sentencepiece_architectures(converter)}
    onnx = {"versions": onnx_versions(), "architectures": onnx_architectures()}
    paths = [Path(gguf_dir or converter) / SENTENCEPIECE_JSON, Path(onnx_dir or share_dir()) / ONNX_JSON]
    for path, data in zip(paths, (spm, onnx)):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qatforge.capabilities", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the install-time facts (run by `make install`)")
    w.add_argument("--gguf-dir", help=f"directory of {SENTENCEPIECE_JSON} (default: the converter's)")
    w.add_argument("--onnx-dir", help=f"directory of {ONNX_JSON} (default: <sys.prefix>/share/qatforge)")
    args = ap.parse_args(argv)
    for p in write(args.gguf_dir, args.onnx_dir):
        print(f"wrote {p}")
    return 0

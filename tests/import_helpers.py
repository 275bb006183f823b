"""The import statements of a Python file, read with ``ast`` (test_envs and test_imports)."""

from __future__ import annotations

import ast
from pathlib import Path


def import_statements(path: Path, module: str) -> list[tuple[str, tuple[str, ...]]]:
    """``(module, names)`` of every import anywhere in ``path`` (module ``module``), inside functions
    too, relative ones made absolute: ``import a.b`` gives ``("a.b", ())``, ``from m import x, y``
    gives ``("m", ("x", "y"))``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + [base] if base else parent)
            out.append((base, tuple(a.name for a in node.names)))
    return out

"""No import cycle between qatforge's modules, counting the imports inside functions too.

Every ``import`` / ``from ... import`` of a qatforge module (absolute or relative, at any depth of
the file) is an edge. ``from qatforge.a import b`` goes to ``qatforge.a.b`` when that is a module,
else to ``qatforge.a`` (for a package: its ``__init__``). Importing a submodule is not counted as
importing its package's ``__init__``, so a package that re-exports its submodules is no cycle with
them; a submodule importing names from its own package is.

Also: the spec layer (:mod:`qatforge.spec`) stays torch-free, and it is all of qatforge that the
Snakefile and rules/*.smk import at parse time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from import_helpers import import_statements

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SPEC = "qatforge.spec"
# What parse time must not load (the spec layer's whole point).
HEAVY = ("torch", "transformers", "torchao", "peft", "llama_cpp", "numpy", "polars")


def modules(src: Path = SRC) -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the qatforge package (packages by their ``__init__``)."""
    out = {}
    for path in sorted((src / "qatforge").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The qatforge modules that module ``name`` (file ``path``) imports anywhere in its source."""
    out = set()
    for base, names in import_statements(path, name):
        out |= {f"{base}.{a}" if f"{base}.{a}" in known else base for a in names} if names else {base}
    return {m for m in out if m.split(".")[0] == "qatforge"} - {name}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    mods = modules(src)
    graph = {name: imported(name, path, set(mods)) for name, path in mods.items()}
    unknown = {f"{m} -> {t}" for m, ts in graph.items() for t in ts if t not in mods}
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``comp`` (breadth-first inside it)."""
    start = min(comp)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & comp):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in qatforge:\n  " + "\n  ".join(" -> ".join(c) for c in found)


def test_graph_sees_function_level_relative_and_submodule_imports(tmp_path):
    pkg = tmp_path / "qatforge"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from qatforge.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from qatforge.sub.b import g\nfrom .c import h\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nimport os\n")
    (pkg / "sub" / "c.py").write_text("from qatforge.sub import g\n")
    graph = import_graph(tmp_path)
    assert graph == {"qatforge": set(), "qatforge.a": {"qatforge.sub.b"}, "qatforge.sub.b": {"qatforge.a"},
                     "qatforge.sub": {"qatforge.sub.b", "qatforge.sub.c"}, "qatforge.sub.c": {"qatforge.sub"}}
    assert sorted(cycles(graph)) == [["qatforge.a", "qatforge.sub.b", "qatforge.a"],
                                     ["qatforge.sub", "qatforge.sub.c", "qatforge.sub"]]


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{name}: from {base} import {a}" for name, path in modules().items()
           for base, names in import_statements(path, name) if base.split(".")[0] == "qatforge"
           for a in names if a.startswith("_") and not a.startswith("__")]
    assert not bad, "private names imported across modules (make them public in their home module):\n  " + \
        "\n  ".join(bad)


def spec_modules() -> list[str]:
    return [m for m in modules() if m == SPEC or m.startswith(SPEC + ".")]


def test_spec_layer_imports_no_heavy_package():
    """Importing every module of qatforge.spec (in a fresh interpreter) loads none of HEAVY; and no
    import statement in it, inside functions included, names anything but the standard library or
    qatforge.spec (the lazy ones the fresh import does not run)."""
    mods = spec_modules()
    assert len(mods) > 1
    code = ("import importlib, json, sys\n"
            f"for m in {mods!r}:\n    importlib.import_module(m)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}).stdout
    loaded = sorted(set(HEAVY) & set(json.loads(out)))
    assert not loaded, f"importing qatforge.spec loads {loaded}"
    bad = [f"{name}: {base}" for name in mods for base, _ in import_statements(modules()[name], name)
           if base.split(".")[0] not in sys.stdlib_module_names and base != SPEC and not base.startswith(SPEC + ".")]
    assert not bad, "qatforge.spec imports outside the standard library and itself:\n  " + "\n  ".join(bad)


def parse_time_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """``{file: qatforge modules}`` that the Snakefile and rules/*.smk import (their import lines,
    read as text; ``from qatforge import x`` counts as ``qatforge.x``)."""
    out = {}
    for path in [root / "Snakefile", *sorted((root / "rules").glob("*.smk"))]:
        found = set()
        for m in re.finditer(r"^[ \t]*(?:from[ \t]+(\S+)[ \t]+import[ \t]+\(?([^)#\n]*)|import[ \t]+([^#\n]+))",
                             path.read_text(), re.M):
            if m.group(1) == "qatforge":
                found |= {f"qatforge.{n.split()[0]}" for n in m.group(2).split(",") if n.strip()}
            elif m.group(1):
                found.add(m.group(1))
            else:
                found |= {n.split()[0] for n in m.group(3).split(",") if n.strip()}
        out[path.name] = {n for n in found if n.split(".")[0] == "qatforge"}
    return out


def test_parse_time_imports_only_the_spec_layer():
    found = parse_time_imports()
    assert found["common.smk"], "no qatforge import found in rules/common.smk: the pattern misses them"
    bad = [f"{f}: {n}" for f, names in found.items() for n in sorted(names) if n != SPEC and not n.startswith(SPEC + ".")]
    assert not bad, "parse time imports qatforge modules outside qatforge.spec:\n  " + "\n  ".join(bad)


def test_parse_time_import_lines_are_read(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "Snakefile").write_text("import os, qatforge.train as t\n")
    (tmp_path / "rules" / "a.smk").write_text("from qatforge import config as c, formats\n"
                                              "    from qatforge.spec.x import (\n  y,\n)\nimport re  # qatforge.z\n")
    assert parse_time_imports(tmp_path) == {"Snakefile": {"qatforge.train"},
                                            "a.smk": {"qatforge.config", "qatforge.formats", "qatforge.spec.x"}}

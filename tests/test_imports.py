"""No import cycle between qatforge's modules, counting the imports inside functions too.

Every ``import`` / ``from ... import`` of a qatforge module (absolute or relative, at any depth of
the file) is an edge. ``from qatforge.a import b`` goes to ``qatforge.a.b`` when that is a module,
else to ``qatforge.a`` (for a package: its ``__init__``). Importing a submodule is not counted as
importing its package's ``__init__``, so a package that re-exports its submodules is no cycle with
them; a submodule importing names from its own package is.
"""

from __future__ import annotations

from pathlib import Path

from import_helpers import import_statements

SRC = Path(__file__).resolve().parents[1] / "src"


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

"""Every rule's conda env (``--software-deployment-method conda``) provides what the rule needs.

Checked statically, without conda or network, against the real workflow (Snakemake API):

* the pip pins of every env file are exactly those of constraints.txt, the one place of the pins;
* every third-party module a rule's script can import (its own imports and, transitively, those of
  every qatforge module it reaches, including the lazy imports inside functions) belongs to a
  distribution the env pins or one those pins require (``importlib.metadata`` of this interpreter);
* llama.cpp (bindings, vendored converter, tools) is no pip pin: an env whose rules use it has a
  post-deploy script running tools/install_llama_cpp.sh, which builds every tool qatforge calls.
"""

from __future__ import annotations

import re
import shutil
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from import_helpers import import_statements
from packaging.requirements import Requirement

from qatforge import llamacpp

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
INSTALLER = ROOT / "tools" / "install_llama_cpp.sh"

# Modules a rule may import without its env providing them, with the reason.
OPTIONAL = {
    # train.backend auto/unsloth: imported only where CUDA is available and `import unsloth` works
    # (qatforge.train.settings checks find_spec first); installed by hand, pyproject's [unsloth] extra.
    "unsloth": "optional Unsloth backend",
    # llama.cpp's converter imports it in try/except ImportError, for Mistral-format models only.
    "mistral_common": "optional converter dependency",
}
# Modules a library imports lazily, for a feature a reached qatforge module uses, without
# requiring them: transformers renders tokenizer.apply_chat_template with jinja2, and imports
# torchao in from_pretrained of a TorchAO-quantized directory (evaluate of format torchao).
CHAT_TEMPLATE_MODULE = "jinja2"
LIBRARY_IMPORTS = {"qatforge.evaluate.hf": {"torchao"}}
# Modules that tools/install_llama_cpp.sh provides (run by the env's post-deploy script).
LLAMA_CPP_MODULES = {
    "llama_cpp": "llama-cpp-python, installed as a pure-Python package on this machine's build",
    "conversion": "the vendored converter's model-class package in <prefix>/share/llama.cpp",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[norm(name)] = version.strip()
    return pins


def env_spec(env_file: Path) -> tuple[list[str], list[str]]:
    """(conda dependencies, pip entries) of an env file."""
    deps = yaml.safe_load(env_file.read_text())["dependencies"]
    pip = next((d["pip"] for d in deps if isinstance(d, dict)), [])
    return [d for d in deps if isinstance(d, str)], pip


def env_requirements(env_file: Path) -> list[Requirement]:
    return [Requirement(entry) for entry in env_spec(env_file)[1]]


def post_deploy(env_file: Path) -> Path:
    """The post-deploy script Snakemake runs in the freshly created env (named like the env file)."""
    return env_file.with_name(env_file.stem + ".post-deploy.sh")


SHARED_POST_DEPLOY = ROOT / "tools" / "conda_post_deploy.sh"
RUNS_SHARED = r'^exec bash "\$\{QATFORGE_ROOT:-\$PWD\}/tools/conda_post_deploy\.sh"( --with-llama-cpp)?$'


def runs_installer(env_file: Path) -> bool:
    """The env's post-deploy script runs the shared one with --with-llama-cpp, which runs the installer."""
    script = post_deploy(env_file)
    m = re.search(RUNS_SHARED, script.read_text(), re.M) if script.is_file() else None
    return bool(m and m.group(1)) and re.search(
        r'^  "\$ROOT/tools/install_llama_cpp\.sh" "\$CONDA_PREFIX" "\$ROOT/constraints\.txt"$',
        SHARED_POST_DEPLOY.read_text(), re.M) is not None


def closure(requirements: list[Requirement]) -> set[str]:
    """Normalised names of the distributions these requirements pull in (their metadata here)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        key = (norm(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for sub in map(Requirement, requires):
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(sub)
    return {name for name, _ in seen}


def imported(path: Path, module: str) -> set[str]:
    """Absolute names of everything ``path`` (module ``module``) imports, anywhere in the file.

    ``from m import a`` gives ``m`` and ``m.a`` (``a`` may be a submodule).
    """
    return {n for base, names in import_statements(path, module) for n in (base, *(f"{base}.{a}" for a in names))}


def qatforge_file(module: str) -> Path | None:
    path = SRC.joinpath(*module.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def registry_imports(path: Path) -> set[str]:
    """Modules a file imports by name through the format registry (``formats.resolve`` of a
    record's ``runtime``, ``exporter`` or ``support``): every format's, since the format is data."""
    from qatforge.spec.formats import FORMATS

    text = path.read_text()
    if "resolve(" not in text:
        return set()
    return {ref.partition(":")[0] for field in ("runtime", "exporter", "support") if f".{field}" in text
            for ref in (getattr(f, field) for f in FORMATS.values()) if ref}


@cache
def reachable(script: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(third-party top-level modules, qatforge modules) that ``script`` can import."""
    third, seen = set(), set()
    todo = [(script, "__main__")]
    while todo:
        path, module = todo.pop()
        for name in imported(path, module) | registry_imports(path):
            top = name.split(".")[0]
            if top == "qatforge":  # importing a.b.c runs a, a.b and a.b.c
                parts = name.split(".")
                for sub in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                    file = qatforge_file(sub)
                    if file is not None and sub not in seen:
                        seen.add(sub)
                        todo.append((file, sub))
            elif top not in sys.stdlib_module_names:
                third.add(top)
    return frozenset(third), frozenset(seen)


@cache
def converter_imports() -> frozenset[str] | None:
    """Third-party modules of llama.cpp's vendored converter (None if not installed here)."""
    try:
        root = llamacpp.find_converter().parent
    except FileNotFoundError:
        return None
    files = {root / "convert_hf_to_gguf.py": "__main__"}
    for package, directory in (("conversion", root / "conversion"), ("gguf", root / "gguf-py" / "gguf")):
        files |= {f: f"{package}.{f.stem}" for f in directory.glob("*.py")}
    names = set().union(*(imported(f, module) for f, module in files.items()))
    tops = {n.split(".")[0] for n in names}
    return frozenset(t for t in tops - {"gguf", "conversion"} if t not in sys.stdlib_module_names)


@cache
def distributions_of() -> dict[str, list[str]]:
    """{top-level module: distributions providing it} of this interpreter."""
    return metadata.packages_distributions()


def uses_llama_cpp(script: Path) -> bool:
    third, modules = reachable(script)
    return "qatforge.llamacpp" in modules or bool(third & LLAMA_CPP_MODULES.keys())


def missing(script: Path, env_file: Path) -> list[str]:
    """What ``script`` can import that ``env_file`` does not provide."""
    third, reached = reachable(script)
    modules = set(third).union(*(LIBRARY_IMPORTS.get(m, set()) for m in reached))
    if any("apply_chat_template(" in qatforge_file(m).read_text() for m in reached):
        modules.add(CHAT_TEMPLATE_MODULE)
    if "qatforge.llamacpp" in reached:  # it runs the converter with this env's python
        modules |= converter_imports() or set()
    provided = closure(env_requirements(env_file))
    owners = distributions_of()
    problems = []
    for module in sorted(modules - OPTIONAL.keys()):
        if module in LLAMA_CPP_MODULES:
            if not runs_installer(env_file):
                problems.append(f"{module} ({LLAMA_CPP_MODULES[module]}): {post_deploy(env_file).name} "
                                "does not run tools/install_llama_cpp.sh")
        elif module not in owners:
            problems.append(f"{module}: not installed in the test interpreter, cannot map it to a distribution")
        elif not {norm(d) for d in owners[module]} & provided:
            problems.append(f"{module} (from {', '.join(sorted(set(owners[module])))}) is not pinned in "
                            f"{env_file.name} nor required by its pins")
    return problems


@pytest.fixture(scope="module")
def rules() -> dict[str, tuple[Path, Path | None]]:
    """{rule: (script, conda env file)} of every rule with a script, read by the Snakemake API."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import OutputSettings, ResourceSettings

    out = {}
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow = api.workflow(ResourceSettings(), snakefile=ROOT / "Snakefile", workdir=ROOT)._workflow
        for rule in workflow.rules:
            if rule.script:
                base = Path(rule.basedir.get_path_or_uri(secret_free=True))
                env = (base / rule.conda_env).resolve() if rule.conda_env else None
                out[rule.name] = ((base / rule.script).resolve(), env)
    assert len(out) > 10
    return out


def env_files() -> list[Path]:
    files = sorted((ROOT / "envs").glob("*.yaml"))
    assert files, "no env files in envs/"
    return files


def test_env_pins_are_those_of_constraints_txt():
    pins = constraint_pins()
    assert pins["torch"] == "2.13.0"
    for f in env_files():
        conda, pip = env_spec(f)
        assert "python=3.11" in conda and "pip" in conda, f.name
        for entry in pip:
            # no `-e ../`: conda runs pip beside Snakemake's copy of the env file (.snakemake/conda/)
            assert not entry.startswith("-"), f"{f.name}: {entry!r} (the post-deploy script installs qatforge)"
            req = Requirement(entry)
            name = norm(req.name)
            assert name != "llama-cpp-python", f"{f.name}: llama.cpp comes from the post-deploy installer"
            assert str(req.specifier) == f"=={pins.get(name)}", f"{f.name}: {req} is not {name}=={pins.get(name)}"


def test_env_pins_every_pinned_package_it_pulls_in():
    pins = constraint_pins()
    for f in env_files():
        listed = {norm(r.name) for r in env_requirements(f)}
        unpinned = (closure(env_requirements(f)) & pins.keys()) - listed
        assert not unpinned, f"{f.name} pulls in {sorted(unpinned)} without the constraints.txt pin"


def test_every_rule_has_an_env(rules):
    assert not [r for r, (_, env) in rules.items() if env is None], "rules without a conda env"
    assert all(env.is_file() and env.parent == ROOT / "envs" for _, env in rules.values())


def test_every_env_installs_qatforge_without_its_dependencies(rules):
    assert re.search(r'^"\$CONDA_PREFIX/bin/pip" install -q --no-deps -e "\$ROOT"$',
                     SHARED_POST_DEPLOY.read_text(), re.M)
    for env in {env for _, env in rules.values() if env is not None}:
        assert re.search(RUNS_SHARED, post_deploy(env).read_text(), re.M), post_deploy(env)


def test_rule_imports_are_provided_by_its_env(rules):
    assert all(qatforge_file(m) for m in LIBRARY_IMPORTS)
    problems = [f"{rule} ({env.name}): {p}" for rule, (script, env) in rules.items() if env is not None
                for p in missing(script, env)]
    assert not problems, "\n".join(problems)


def test_llama_cpp_rules_get_the_installer_and_its_build_tools(rules):
    assert {r for r, (s, _) in rules.items() if uses_llama_cpp(s)} >= {
        "gguf_convert", "gguf_imatrix", "gguf_quantize", "evaluate"}
    for rule, (script, env) in rules.items():
        if uses_llama_cpp(script):
            assert env is not None and runs_installer(env), f"{rule}: {env} gets no tools/install_llama_cpp.sh"
            conda = {re.split(r"[=<> ]", d)[0] for d in env_spec(env)[0]}
            assert {"cmake", "make", "c-compiler", "cxx-compiler"} <= conda, f"{env.name}: cannot build llama.cpp"
    text = INSTALLER.read_text()
    tools = re.search(r'^TOOLS="([^"]*)"$', text, re.M).group(1).split()
    assert sorted(tools) == sorted(llamacpp.TOOLS)
    assert re.search(r"cmake --build .* --target llama \$TOOLS", text)


def test_converter_imports_are_checked():
    if converter_imports() is None:
        pytest.skip("llama.cpp's converter is not installed here (make install)")
    assert {"torch", "numpy", "sentencepiece"} <= converter_imports()


def test_a_missing_package_is_caught(rules, tmp_path):
    """polars removed from the export env: gguf_convert and gguf_imatrix read parquet with it."""
    envs = shutil.copytree(ROOT / "envs", tmp_path / "envs")
    export = envs / "export.yaml"
    text = export.read_text()
    assert "polars==" in text
    export.write_text(re.sub(r"^\s*- polars==.*\n", "", text, flags=re.M))
    for rule in ("gguf_convert", "gguf_imatrix"):
        script, env = rules[rule]
        assert env.name == "export.yaml" and missing(script, env) == []
        assert any(p.startswith("polars ") for p in missing(script, export)), rule
    post_deploy(export).unlink()
    assert any(p.startswith("llama_cpp ") for p in missing(rules["gguf_convert"][0], export))

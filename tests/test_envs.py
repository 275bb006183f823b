"""The conda env files pin the same versions as constraints.txt (the one place of the pins)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            out[name.lower()] = version
    return out


def test_env_files_match_constraints():
    want = pins()
    files = sorted((ROOT / "envs").glob("*.yaml"))
    assert {f.stem for f in files} >= {"train", "export", "eval", "report"}
    for f in files:
        env = yaml.safe_load(f.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        for req in pip:
            if "==" in req:
                name, version = req.split("==")
                assert want.get(name.lower()) == version, f"{f.name}: {req} differs from constraints.txt"


def test_torch_is_pinned_to_the_cached_cpu_wheel():
    assert pins()["torch"] == "2.13.0"

"""The builtin base: its own warm-up corpus, and the per-machine cache keyed by the full recipe."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from qatforge import base, base_cache
from qatforge.io import read_json, sha256_path

RECIPE = {"steps": 2, "batch_size": 4, "lr": 1e-3, "vocab_size": 400, "corpus_size": 60, "corpus_seed": 0}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QATFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QATFORGE_BASE_CACHE", raising=False)
    return tmp_path / "cache" / "base"


def _build(out, kwargs=None, **over):
    kwargs = kwargs or {}
    logs: list[str] = []
    info = base.build("builtin:tiny-qwen3", out, builtin=RECIPE | over, seed=3, threads=1,
                      log=logs.append, **kwargs)
    return info, logs


def test_key_covers_every_recipe_field():
    key = base_cache.recipe_key(base.builtin_recipe(RECIPE, 3))
    assert key == base_cache.recipe_key(base.builtin_recipe(dict(reversed(RECIPE.items())), 3))
    for change in ({"steps": 3}, {"lr": 2e-3}, {"corpus_size": 61}, {"corpus_seed": 1}, {"vocab_size": 401},
                   {"max_len": 65}):
        assert base_cache.recipe_key(base.builtin_recipe(RECIPE | change, 3)) != key, change
    assert base_cache.recipe_key(base.builtin_recipe(RECIPE, 4)) != key


def test_warmup_length_is_its_own_not_the_datasets():
    """The recipe has model.builtin.max_len (256 by default, as before), stored in float32."""
    recipe = base.builtin_recipe(RECIPE, 3)
    assert recipe["max_len"] == 256 and recipe["dtype"] == "float32"
    assert base.builtin_recipe(RECIPE | {"max_len": 64}, 3)["max_len"] == 64
    assert base.default_recipe()["max_len"] == 256


def test_second_build_of_a_recipe_comes_from_the_cache_identically(cache, tmp_path, monkeypatch):
    first, _ = _build(tmp_path / "a")
    assert first["cache"] == "miss" and (cache / first["recipe_key"]).is_dir()
    second, logs = _build(tmp_path / "b")
    assert second["cache"] == "hit" and second["recipe_key"] == first["recipe_key"]
    assert any("machine cache" in line for line in logs)
    assert sha256_path(tmp_path / "a") == sha256_path(tmp_path / "b")  # the manifest aside
    assert read_json(tmp_path / "b" / "export.json")["provenance"]["info"]["cache"] == "hit"
    # A rebuild without the cache gives the same weights and tokenizer: the cache only saves time.
    monkeypatch.setenv("QATFORGE_BASE_CACHE", "0")
    rebuilt, _ = _build(tmp_path / "c")
    assert rebuilt["cache"] == "miss"
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "c" / f).read_bytes() == (tmp_path / "a" / f).read_bytes(), f


def test_damaged_entry_is_removed_and_rebuilt(cache, tmp_path):
    first, _ = _build(tmp_path / "a", steps=1)
    entry = cache / first["recipe_key"]
    (entry / "model.safetensors").write_bytes(b"not a model")
    again, logs = _build(tmp_path / "b", steps=1)
    assert again["cache"] == "miss" and any("damaged" in line for line in logs)
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    assert (entry / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()


def test_cache_can_be_turned_off(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("QATFORGE_BASE_CACHE", "0")
    info, _ = _build(tmp_path / "a", steps=1)
    assert info["cache"] == "miss" and not cache.exists()


def test_outliers_are_planted_after_the_cache(cache, tmp_path):
    """The warm-up is shared by every outlier setting (one cache entry); the planted base records
    its channels and holds them, the plain one stays the cached warm-up."""
    import torch
    from safetensors.torch import load_file

    from qatforge import outliers

    plain, _ = _build(tmp_path / "plain")
    planted, logs = _build(tmp_path / "planted", outliers={"channels": 8, "scale": 16})
    assert planted["cache"] == "hit" and planted["recipe_key"] == plain["recipe_key"]
    assert plain["outliers"]["channels"] == []
    want = outliers.outlier_channels(256, 8, seed=3)
    assert planted["outliers"]["channels"] == want and planted["outliers"]["scale"] == 16
    assert any("planted outlier channels" in line for line in logs)
    assert read_json(tmp_path / "planted" / "export.json")["provenance"]["info"]["outliers"]["channels"] == want
    a = load_file(tmp_path / "plain" / "model.safetensors")
    b = load_file(tmp_path / "planted" / "model.safetensors")
    key = "model.layers.0.post_attention_layernorm.weight"
    assert torch.equal(b[key][want] * 16, a[key][want])
    assert torch.equal(b["model.layers.0.mlp.up_proj.weight"][:, want], a["model.layers.0.mlp.up_proj.weight"][:, want] * 16)
    entry = cache / plain["recipe_key"] / "model.safetensors"
    assert sha256_path(entry) == sha256_path(tmp_path / "plain" / "model.safetensors")


# --- the shipped builtin base ---------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "builtin" / "tiny-qwen3"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A shipped base of the small RECIPE (as ``python -m qatforge.base --ship`` writes one)."""
    d = tmp_path_factory.mktemp("assets") / "tiny-qwen3"
    base.ship_builtin(d, base.builtin_recipe(RECIPE, 3), threads=1)
    return d


def test_shipped_base_is_copied_when_the_recipe_is_the_shipped_one(cache, shipped, tmp_path):
    record = read_json(shipped / base_cache.SHIPPED_RECORD)
    assert set(record["files"]) >= set(base_cache.REPRODUCIBLE) | {"warmup.json"}
    info, logs = _build(tmp_path / "a", {"shipped": shipped})
    assert info["cache"] == "shipped" and not cache.exists()  # nothing built, nothing cached
    assert any("copied from the shipped" in line and "checked" in line for line in logs)
    for name, sha in record["files"].items():
        assert sha256_path(tmp_path / "a" / name) == sha, name
    assert read_json(tmp_path / "a" / "config.json")["dtype"] == "float32"
    assert read_json(tmp_path / "a" / "export.json")["provenance"]["info"]["cache"] == "shipped"
    # Another recipe builds (and caches) as before; the same code builds the shipped bytes.
    other, logs = _build(tmp_path / "b", {"shipped": shipped}, steps=1)
    assert other["cache"] == "miss" and any("not the one shipped" in line for line in logs)
    rebuilt, _ = _build(tmp_path / "c")
    assert rebuilt["cache"] == "miss"
    assert base_cache.hash_mismatches(tmp_path / "c", {n: record["files"][n] for n in base_cache.REPRODUCIBLE}) == []


@pytest.mark.parametrize("damage", ["altered", "missing"])
def test_damaged_shipped_file_is_refused_by_name(cache, shipped, tmp_path, damage):
    broken = tmp_path / "tiny-qwen3"
    shutil.copytree(shipped, broken)
    f = broken / "model.safetensors"
    if damage == "missing":
        f.unlink()
    else:
        raw = bytearray(f.read_bytes())
        raw[-1] ^= 1
        f.write_bytes(bytes(raw))
    with pytest.raises(base_cache.ShippedBaseError, match=rf"damaged: {re.escape(str(f))}: .*recorded"):
        _build(tmp_path / "out", {"shipped": broken})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped builtin base")
def test_repository_ships_the_default_recipe_on_the_pinned_stack():
    """assets/builtin/tiny-qwen3 is intact, is the base of config/config.yaml's recipe, and was built
    with the versions constraints.txt pins (rebuild: python -m qatforge.base --ship ...)."""
    root = SHIPPED.parents[2]
    record = read_json(SHIPPED / base_cache.SHIPPED_RECORD)
    assert base_cache.hash_mismatches(SHIPPED, record["files"]) == []
    assert set(base_cache.file_hashes(SHIPPED)) == set(record["files"])
    assert record["recipe"] == base.default_recipe(root / "config/config.yaml", root / "config/schema.yaml")
    pins = dict(re.findall(r"(?m)^([A-Za-z0-9_.-]+)==([^\s;#]+)", (root / "constraints.txt").read_text()))
    for name, version in record["versions"].items():
        assert version.split("+")[0] == pins[name], name

"""The builtin base: its own warm-up corpus, and the per-machine cache keyed by the full recipe."""

from __future__ import annotations

import pytest

from qatforge import base, base_cache
from qatforge.io import read_json, sha256_path

RECIPE = {"steps": 2, "batch_size": 4, "lr": 1e-3, "vocab_size": 400, "corpus_size": 60, "corpus_seed": 0}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QATFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QATFORGE_BASE_CACHE", raising=False)
    return tmp_path / "cache" / "base"


def _build(out, **over):
    logs: list[str] = []
    info = base.build("builtin:tiny-qwen3", out, builtin=RECIPE | over, seed=3, max_tokens=64, threads=1,
                      log=logs.append)
    return info, logs


def test_key_covers_every_recipe_field():
    key = base_cache.recipe_key(base.builtin_recipe(RECIPE, 3, 64))
    assert key == base_cache.recipe_key(base.builtin_recipe(dict(reversed(RECIPE.items())), 3, 64))
    for change in ({"steps": 3}, {"lr": 2e-3}, {"corpus_size": 61}, {"corpus_seed": 1}, {"vocab_size": 401}):
        assert base_cache.recipe_key(base.builtin_recipe(RECIPE | change, 3, 64)) != key, change
    assert base_cache.recipe_key(base.builtin_recipe(RECIPE, 4, 64)) != key
    assert base_cache.recipe_key(base.builtin_recipe(RECIPE, 3, 65)) != key


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

"""Atomic writes, manifests, hash verification and file validation (issue 7)."""

from __future__ import annotations

import struct

import pytest

from qatforge import io, verify
from qatforge.spec.formats import ArtifactError, check_gguf


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with io.atomic_dir(final) as tmp:
            (tmp / "weights.bin").write_bytes(b"x" * 10)
            raise RuntimeError("killed")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_replaces_only_on_success(tmp_path):
    final = tmp_path / "a.json"
    io.write_json(final, {"v": 1})
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_file(final) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert io.read_json(final) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_manifest_and_verify_detect_tampering(tmp_path):
    res = tmp_path / "results"
    d = res / "runs" / "r" / "merged"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights")
    f = res / "runs" / "r" / "gguf" / "M-Q8_0.gguf"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"GGUF....")
    rec = io.write_manifest(d, {"run": "r"})
    io.write_manifest(f, {"run": "r", "quant": "Q8_0"})
    assert rec["sha256"] == io.sha256_path(d) and (d / "export.json").is_file()
    ok, bad = verify.verify(res)
    assert len(ok) == 2 and bad == []
    (d / "model.safetensors").write_bytes(b"weightz")
    ok, bad = verify.verify(res)
    assert len(bad) == 1 and "merged" in bad[0]
    assert verify.main([str(res)]) == 1


def test_free_space_check_names_the_target(tmp_path):
    with pytest.raises(OSError, match="not enough disk space for .*big.gguf"):
        io.check_free_space(tmp_path / "big.gguf", 10**18)
    io.check_free_space(tmp_path / "small.gguf", 1)


def _gguf_header(version=3, n_tensors=1, n_kv=1):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def test_gguf_header_validation(tmp_path):
    good = tmp_path / "good.gguf"
    good.write_bytes(_gguf_header() + b"\0" * 64)
    assert check_gguf(good) == 3
    cases = {
        "trunc.gguf": (b"GGUF\x03\x00", "truncated"),
        "foreign.gguf": (b"PK\x03\x04" + b"\0" * 40, "not a GGUF file"),
        "v9.gguf": (_gguf_header(version=9), "unsupported GGUF version 9"),
    }
    for name, (data, needle) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ArtifactError, match=needle) as e:
            check_gguf(p)
        assert name in str(e.value)

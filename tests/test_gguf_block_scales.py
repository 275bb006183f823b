"""Q4_0 tensors rewritten under given block scales: llama-quantize's bytes at its own scales, the
fake quantizer's values at any others, and a file llama.cpp runs (real llama-quantize, gguf-py and
llama.cpp; nothing mocked)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from qatforge.export.gguf.block_scales import q4_0_blocks, rewrite_q4_0
from qatforge.gguf_fake_quant import block_scales, dequantized, dequantized_with_scales

THREADS = 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny checkpoint as a BF16 GGUF, and llama-quantize's Q4_0 of it in llama.cpp's QAT mix
    (token embedding and output at Q8_0): the pipeline's source and PTQ file."""
    from export_helpers import tiny_checkpoint

    from qatforge.export import gguf

    d = tmp_path_factory.mktemp("block_scales")
    bf16 = d / "Tiny-BF16.gguf"
    gguf.convert(tiny_checkpoint(tmp_path_factory), bf16, outtype="bf16", pre_tokenizer="qwen2")
    q4 = d / "Tiny-Q4_0.gguf"
    gguf.quantize(bf16, q4, qtype="Q4_0", threads=THREADS,
                  options={"token_embedding_type": "Q8_0", "output_tensor_type": "Q8_0"})
    return bf16, q4


def _tensors(path):
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path)).tensors}


def _source(bf16, name) -> np.ndarray:
    from gguf import quants

    t = _tensors(bf16)[name]
    shape = tuple(int(n) for n in reversed(t.shape))
    return quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)


def _own(x: np.ndarray) -> np.ndarray:
    """llama.cpp's own Q4_0 scales of ``x [rows, k·32]``, ``[rows, k]``."""
    return block_scales(torch.from_numpy(x).reshape(-1, 32)).reshape(x.shape[0], -1).numpy()


def _q4_0_names(path):
    return sorted(n for n, t in _tensors(path).items() if t.tensor_type.name == "Q4_0")


def test_format_scales_give_llama_quantize_bytes(files, tmp_path):
    """Every Q4_0 tensor rewritten at llama.cpp's own scales: the file is llama-quantize's, byte for byte."""
    bf16, q4 = files
    names = _q4_0_names(q4)
    assert sum(n.startswith("blk.") for n in names) == 2 * 7 and "token_embd.weight" not in names
    out = tmp_path / "rewritten.gguf"
    shutil.copy(q4, out)
    # Scribble over the copy's Q4_0 bytes first, so equality cannot come from bytes left untouched.
    from gguf import GGUFReader

    r = GGUFReader(str(out), "r+")
    for t in r.tensors:
        if t.name in names:
            t.data[...] = 0xA5
    r.data.flush()
    del r
    assert out.read_bytes() != q4.read_bytes()
    done = rewrite_q4_0(out, bf16, {n: _own(_source(bf16, n)) for n in names})
    assert sorted(done) == names
    assert out.read_bytes() == q4.read_bytes()


def test_learned_scales_dequantize_as_the_fake_quantizer(files, tmp_path):
    """Scales off llama.cpp's own (some smaller than |max|/8, so the clamp binds): gguf-py's
    dequantization of the written tensor equals the training-side fake quantizer bit for bit,
    and no other tensor changes."""
    from gguf import quants

    bf16, q4 = files
    names = _q4_0_names(q4)
    rng = np.random.default_rng(0)
    scales = {}
    for n in names:
        d = _own(_source(bf16, n))
        scales[n] = (d * np.exp(rng.normal(0, 0.25, d.shape))).astype(np.float32)
    out = tmp_path / "learned.gguf"
    shutil.copy(q4, out)
    rewrite_q4_0(out, bf16, scales)
    before, after = _tensors(q4), _tensors(out)
    saturated = 0
    for name, t in after.items():
        if name not in scales:
            assert np.array_equal(np.asarray(t.data), np.asarray(before[name].data)), name
            continue
        got = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(_source(bf16, name).shape)
        src = torch.from_numpy(_source(bf16, name))
        want = dequantized_with_scales(src, torch.from_numpy(scales[name])).numpy()
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name
        assert not np.array_equal(got, dequantized(src, "Q4_0").numpy()), name
        saturated += int((np.abs(src.numpy()) > 8.5 * np.repeat(np.abs(scales[name]), 32, axis=1)).sum())
    assert saturated > 0  # the clamp at 0 was exercised


def test_rewritten_file_runs_in_llama_cpp(files, tmp_path):
    """llama.cpp loads the rewritten file and its logits follow the new weights: finite, and not
    the PTQ file's."""
    from qatforge.evaluate.gguf import LlamaCppRuntime

    bf16, q4 = files
    names = _q4_0_names(q4)
    out = tmp_path / "learned.gguf"
    shutil.copy(q4, out)
    rewrite_q4_0(out, bf16, {n: _own(_source(bf16, n)) * np.float32(0.8) for n in names})
    ids = [1, 5, 9, 14, 3]
    a = LlamaCppRuntime(q4, n_ctx=64).logits(ids)
    b = LlamaCppRuntime(out, n_ctx=64).logits(ids)
    assert np.isfinite(b).all() and a.shape == b.shape
    assert np.abs(a - b).max() > 1e-3


def test_blocks_by_hand():
    """One block at d = 1/64: x·64 + 8.5 truncated, clamped to [0, 15], nibbles low/high."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1], x[0, 16], x[0, 17] = -8 / 64, 7 / 64, -20 / 64, 3 / 64  # -20/64 saturates at 0
    out = q4_0_blocks(x, np.array([[1 / 64]], np.float32))
    assert out.shape == (1, 18)
    assert out[0, :2].view(np.float16)[0] == np.float16(1 / 64)
    assert out[0, 2] == 0 | (0 << 4) and out[0, 3] == 15 | (11 << 4) and out[0, 4] == 8 | (8 << 4)
    assert q4_0_blocks(np.zeros((1, 32), np.float32), np.zeros((1, 1), np.float32))[0, 2:].tolist() == [0x88] * 16


def test_nothing_written_on_bad_input(files, tmp_path):
    bf16, q4 = files
    names = _q4_0_names(q4)
    out = tmp_path / "bad.gguf"
    shutil.copy(q4, out)
    good = {n: _own(_source(bf16, n)) * np.float32(0.8) for n in names}
    shape = good[names[0]].shape
    cases = [
        ({**good, "token_embd.weight": np.ones((1, 1), np.float32)}, "token_embd.weight is Q8_0, not Q4_0"),
        ({**good, "blk.9.attn_q.weight": np.ones(shape, np.float32)}, "no tensor 'blk.9.attn_q.weight'"),
        ({**good, names[-1]: np.ones((shape[0], shape[1] + 1), np.float32)}, f"{names[-1]}: scales of shape"),
    ]
    for scales, message in cases:
        with pytest.raises((KeyError, ValueError), match=message):
            rewrite_q4_0(out, bf16, scales)
        assert out.read_bytes() == q4.read_bytes()  # every name is checked before any byte is written
    with pytest.raises(ValueError, match="finite"):
        q4_0_blocks(np.zeros((1, 32), np.float32), np.array([[np.nan]], np.float32))

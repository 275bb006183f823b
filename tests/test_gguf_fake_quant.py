"""GGUF fake-quantizers (Q4_0, Q8_0) against gguf-py's quantizer and against llama-quantize itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qatforge.gguf_fake_quant import BLOCK_SIZE, QTYPES, dequantized, fake_quantize

THREADS = 2


def _bits(a) -> np.ndarray:
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _assert_bit_identical(got, ref, what=""):
    g, r = _bits(got), _bits(ref)
    assert g.shape == r.shape, what
    bad = np.argwhere(g != r)
    assert bad.size == 0, (f"{what}: {len(bad)} values differ, first at {bad[0].tolist()}: "
                           f"got {g.view(np.float32)[tuple(bad[0])]!r} ref {r.view(np.float32)[tuple(bad[0])]!r}")


def _gguf_py_roundtrip(w: np.ndarray, qtype: str) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants  # gguf-py

    t = GGMLQuantizationType[qtype]
    return quants.dequantize(quants.quantize(w, t), t)


def _edge_blocks(qtype: str) -> np.ndarray:
    """Rows of 32-blocks hitting the rounding boundaries, outliers, ties and zeros exactly."""
    rows = []
    rng = np.random.default_rng(123)
    if qtype == "Q4_0":
        d = np.float32(2.0 ** -6)  # max = -8 d exactly, so id = 1/d = 64 and x*id is exact
        steps = np.arange(-8, 8, dtype=np.float32)  # x = d (j + 0.5): x*id + 8.5 is an exact integer
        half = (steps + np.float32(0.5)) * d
        for mid in (half, np.nextafter(half, np.float32(np.inf)), np.nextafter(half, np.float32(-np.inf))):
            block = np.concatenate([[np.float32(-8) * d], mid, mid[:15]]).astype(np.float32)
            rows.append(block)
            rows.append(-block)  # positive max: d < 0
    else:
        d = np.float32(2.0 ** -7)  # amax = 127 d exactly, id = 128
        k = np.arange(-16, 15, dtype=np.float32)
        half = (k + np.float32(0.5)) * d  # x*id = k + 0.5: roundf goes away from zero
        for mid in (half, np.nextafter(half, np.float32(np.inf)), np.nextafter(half, np.float32(-np.inf))):
            rows.append(np.concatenate([[np.float32(127) * d], mid]).astype(np.float32))
    base = (rng.standard_normal(BLOCK_SIZE) * 0.01).astype(np.float32)
    for sign in (1, -1):  # a single large outlier
        b = base.copy()
        b[rng.integers(BLOCK_SIZE)] = sign * 3.7
        rows.append(b)
    tie = base.copy()  # equal magnitudes of opposite sign: the first one sets the sign of d
    tie[3], tie[20] = -0.5, 0.5
    rows += [tie, -tie]
    zeros = np.zeros(BLOCK_SIZE, np.float32)
    mixed = zeros.copy()
    mixed[1::2] = -0.0  # first element +0.0 (see test_negative_zero_block for a leading -0.0)
    rows += [zeros, mixed]
    rows.append((base * np.float32(1e-6)).astype(np.float32))  # fp16(d) underflows to (sub)normal/zero
    rows.append(np.full(BLOCK_SIZE, np.float32(0.3)))  # constant block
    return np.stack(rows)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_matrices_match_gguf_py(qtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g) * (0.02 * (seed + 1))
    w[5, 40] = 1.5  # outliers
    w[7, 100] = -2.0
    w[9, 64:96] = 0.0  # an all-zero block
    ref = _gguf_py_roundtrip(w.numpy(), qtype)
    _assert_bit_identical(fake_quantize(w, qtype), ref, f"{qtype} seed {seed}")


@pytest.mark.parametrize("qtype", QTYPES)
def test_edge_blocks_match_gguf_py(qtype):
    w = _edge_blocks(qtype)
    _assert_bit_identical(fake_quantize(torch.from_numpy(w), qtype), _gguf_py_roundtrip(w, qtype), qtype)


def test_edge_values_by_hand():
    d = 2.0 ** -6
    # Q4_0, max -8d: x/d = 3.5 -> trunc(3.5 + 8.5) = 12 -> (12 - 8) d; x/d = -3.5 -> trunc(5) = 5 -> -3 d.
    w = torch.zeros(BLOCK_SIZE)
    w[0], w[1], w[2], w[3] = -8 * d, 3.5 * d, -3.5 * d, 8 * d
    got = fake_quantize(w, "Q4_0")
    assert got[:4].tolist() == [-8 * d, 4 * d, -3 * d, 7 * d]  # +8d clamps to q = 15
    # Q8_0, amax 127 d: x/d = +-2.5 -> +-3 (roundf), not +-2 (round half to even).
    d = 2.0 ** -7
    w = torch.zeros(BLOCK_SIZE)
    w[0], w[1], w[2] = 127 * d, 2.5 * d, -2.5 * d
    assert fake_quantize(w, "Q8_0")[:3].tolist() == [127 * d, 3 * d, -3 * d]


def test_negative_zero_block():
    """llama.cpp's scan starts from max = +0.0, so an all-zero block has d = +0.0 / -8 = -0.0 and
    dequantizes to -0.0 whatever the zeros' signs (gguf-py picks the first element, so for a block
    starting with -0.0 it gives +0.0; llama-quantize is checked in test_matches_llama_quantize)."""
    w = torch.zeros(2, BLOCK_SIZE)
    w[0, 0] = -0.0
    w[1] = -0.0
    q4 = _bits(fake_quantize(w, "Q4_0"))
    assert (q4 == np.float32(-0.0).view(np.uint32)).all()
    q8 = _bits(fake_quantize(w, "Q8_0"))  # d = +0.0 / 127 = +0.0, q = 0: +0.0
    assert (q8 == 0).all()


@pytest.mark.parametrize("qtype", QTYPES)
def test_straight_through_gradient(qtype):
    w = (torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 0.1).requires_grad_()
    out = fake_quantize(w, qtype)
    _assert_bit_identical(out, dequantized(w, qtype), qtype)  # the STE does not perturb the forward
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    w.grad = None
    g = torch.randn(8, 64)
    fake_quantize(w, qtype).backward(g)
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("qtype", QTYPES)
def test_bfloat16_input(qtype):
    w = (torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(1)) * 0.1).to(torch.bfloat16)
    w.requires_grad_()
    out = fake_quantize(w, qtype)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    ref = _gguf_py_roundtrip(w.detach().float().numpy().reshape(-1, 64), qtype).reshape(w.shape)
    _assert_bit_identical(dequantized(w, qtype), ref, qtype)  # float32 result of the exact bf16 upcast
    assert torch.equal(out, torch.from_numpy(ref).to(torch.bfloat16))
    out.float().sum().backward()
    assert w.grad.dtype == torch.bfloat16 and torch.equal(w.grad, torch.ones_like(w))


def test_errors():
    with pytest.raises(ValueError, match="not divisible by 32"):
        fake_quantize(torch.zeros(4, 48), "Q4_0")
    with pytest.raises(ValueError, match="unsupported GGUF fake-quant type 'Q4_K'"):
        fake_quantize(torch.zeros(4, 64), "Q4_K")
    with pytest.raises(ValueError, match="floating-point"):
        fake_quantize(torch.zeros(4, 64, dtype=torch.int32), "Q8_0")


# --------------------------------------------------------------------------- llama-quantize


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    """An F32 GGUF of the tiny checkpoint (float32 weights, some blocks set to edge values)."""
    import shutil

    from export_helpers import tiny_checkpoint
    from safetensors.torch import load_file, save_file

    from qatforge.export import gguf

    src = tiny_checkpoint(tmp_path_factory)
    d = tmp_path_factory.mktemp("fq")
    hf = d / "hf"
    shutil.copytree(src, hf)
    files = sorted(hf.glob("*.safetensors"))
    for f in files:
        tensors = {k: v.float().contiguous() for k, v in load_file(f).items()}
        for name, t in tensors.items():
            if name.endswith("mlp.down_proj.weight") and t.dim() == 2:
                for qtype, row in zip(QTYPES, (0, 1)):
                    e = torch.from_numpy(_edge_blocks(qtype)).reshape(-1)
                    n = min(e.numel(), t.shape[1])
                    t[row, :n] = e[:n]
                t[2, :BLOCK_SIZE] = -0.0  # an all-(-0.0) block
                t[3, 0], t[3, 1:BLOCK_SIZE] = -0.0, 0.0  # leading -0.0, then +0.0
        save_file(tensors, f, metadata={"format": "pt"})
    out = d / "Tiny-F32.gguf"
    gguf.convert(hf, out, outtype="f32", pre_tokenizer="qwen2")
    return out


def _tensors(path):
    from gguf import GGUFReader, quants

    out = {}
    for t in GGUFReader(str(path)).tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # numpy order: [rows, row length]
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            arr = np.asarray(t.data).astype(np.float32).reshape(shape)
        else:
            arr = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        out[t.name] = (t.tensor_type.name, arr)
    return out


@pytest.mark.parametrize("qtype", QTYPES)
def test_matches_llama_quantize(f32_gguf, qtype):
    from qatforge.export import gguf

    src = _tensors(f32_gguf)
    assert {v[0] for v in src.values()} == {"F32"}
    out = f32_gguf.with_name(f"Tiny-{qtype}-pure.gguf")
    gguf.quantize(f32_gguf, out, qtype=qtype, threads=THREADS, options={"pure": True})
    checked = []
    for name, (ttype, arr) in _tensors(out).items():
        if ttype != qtype:
            assert arr.ndim == 1 or ttype == "F32", (name, ttype)  # only 1-D norms stay F32
            continue
        assert arr.ndim == 2, name
        _assert_bit_identical(fake_quantize(torch.from_numpy(src[name][1]), qtype), arr, f"{qtype} {name}")
        checked.append(name)
    assert "token_embd.weight" in checked and "output.weight" in checked
    assert sum(n.startswith("blk.") for n in checked) == 2 * 7, checked  # every linear of both layers
    # The injected edge blocks reached llama-quantize unchanged.
    down = src["blk.0.ffn_down.weight"][1]
    assert (_bits(down[2, :BLOCK_SIZE]) == np.float32(-0.0).view(np.uint32)).all()

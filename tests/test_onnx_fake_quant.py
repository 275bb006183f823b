"""MatMulNBits fake quantizers against ONNX Runtime's own quantizer and against the tensors the
ONNX Runtime GenAI builder writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qatforge.onnx_fake_quant import dequantized, fake_quantize, fake_quantize_activations, quantize

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "builtin" / "tiny-qwen3"


def _ort_quantize(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's ``quantize_matmul_{4,8}bits`` (what the builder's DEFAULT quantizer calls) of an
    ``nn.Linear`` weight ``[N, K]``: q ``[N, K]`` and scales ``[N, K / block]``."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w.shape
    per_byte, blocks = 8 // bits, k // block
    packed = np.zeros((n, blocks, block // per_byte), dtype=np.uint8)
    zero_points = np.zeros((n, (blocks + per_byte - 1) // per_byte), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, np.ascontiguousarray(w.T), scales, zero_points, block, n, k, True)
    return _unpack(packed, bits).reshape(n, k), scales


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' B bytes as integers (4 bits: the low nibble first)."""
    return (np.stack([packed & 0x0F, packed >> 4], -1) if bits == 4 else packed).astype(np.int32)


def _cases(rng) -> dict[str, np.ndarray]:
    normal = rng.standard_normal((48, 256)).astype(np.float32)
    return {
        "normal": normal * rng.uniform(1e-3, 10, (48, 1)).astype(np.float32),
        # half-integer multiples of the scale: every value a rounding tie (roundf, not half-to-even)
        "ties": (rng.integers(-16, 17, (48, 256)) / 2).astype(np.float32),
        # |max| == |min|: the block's scale takes the minimum
        "equal_magnitudes": np.tile(np.array([1.0, -1.0] * 16, np.float32), (48, 8)),
        "negative_outlier": np.where(np.arange(256) % 32 == 5, -9.0, normal).astype(np.float32),
        "zero_blocks": np.where(np.arange(256) < 64, 0.0, normal).astype(np.float32),
        "bf16_values": torch.from_numpy(normal).to(torch.bfloat16).float().numpy(),
    }


@pytest.mark.parametrize("bits", [4, 8])
def test_bit_identical_to_onnxruntimes_quantizer(bits):
    for name, w in _cases(np.random.default_rng(bits)).items():
        q_ref, s_ref = _ort_quantize(w, bits, 32)
        q, s = quantize(torch.from_numpy(w), bits, 32)
        assert np.array_equal(q.reshape(w.shape).numpy(), q_ref), name
        assert np.array_equal(s.reshape(s_ref.shape).numpy().view(np.uint32), s_ref.view(np.uint32)), name
        mid = 1 << (bits - 1)
        expect = ((q_ref - mid).reshape(-1, 32).astype(np.float32) * s_ref.reshape(-1, 1)).reshape(w.shape)
        assert np.array_equal(dequantized(torch.from_numpy(w), bits, 32).numpy().view(np.uint32), expect.view(np.uint32))


@pytest.fixture(scope="module")
def builder_int4(tmp_path_factory):
    """The builder's int4 folder (block 32, the pipeline's variant) of the shipped tiny Qwen3."""
    from qatforge.export.onnx import export

    out = tmp_path_factory.mktemp("onnx") / "int4"
    export(SHIPPED, out, {"precision": "int4", "block_size": 32})
    return out


def test_bit_identical_to_the_builders_int4_tensors(builder_int4):
    """Every MatMulNBits of the builder's int4 model (the 20 projections, q/k/v fused, and the LM
    head) holds exactly quantize() of the checkpoint's weights."""
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import load_file

    model = onnx.load(str(builder_int4 / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    hf = load_file(str(SHIPPED / "model.safetensors"))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 4 * 5 + 1
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["bits"], attrs["block_size"], len(node.input)) == (4, 32, 3)  # symmetric: no zero points
        path = node.name.split("/")  # /model/layers.<i>/attn/qkv_proj/MatMul_Q4, /lm_head/MatMul_Q4
        if path[1] == "lm_head":
            w = hf["lm_head.weight"]
        else:
            layer, proj = path[2].split(".")[1], path[4]
            group = "self_attn" if path[3] == "attn" else "mlp"
            parts = ("q_proj", "k_proj", "v_proj") if proj == "qkv_proj" else (proj,)
            w = torch.cat([hf[f"model.layers.{layer}.{group}.{p}.weight"] for p in parts])
        q, s = quantize(w, 4, 32)
        stored_q = _unpack(numpy_helper.to_array(inits[node.input[1]]), 4).reshape(q.shape)
        stored_s = numpy_helper.to_array(inits[node.input[2]]).reshape(s.shape)
        assert np.array_equal(q.numpy(), stored_q), node.name
        assert np.array_equal(s.numpy().view(np.uint32), stored_s.view(np.uint32)), node.name


def test_straight_through_gradients_and_errors():
    w = torch.randn(8, 64, requires_grad=True)
    y = fake_quantize(w, 4, 32)
    assert torch.equal(y.detach(), dequantized(w, 4, 32)) and y.grad_fn is not None
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    x = torch.randn(3, 64, requires_grad=True)
    a = fake_quantize_activations(x, 32)
    assert (a - x).abs().max() <= x.abs().amax() / 127 / 2 + 1e-6  # half an int8 step per block at most
    a.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="not divisible by 32"):
        fake_quantize(torch.randn(4, 48), 4, 32)
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(4, 64), 3, 32)

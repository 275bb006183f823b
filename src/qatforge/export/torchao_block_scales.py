"""TorchAO int4 weights (int8-int4's ``IntxUnpackedToInt8Tensor``) rewritten under the block scales a
QAT run learned (``qatforge.learned_scales.SCALES_FILE`` beside its merged checkpoint).

``quantize_`` gives each group of 32 its own symmetric scale (``amax / 7.5``). For every linear whose
merged weight learned its scales, this replaces the quantized tensor's ``scale`` with the learned
one and its ``qdata`` with torchao's own ``quantize_affine`` of the merged weight under it (the
training forward's rounding, :data:`qatforge.learned_scales.GRIDS` ``"torchao int4"``); zero points
and attributes stay. Module names are the checkpoint's own, so no name mapping is needed. Before any
tensor is replaced, the scale ``quantize_`` chose must equal the saved own scale bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

GRID = "torchao int4"


def write_learned_scales(model: Any, merged_dir: str | os.PathLike, scales_file: str | os.PathLike) -> dict[str, Any]:
    """Replace, in ``model`` (quantized by ``quantize_for_deploy`` from ``merged_dir``), the int4
    weights whose scales were learned. Returns what was written."""
    import torch
    from torchao.quantization.quant_primitives import quantize_affine

    from qatforge.learned_scales import BLOCK, merged_weights, ratio_record, read_scales

    names, saved = read_scales(scales_file, GRID)
    modules = dict(model.named_modules())
    jobs = []
    for name in names:
        module = modules.get(name[: -len(".weight")])
        weight = getattr(module, "weight", None)
        if weight is None or type(weight).__name__ != "IntxUnpackedToInt8Tensor":
            raise KeyError(f"{scales_file}: learned block scales for {name}, which is not an int4 quantized weight "
                           "of the model")
        if tuple(weight.block_size) != (1, BLOCK) or tuple(weight.scale.shape) != tuple(saved[f"{name}.d"].shape):
            raise ValueError(f"{name}: quantized in blocks {tuple(weight.block_size)}, scales "
                             f"{tuple(weight.scale.shape)}; the learned ones are {tuple(saved[f'{name}.d'].shape)}")
        own = saved[f"{name}.d_format"]
        if not torch.equal(weight.scale.view(torch.int32), own.to(torch.float32).view(torch.int32)):
            raise ValueError(f"{name}: the scales torchao chose are not the own scales the learned ones were "
                             "saved with; the model was quantized from another checkpoint")
        jobs.append((name, module, weight))
    read = merged_weights(merged_dir)
    pairs = []  # (learned, torchao's own) scales, for the record
    for name, module, weight in jobs:
        d = saved[f"{name}.d"].to(torch.float32)
        qdata = quantize_affine(read(name), [1, BLOCK], d, weight.zero_point, torch.int8, -8, 7)
        cls = type(weight)
        attrs = [getattr(weight, a) for a in cls.tensor_attribute_names]
        module.weight = torch.nn.Parameter(cls(qdata, d, weight.zero_point, *attrs), requires_grad=False)
        pairs.append((d, saved[f"{name}.d_format"]))
    return ratio_record(pairs, "tensors", len(jobs))

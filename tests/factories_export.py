"""Stand-ins for exporting compression results without a torch module (tests/test_export_backends).

An ONNX graph with one layer of each weight operator (Conv, MatMul, Gemm) and a weights-only
safetensors file, plus the CompressedModel that compress() makes for such models (module None,
the compressed backend copy, codes and masks keyed by tensor keys), built here from the
backends and the quantizer so these tests do not depend on compress().
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from engine.compressed import CompressedModel, QuantizedWeight
from engine.methods.quantize import quantize_tensor
from engine.model import Model

#: The factory graph's input: a batch of 3x8x8 images.
CMG_INPUT = (3, 8, 8)
#: Node names of the factory graph, as a plan's keep_float would list them.
CMG_NODES = ("conv", "conv_relu", "flatten", "proj", "proj_relu", "head")


def conv_matmul_gemm_onnx() -> onnx.ModelProto:
    """Conv(3->4, 3x3) -> Relu -> Flatten -> MatMul(256x32) -> Relu -> Gemm(32->10, transB).

    Weights are named like PyTorch's ("proj.weight"); every node has a name."""
    rng = np.random.default_rng(7)
    weights = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3,
        "conv.bias": rng.standard_normal(4).astype(np.float32) * 0.1,
        "proj.weight": rng.standard_normal((256, 32)).astype(np.float32) * 0.1,
        "head.weight": rng.standard_normal((10, 32)).astype(np.float32) * 0.3,
        "head.bias": rng.standard_normal(10).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], name="conv",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="conv_relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
        helper.make_node("MatMul", ["f", "proj.weight"], ["m"], name="proj"),
        helper.make_node("Relu", ["m"], ["h"], name="proj_relu"),
        helper.make_node("Gemm", ["h", "head.weight", "head.bias"], ["logits"], name="head",
                         transB=1),
    ]
    graph = helper.make_graph(
        nodes, "slimscope_export_test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *CMG_INPUT])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="slimscope-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_conv_matmul_gemm_onnx(folder: Path) -> Path:
    path = folder / "cmg.onnx"
    onnx.save(conv_matmul_gemm_onnx(), str(path))
    return path


def write_weights_only(folder: Path) -> Path:
    """A bare safetensors checkpoint (no architecture): two Linear-like layers and an embedding."""
    rng = np.random.default_rng(3)
    tensors = {
        "embed.weight": rng.standard_normal((50, 16)).astype(np.float32),
        "enc.weight": rng.standard_normal((32, 16)).astype(np.float32),
        "enc.bias": rng.standard_normal(32).astype(np.float32),
        "dec.weight": rng.standard_normal((16, 32)).astype(np.float32),
    }
    path = folder / "weights.safetensors"
    save_file(tensors, str(path))
    return path


def compressed_like_compress(
    model: Model,
    quantize: Mapping[str, dict] | None = None,
    prune: Mapping[str, float] | None = None,
    cast: Mapping[str, torch.dtype] | None = None,
    activation_quant: dict | None = None,
    transposed: tuple[str, ...] = (),
) -> CompressedModel:
    """What compress() returns for a model without a torch module.

    `quantize`: tensor key -> quantize_tensor keyword arguments (bits, granularity, ...);
    `prune`: tensor key -> fraction of smallest-magnitude weights zeroed (before quantizing);
    `cast`: tensor key -> 16-bit dtype. The backend copy holds the resulting float values.
    `transposed`: keys of ONNX MatMul weights ((in, out) as stored) quantized as (out, in)
    matrices, so channels and groups run along the inputs as for a torch Linear (and as ONNX
    Runtime's MatMulNBits blocks them); their codes are in that (out, in) layout.
    """
    masks: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedWeight] = {}
    values: dict[str, np.ndarray] = {}
    for key, fraction in (prune or {}).items():
        weight = torch.from_numpy(np.array(model.backend.read(key)))
        threshold = weight.abs().flatten().kthvalue(max(1, int(fraction * weight.numel()))).values
        masks[key] = weight.abs() > threshold
        values[key] = (weight * masks[key]).numpy()
    for key, settings in (quantize or {}).items():
        weight = torch.from_numpy(values.get(key, np.array(model.backend.read(key))))
        if key in transposed:
            q = quantize_tensor(weight.T.contiguous(), **settings)
            quantized[key] = q
            values[key] = q.dequantize().T.contiguous().numpy()
            continue
        q = quantize_tensor(weight, **settings)
        if key in masks:  # pruned weights keep their zeros, as compress() does
            zero = q.zero_point
            view = zero.reshape(-1, *[1] * (weight.dim() - 1)) if q.axis is not None else zero
            q.codes = torch.where(masks[key], q.codes, view.expand_as(q.codes)
                                  if q.axis is not None else zero).to(q.codes.dtype)
        quantized[key] = q
        values[key] = q.dequantize().numpy()
    for key, dtype in (cast or {}).items():
        weight = torch.from_numpy(values.get(key, np.array(model.backend.read(key))))
        values[key] = weight.to(dtype).to(torch.float32).numpy()
    return CompressedModel(module=None, backend=model.backend.with_weights(values), masks=masks,
                           quantized=quantized, cast=dict(cast or {}),
                           activation_quant=activation_quant)

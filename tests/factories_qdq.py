"""Tiny int8 ONNX models made by ONNX Runtime's own quantizer, as a user's quantized file would be.

The float model names its weights both ways torch's legacy exporter does: a Conv with its
BatchNorm folded in gets a generated name (``onnx::Conv_46``) and a node named after its module
(``/features/conv/Conv``); a plain MatMul keeps the parameter's name (``head.weight``) on a node
named after nothing (``MatMul_3``). ``quantize_static`` then stores each weight as int8 codes
(``onnx::Conv_46_quantized``) with a scale and zero point, per output channel when asked,
either behind DequantizeLinear (QDQ) or inside QLinearConv / QLinearMatMul (QOperator).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Input [N, 2, 6, 6]; conv 3x2x3x3 (pads 1) -> relu -> flatten -> matmul [108, 4].
QDQ_INPUT = (2, 6, 6)
CONV_WEIGHT = "onnx::Conv_46"
MATMUL_WEIGHT = "head.weight"
#: The layer names the quantized file must show: the float file's, from the node names.
SOURCE_NAMES = ("features.conv", "head")


def float_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    conv = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    conv[1] *= 4.0  # channels of different ranges: a per-channel scale matters
    initializers = [
        numpy_helper.from_array(conv, CONV_WEIGHT),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "onnx::Conv_47"),
        numpy_helper.from_array(rng.standard_normal((3 * 6 * 6, 4)).astype(np.float32),
                                MATMUL_WEIGHT),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", CONV_WEIGHT, "onnx::Conv_47"], ["c"], pads=[1, 1, 1, 1],
                         name="/features/conv/Conv"),
        helper.make_node("Relu", ["c"], ["r"], name="/features/relu/Relu"),
        helper.make_node("Reshape", ["r", "flat_shape"], ["f"], name="/Reshape"),
        helper.make_node("MatMul", ["f", MATMUL_WEIGHT], ["logits"], name="MatMul_3"),
    ]
    graph = helper.make_graph(
        nodes, "qdq_source",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *QDQ_INPUT])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_quantized(folder: Path, *, per_channel: bool = True, qdq: bool = True,
                    name: str | None = None) -> Path:
    """The float model quantized to int8 by ``onnxruntime.quantization.quantize_static``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self._batches = iter([{"input": rng.standard_normal((1, *QDQ_INPUT)).astype(np.float32)}
                                  for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    source = folder / "float_source.onnx"
    onnx.save(float_model(), str(source))
    target = folder / (name or f"int8_{'qdq' if qdq else 'qop'}_{'pc' if per_channel else 'pt'}.onnx")
    quantize_static(str(source), str(target), Reader(),
                    quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator,
                    per_channel=per_channel, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)
    return target

"""Mixed int8 export: nodes the plan keeps float keep float activations but int8 weights, and
quantized Conv/MatMul keep their fused int8 kernels (engine/export/onnx_int8.py).

The graph is tests/factories_export's Conv -> Relu -> Flatten -> MatMul -> Relu -> Gemm.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine.export.onnx_int8 import quantize_static_keeping_float, weight_only_int8
from tests import factories_export as fx


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return fx.conv_matmul_gemm_onnx()


@pytest.fixture(scope="module")
def batches() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((8, *fx.CMG_INPUT)).astype(np.float32) for _ in range(4)]


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in model.graph.node for name in node.output}


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_weight_only_int8_stores_codes_per_output_channel(model, batches) -> None:
    quantized, changed = weight_only_int8(model, ["conv", "proj", "head"])
    assert sorted(changed) == ["conv", "head", "proj"]
    onnx.checker.check_model(quantized)
    tensors = _initializers(quantized)
    assert not {"conv.weight", "proj.weight", "head.weight"} & set(tensors)  # floats gone
    producers = _producers(quantized)
    # each weight is read through a DequantizeLinear of int8 codes with one scale per output
    # channel: Conv rows (axis 0), MatMul X @ W columns (axis 1), Gemm transB rows (axis 0)
    for name, outputs in (("conv", 4), ("proj", 32), ("head", 10)):
        node = next(n for n in quantized.graph.node if n.name == name)
        dequantize = producers[node.input[1]]
        assert dequantize.op_type == "DequantizeLinear"
        assert tensors[dequantize.input[0]].dtype == np.int8
        assert tensors[dequantize.input[1]].shape == (outputs,)
    # int8 weights change the outputs a little, not much
    x = batches[0]
    reference, result = _run(model, x), _run(quantized, x)
    assert not np.array_equal(reference, result)
    np.testing.assert_allclose(result, reference, atol=0.05 * np.abs(reference).max())
    assert quantized.ByteSize() < 0.4 * model.ByteSize()


def test_weight_only_int8_leaves_unnamed_nodes_and_input_model_alone(model) -> None:
    before = model.SerializeToString()
    quantized, changed = weight_only_int8(model, ["proj", "not-a-node"])
    assert changed == ["proj"]
    assert model.SerializeToString() == before
    tensors = _initializers(quantized)
    assert "conv.weight" in tensors and "head.weight" in tensors and "proj.weight" not in tensors


def test_kept_float_node_reads_float_activations_and_int8_weights(model, batches) -> None:
    quantized = quantize_static_keeping_float(model, batches, ["head"], weights_int8=["head"])
    producers = _producers(quantized)
    head = next(n for n in quantized.graph.node if n.name == "head")
    # its activation input is the float Relu's output, its weight int8 codes
    assert producers[head.input[0]].op_type == "Relu"
    assert producers[head.input[1]].op_type == "DequantizeLinear"
    assert _initializers(quantized)[producers[head.input[1]].input[0]].dtype == np.int8
    float_weights = quantize_static_keeping_float(model, batches, ["head"])
    head_float = next(n for n in float_weights.graph.node if n.name == "head")
    assert head_float.input[1] == "head.weight"  # without weights_int8 the weight stays float
    assert quantized.ByteSize() < float_weights.ByteSize()
    x = batches[0]
    np.testing.assert_allclose(_run(quantized, x), _run(model, x),
                               atol=0.1 * np.abs(_run(model, x)).max())


def test_quantized_conv_keeps_its_output_quantization_before_a_float_node(model, batches) -> None:
    """A float Relu after a quantized Conv reads the Conv's int8 output (so ORT can run the
    Conv as QLinearConv); a float Gemm after a float Relu still reads float."""
    quantized = quantize_static_keeping_float(model, batches, ["conv_relu", "head"])
    producers = _producers(quantized)
    relu = next(n for n in quantized.graph.node if n.name == "conv_relu")
    assert producers[relu.input[0]].op_type == "DequantizeLinear"
    quantize = producers[producers[relu.input[0]].input[0]]
    assert quantize.op_type == "QuantizeLinear" and producers[quantize.input[0]].name == "conv"
    head = next(n for n in quantized.graph.node if n.name == "head")
    assert producers[head.input[0]].op_type == "Relu"
    session = ort.InferenceSession(quantized.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": batches[0]})[0].shape == (8, 10)


def _sensitivity(drops: dict[str, tuple[str, float]]):
    from engine.plan import Quantization
    from engine.sensitivity import NodeSensitivity, Sensitivity

    sens = Sensitivity(method="exact", metric="agreement", higher_is_better=True, baseline=1.0,
                       layers=[], quantization=Quantization(), model_bytes=0, fixed_bytes=0)
    sens.activations = [NodeSensitivity(name, op, 1.0 - drop, -drop)
                        for name, (op, drop) in drops.items()]
    return sens


def test_nodes_without_an_int8_kernel_stay_float_whatever_their_drop() -> None:
    from engine.allocate import choose_keep_float

    sens = _sensitivity({"conv": ("Conv", 0.0), "hswish_mul": ("Mul", 0.0),
                         "bad_conv": ("Conv", 0.02), "proj": ("MatMul", 0.001),
                         "softmax": ("Softmax", -0.01)})
    keep, drop = choose_keep_float(sens, threshold=0.005)
    assert keep == ["hswish_mul", "bad_conv", "softmax"]
    assert drop == pytest.approx(0.001)
    keep, drop = choose_keep_float(sens, budget=0.0)
    assert keep == ["hswish_mul", "bad_conv", "proj", "softmax"] and drop == 0.0

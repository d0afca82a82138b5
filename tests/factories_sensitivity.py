"""Small ONNX graphs and data for the backend sensitivity tests, built at test time.

`conv_mlp_onnx` has a 3x3 Conv, a 1x1 Conv (its weight a Constant node, as paddle2onnx writes
weights), a Gemm (transB) and a MatMul, with weights of different scales so that the layers
differ in sensitivity. `outlier_onnx` feeds one MatMul activations with one huge channel: int8
with one range per tensor flattens the other channels, so that node is the one to keep in float.
Labels are the float model's own top-1, so the baseline accuracy is 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

CLASSES = 6
INPUT_SHAPE = (3, 8, 8)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], initializers: dict[str, np.ndarray],
           ) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "slimscope_sensitivity_test", inputs, outputs,
                              [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="slimscope-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_mlp_onnx(seed: int = 0) -> onnx.ModelProto:
    """Conv 3x3 -> Relu -> Conv 1x1 (Constant weight) -> Relu -> GlobalAveragePool -> Flatten
    -> Gemm (transB) -> Relu -> MatMul -> logits; layers conv1, conv2, fc1, fc2."""
    rng = np.random.default_rng(seed)
    weights = {
        "conv1.weight": rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32),
        "conv1.bias": rng.normal(0, 0.1, 8).astype(np.float32),
        "fc1.weight": rng.normal(0, 0.5, (16, 12)).astype(np.float32),
        "fc1.bias": rng.normal(0, 0.1, 16).astype(np.float32),
        "fc2.weight": rng.normal(0, 0.3, (16, CLASSES)).astype(np.float32),
    }
    conv2 = rng.normal(0, 0.3, (12, 8, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"],
                         name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Constant", [], ["conv2.weight"], name="conv2_w",
                         value=numpy_helper.from_array(conv2, "conv2.weight")),
        helper.make_node("Conv", ["r1", "conv2.weight"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r3"], name="relu3"),
        helper.make_node("MatMul", ["r3", "fc2.weight"], ["logits"], name="fc2"),
    ]
    return _model(nodes,
                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *INPUT_SHAPE])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
                  weights)


def outlier_onnx(seed: int = 0) -> onnx.ModelProto:
    """first (MatMul) -> amplify (Mul: channel 0 times 1e4) -> sensitive (MatMul, whose row 0
    is scaled down to match): the float model is ordinary, but one int8 range for all of
    `sensitive`'s input channels leaves the small ones only a few codes."""
    rng = np.random.default_rng(seed)
    gain = np.ones(16, np.float32)
    gain[0] = 1e4
    second = rng.normal(0, 0.5, (16, CLASSES)).astype(np.float32)
    second[0] /= 1e4
    weights = {"first.weight": rng.normal(0, 0.5, (12, 16)).astype(np.float32),
               "gain": gain, "second.weight": second}
    nodes = [
        helper.make_node("MatMul", ["input", "first.weight"], ["h"], name="first"),
        helper.make_node("Mul", ["h", "gain"], ["a"], name="amplify"),
        helper.make_node("MatMul", ["a", "second.weight"], ["logits"], name="sensitive"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 12])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
                  weights)


def own_labels(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The float model's top-1 answers, as labels."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0].argmax(-1).astype(np.int64)


def write_model_and_data(folder: Path, model: onnx.ModelProto, sample_shape: tuple[int, ...],
                         samples: int = 96, seed: int = 1, name: str = "model"
                         ) -> tuple[Path, Path]:
    """The model as `name`.onnx and an .npz of random inputs (x) labelled by it (y)."""
    rng = np.random.default_rng(seed)
    # a shift per sample and channel: pooled features (and so the answers) differ by sample
    shift = rng.normal(0, 1.5, (samples, sample_shape[0], *(1,) * (len(sample_shape) - 1)))
    x = (rng.normal(0, 1, (samples, *sample_shape)) + shift).astype(np.float32)
    model_path, data_path = folder / f"{name}.onnx", folder / f"{name}_data.npz"
    onnx.save(model, str(model_path))
    np.savez(data_path, x=x, y=own_labels(model, x))
    return model_path, data_path

"""Stand-ins for compressing models without a torch module: a small ONNX graph and its data.

The graph is Conv → Relu → flatten → Gemm → Relu → MatMul, with seeded weights, a dynamic batch
and float32 inputs ``[N, 2, 8, 8]``. Its labelled data is labelled by the graph itself, so the
original scores 1.0 and any drop is the compression's doing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

INPUT_SHAPE = (2, 8, 8)
CLASSES = 10
#: Layer names as the ONNX adapter reports them (initializer names without ".weight").
LAYERS = ("conv", "fc", "head")


def conv_gemm_matmul_onnx(seed: int = 0) -> onnx.ModelProto:
    """Conv (8x2x3x3) + Gemm (32x512, transB) + MatMul (32x10); weights are initializers."""
    rng = np.random.default_rng(seed)
    weights = {
        "conv.weight": rng.normal(0, 0.3, (8, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(0, 0.1, 8).astype(np.float32),
        "fc.weight": rng.normal(0, 0.05, (32, 8 * 8 * 8)).astype(np.float32),
        "fc.bias": rng.normal(0, 0.1, 32).astype(np.float32),
        "head.weight": rng.normal(0, 0.3, (32, CLASSES)).astype(np.float32),
        "flat_shape": np.array([0, -1], dtype=np.int64),
    }
    return conv_gemm_matmul_graph(weights, INPUT_SHAPE, "compress_stand_in")


def conv_gemm_matmul_graph(weights: dict[str, np.ndarray], input_shape: tuple[int, ...],
                           graph_name: str) -> onnx.ModelProto:
    """Conv → Relu → flatten → Gemm (transB) → Relu → MatMul over `weights` (conv.*, fc.*,
    head.weight, flat_shape), opset 17, dynamic batch; the node names follow torch's exporter."""
    classes = weights["head.weight"].shape[1]
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1],
                         name="/conv/Conv"),
        helper.make_node("Relu", ["c"], ["r"], name="/relu/Relu"),
        helper.make_node("Reshape", ["r", "flat_shape"], ["f"], name="/flat/Reshape"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["g"], transB=1, name="/fc/Gemm"),
        helper.make_node("Relu", ["g"], ["h"], name="/relu2/Relu"),
        helper.make_node("MatMul", ["h", "head.weight"], ["logits"], name="/head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, graph_name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="slimscope-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_conv_gemm_matmul_onnx(folder: Path, name: str = "conv_gemm_matmul.onnx") -> Path:
    path = folder / name
    onnx.save(conv_gemm_matmul_onnx(), str(path))
    return path


def write_self_labelled_npz(model_path: Path, folder: Path, samples: int = 96,
                            name: str = "data.npz") -> Path:
    """Inputs (x) with the graph's own top-1 answers as labels (y), from ONNX Runtime."""
    rng = np.random.default_rng(1)
    inputs = rng.normal(0, 1, (samples, *INPUT_SHAPE)).astype(np.float32)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"input": inputs})[0].argmax(axis=1).astype(np.int64)
    path = folder / name
    np.savez(path, x=inputs, y=labels)
    return path

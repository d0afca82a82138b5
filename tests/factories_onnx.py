"""Small ONNX graphs built with onnx.helper, shaped like the real files that broke the loader:
weights in If branches and nested Loop bodies (Silero VAD), main-graph initializers used only
inside subgraphs (Silero's op18 export), exporter-generated weight names (torch's legacy and
dynamo exporters), and MatMul / Gemm weights to factorize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

#: Feature width of every graph here: inputs are [batch, WIDTH].
WIDTH = 4


def weights(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _value(name: str, shape: list[object], elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array),
                            name=f"{name}_constant")


def _model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="slimscope-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# -- If: the branch taken depends on the data -----------------------------------------------
#: The weights of :func:`if_model`: main-graph "w_shared" is used only in the then branch; both
#: branches call their own weight "w" (a Constant node in one, an initializer in the other).
IF_WEIGHTS = {"w_shared": weights(1, WIDTH, WIDTH), "then_w": weights(2, WIDTH, WIDTH),
              "else_w": weights(3, WIDTH, WIDTH)}


def if_model() -> onnx.ModelProto:
    """y = x @ w_shared @ w_then when sum(x) > 0, else x @ w_else (one input, x [N, 4])."""
    then_branch = helper.make_graph(
        [_constant("w", IF_WEIGHTS["then_w"]),
         helper.make_node("MatMul", ["x", "w_shared"], ["then_h"], name="/then/shared/MatMul"),
         helper.make_node("MatMul", ["then_h", "w"], ["then_y"], name="/then/own/MatMul")],
        "then_branch", [], [_value("then_y", ["N", WIDTH])])
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["else_y"], name="/else/own/MatMul")],
        "else_branch", [], [_value("else_y", ["N", WIDTH])],
        [numpy_helper.from_array(IF_WEIGHTS["else_w"], "w")])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
         helper.make_node("Constant", [], ["zero"], value_float=0.0),
         helper.make_node("Greater", ["total", "zero"], ["positive"]),
         helper.make_node("If", ["positive"], ["y"], name="branch",
                          then_branch=then_branch, else_branch=else_branch)],
        "if_model", [_value("x", ["N", WIDTH])], [_value("y", ["N", WIDTH])],
        [numpy_helper.from_array(IF_WEIGHTS["w_shared"], "w_shared")])
    return _model(graph)


def if_reference(x: np.ndarray, then_w: np.ndarray | None = None) -> np.ndarray:
    """What :func:`if_model` computes, with the then branch's weight optionally replaced."""
    if x.sum() > 0:
        return x @ IF_WEIGHTS["w_shared"] @ (IF_WEIGHTS["then_w"] if then_w is None else then_w)
    return x @ IF_WEIGHTS["else_w"]


# -- Loop inside Loop -----------------------------------------------------------------------
LOOP_WEIGHTS = {"outer_w": weights(4, WIDTH, WIDTH) * 0.5, "inner_w": weights(5, WIDTH, WIDTH) * 0.5}
#: Trip counts of the outer and the inner loop.
LOOP_TRIPS = (2, 3)


def _loop_body(name: str, nodes: list[onnx.NodeProto], state_in: str, state_out: str,
               initializers: list[onnx.TensorProto] | None = None) -> onnx.GraphProto:
    nodes = [*nodes, helper.make_node("Identity", [f"{name}_cond_in"], [f"{name}_cond_out"])]
    return helper.make_graph(
        nodes, name,
        [_value(f"{name}_iter", [], TensorProto.INT64),
         _value(f"{name}_cond_in", [], TensorProto.BOOL), _value(state_in, ["N", WIDTH])],
        [_value(f"{name}_cond_out", [], TensorProto.BOOL), _value(state_out, ["N", WIDTH])],
        initializers or [])


def nested_loop_model() -> onnx.ModelProto:
    """The outer Loop's body multiplies its state by the main graph's "outer_w", then runs an
    inner Loop whose body multiplies by its own Constant "inner_w": y = x @ (O @ I^3)^2."""
    inner_body = _loop_body(
        "inner", [_constant("inner_w", LOOP_WEIGHTS["inner_w"]),
                  helper.make_node("MatMul", ["inner_v", "inner_w"], ["inner_v_out"],
                                   name="/blocks/inner/MatMul")],
        "inner_v", "inner_v_out")
    outer_body = _loop_body(
        "outer", [helper.make_node("MatMul", ["outer_v", "outer_w"], ["outer_h"],
                                   name="/blocks/outer/MatMul"),
                  helper.make_node("Constant", [], ["inner_trips"],
                                   value=numpy_helper.from_array(np.array(LOOP_TRIPS[1]))),
                  helper.make_node("Constant", [], ["inner_go"],
                                   value=numpy_helper.from_array(np.array(True))),
                  helper.make_node("Loop", ["inner_trips", "inner_go", "outer_h"],
                                   ["outer_v_out"], name="inner_loop", body=inner_body)],
        "outer_v", "outer_v_out")
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "go", "x"], ["y"], name="outer_loop",
                          body=outer_body)],
        "nested_loops", [_value("x", ["N", WIDTH])], [_value("y", ["N", WIDTH])],
        [numpy_helper.from_array(LOOP_WEIGHTS["outer_w"], "outer_w"),
         numpy_helper.from_array(np.array(LOOP_TRIPS[0]), "trips"),
         numpy_helper.from_array(np.array(True), "go")])
    return _model(graph)


def nested_loop_reference(x: np.ndarray, inner_w: np.ndarray | None = None) -> np.ndarray:
    inner = LOOP_WEIGHTS["inner_w"] if inner_w is None else inner_w
    step = LOOP_WEIGHTS["outer_w"] @ np.linalg.matrix_power(inner, LOOP_TRIPS[1])
    return x @ np.linalg.matrix_power(step, LOOP_TRIPS[0])


# -- exporter-generated names ---------------------------------------------------------------
def generated_names_model() -> onnx.ModelProto:
    """Two blocks named the way torch's exporters name them: legacy node names
    ``/layers.N/q/MatMul`` with weights ``onnx::MatMul_7xx``, a Sequential child
    ``/features/features.0/...``, and a dynamo node whose module path is only in metadata."""
    nodes = [
        helper.make_node("MatMul", ["x", "onnx::MatMul_701"], ["h0"], name="/layers.0/q/MatMul"),
        helper.make_node("MatMul", ["h0", "onnx::MatMul_702"], ["h1"], name="/layers.1/q/MatMul"),
        helper.make_node("Gemm", ["h1", "onnx::Gemm_703"], ["h2"],
                         name="/features/features.0/Gemm", transB=1),
        helper.make_node("MatMul", ["h2", "val_16"], ["y"], name="node_MatMul_15"),
    ]
    scopes = onnx.StringStringEntryProto(key="pkg.torch.onnx.name_scopes",
                                           value="['', 'head', 'head.proj', 'linear']")
    nodes[-1].metadata_props.append(scopes)
    initializers = [numpy_helper.from_array(weights(10 + i, WIDTH, WIDTH), name)
                    for i, name in enumerate(("onnx::MatMul_701", "onnx::MatMul_702",
                                              "onnx::Gemm_703", "val_16"))]
    graph = helper.make_graph(nodes, "generated_names", [_value("x", ["N", WIDTH])],
                              [_value("y", ["N", WIDTH])], initializers)
    return _model(graph)


# -- low rank -------------------------------------------------------------------------------
LOW_RANK_WEIGHTS = {"mm.weight": weights(20, 16, 12), "fc.weight": weights(21, 10, 12),
                    "fc.bias": weights(22, 10)}


def matmul_gemm_model() -> onnx.ModelProto:
    """y = Gemm(x @ W_mm, W_fc, b, transB=1, alpha=0.5): x [N, 16] -> [N, 12] -> [N, 10]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "mm.weight"], ["h"], name="/mm/MatMul"),
         helper.make_node("Gemm", ["h", "fc.weight", "fc.bias"], ["y"], name="/fc/Gemm",
                          transB=1, alpha=0.5)],
        "low_rank", [_value("x", ["N", 16])], [_value("y", ["N", 10])],
        [numpy_helper.from_array(array, name) for name, array in LOW_RANK_WEIGHTS.items()])
    return _model(graph)


# -- files ----------------------------------------------------------------------------------
def write(model: onnx.ModelProto, folder: Path, name: str) -> Path:
    path = folder / name
    onnx.save(model, str(path))
    return path


def write_external(model: onnx.ModelProto, folder: Path, name: str) -> Path:
    """`model` with every tensor (subgraph Constant values too) in `<name>.data` beside it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    convert_model_to_external_data(copy, all_tensors_to_one_file=True, location=f"{name}.data",
                                   size_threshold=0, convert_attribute=True)
    path = folder / name
    onnx.save_model(copy, str(path))
    return path

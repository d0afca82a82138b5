"""Small stand-ins for the real models whose exports fell short (tests/test_export_real_gaps.py):
a BERT-like text model with three named inputs and padded sentences (MiniLM), and an ONNX graph
whose weights sit inside If branches (Silero VAD)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Width of :func:`if_weights_onnx`: inputs are [batch, IF_WIDTH], every weight is square.
IF_WIDTH = 32


def token_batches(path: Path, samples: int = 12, length: int = 10, vocab: int = 100,
                  seed: int = 0) -> Path:
    """An .npz of input_ids / attention_mask / token_type_ids, as a tokenizer pads a batch of
    sentences of different lengths: every row has real tokens first, then zeros with mask 0."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, length + 1, size=samples)
    lengths[0] = length  # one sentence fills the row; the others are padded
    positions = np.arange(length)[None, :]
    mask = (positions < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, vocab, size=(samples, length)).astype(np.int64) * mask
    np.savez(path, input_ids=ids, attention_mask=mask,
             token_type_ids=np.zeros((samples, length), np.int64))
    return path


def _weight(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((IF_WIDTH, IF_WIDTH)) / np.sqrt(IF_WIDTH)).astype(np.float32)


def if_weights_onnx() -> onnx.ModelProto:
    """y = relu(x @ A) @ B when sum(x) > 0, else x @ C, with every weight inside a branch, as
    Silero VAD keeps all of its weights: A and B as Constant nodes of the then branch (B inside
    a nested If, Silero's bodies nest four deep), C as an initializer of the else branch. The
    main graph holds no weight at all."""
    def value(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", IF_WIDTH])

    def constant(name: str, seed: int) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=f"{name}_constant",
                                value=numpy_helper.from_array(_weight(seed), name))

    nested = helper.make_graph(
        [constant("b", 2), helper.make_node("MatMul", ["hidden", "b"], ["inner_y"],
                                            name="/then/inner/MatMul")],
        "inner_then", [], [value("inner_y")])
    nested_else = helper.make_graph(
        [helper.make_node("Identity", ["hidden"], ["inner_other"])],
        "inner_else", [], [value("inner_other")])
    then_branch = helper.make_graph(
        [constant("a", 1),
         helper.make_node("MatMul", ["x", "a"], ["then_h"], name="/then/MatMul"),
         helper.make_node("Relu", ["then_h"], ["hidden"]),
         helper.make_node("If", ["positive"], ["then_y"], name="/then/If",
                          then_branch=nested, else_branch=nested_else)],
        "then_branch", [], [value("then_y")])
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "c"], ["else_y"], name="/else/MatMul")],
        "else_branch", [], [value("else_y")], [numpy_helper.from_array(_weight(3), "c")])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
         helper.make_node("Constant", [], ["zero"], value_float=0.0),
         helper.make_node("Greater", ["total", "zero"], ["positive"]),
         helper.make_node("If", ["positive"], ["y"], name="branch",
                          then_branch=then_branch, else_branch=else_branch)],
        "if_weights", [value("x")], [value("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="slimscope-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def if_weights_reference(x: np.ndarray) -> np.ndarray:
    """What :func:`if_weights_onnx` computes for one batch."""
    if x.sum() > 0:
        return np.maximum(x @ _weight(1), 0) @ _weight(2)
    return x @ _weight(3)


def write_if_weights_onnx(folder: Path) -> Path:
    path = folder / "if_weights.onnx"
    onnx.save(if_weights_onnx(), str(path))
    return path


def float32_weights_in_subgraphs(model: onnx.ModelProto) -> int:
    """How many float32 weights (rank >= 2, at least 256 values: not an int8 scale row) the
    If / Loop / Scan bodies of `model` still hold, as Constant nodes or initializers: what an
    export meant to store them smaller left."""
    def count(graph: onnx.GraphProto, inside: bool) -> int:
        found = 0
        tensors = list(graph.initializer) if inside else []
        for node in graph.node:
            if inside and node.op_type == "Constant":
                tensors.extend(a.t for a in node.attribute if a.name == "value")
            for attribute in node.attribute:
                subs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH \
                    else attribute.graphs
                found += sum(count(sub, True) for sub in subs)
        return found + sum(1 for t in tensors if t.data_type == TensorProto.FLOAT
                           and len(t.dims) >= 2 and int(np.prod(t.dims)) >= 256)
    return count(model.graph, False)

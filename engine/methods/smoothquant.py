"""SmoothQuant-style outlier migration for ONNX graphs, before static int8.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models" (ICML 2023). A few input channels of a transformer's activations are often
tens of times larger than the rest, so one per-tensor int8 range wastes most codes on them.
For ``Y = X W`` and any positive ``s`` per input channel ``j``, ``Y = (X diag(1/s)) (diag(s) W)``
exactly; with ``s_j = max|X_j|^α / max|W_j|^(1−α)`` the activation's outliers move into the
weight, whose per-channel int8 codes absorb them easily.

The graph rewrite (:func:`scale_inputs`, also used by AWQ-style scaling) multiplies each
consumer's weight rows by ``s`` and divides the activation by ``s``: folded into the producing
LayerNormalization's scale and bias, or a producing MatMul/Gemm's weight columns (and bias,
also a MatMul followed by an Add of a constant bias), when the activation feeds only the
scaled consumers; otherwise an explicit ``Mul`` by ``1/s`` is inserted before them. Consumers
sharing one activation (a transformer's Q, K and V projections) share one ``s``, fitted to
the largest of their weights' rows, as in the paper. The float output is unchanged up to
float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engine import onnx_tools
from engine.jobs import NEVER_CANCELLED, CancelToken

#: SmoothQuant's migration strength when the plan gives none.
DEFAULT_ALPHA = 0.5
#: Scales are kept in this range: a dead channel must not become inf or 0.
SCALE_LIMITS = (1e-5, 1e5)


@dataclass(frozen=True)
class Target:
    """A node computing ``X @ W`` with a constant `weight` whose input channels lie on
    `in_axis` (0 for MatMul and plain Gemm, 1 for Gemm with transB)."""

    index: int  # of the node in the main graph
    activation: str
    weight: str
    in_axis: int


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _readers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Per tensor name, the indices of the main-graph nodes reading it (a read inside a
    node's subgraph counts as that node's)."""
    from engine.methods.static_int8 import _names_read
    from engine.onnx_tools import subgraphs

    found: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        names = set(node.input)
        for sub in subgraphs(node):
            names |= _names_read(sub)
        for name in names:
            if name:
                found.setdefault(name, []).append(index)
    return found


def find_targets(proto: onnx.ModelProto) -> dict[str, list[Target]]:
    """Per activation, the MatMul/Gemm nodes multiplying it by a 2-D float initializer that
    no other node reads (scaling a shared weight would change its other users)."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    found: dict[str, list[Target]] = {}
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        activation, weight = node.input[0], node.input[1]
        tensor = initializers.get(weight)
        if (tensor is None or activation in initializers or len(tensor.dims) != 2
                or tensor.data_type != onnx.TensorProto.FLOAT or len(readers.get(weight, [])) != 1):
            continue
        if node.op_type == "MatMul":
            in_axis = 0
        elif node.op_type == "Gemm" and not _attributes(node).get("transA", 0):
            in_axis = 1 if _attributes(node).get("transB", 0) else 0
        else:
            continue
        found.setdefault(activation, []).append(Target(index, activation, weight, in_axis))
    return found


def weight_channel_max(proto: onnx.ModelProto, targets: Sequence[Target]) -> np.ndarray:
    """Per input channel, the largest |w| over every target's weight row for that channel."""
    arrays = _initializer_arrays(proto, [t.weight for t in targets])
    return np.max([np.abs(np.moveaxis(arrays[t.weight], t.in_axis, 0)).max(axis=1)
                   for t in targets], axis=0)


def smoothing_scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)``; a channel that is zero on either side keeps 1."""
    x = np.asarray(x_max, dtype=np.float64)
    w = np.asarray(w_max, dtype=np.float64)
    live = (x > 0) & (w > 0)
    scales = np.ones_like(x)
    scales[live] = x[live] ** alpha / w[live] ** (1.0 - alpha)
    return np.clip(scales, *SCALE_LIMITS)


def _initializer_arrays(proto: onnx.ModelProto, names: Sequence[str]) -> dict[str, np.ndarray]:
    wanted = set(names)
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name in wanted}


def _set_initializer(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    for tensor in graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return
    raise KeyError(name)


def scale_inputs(proto: onnx.ModelProto, scales: Mapping[str, np.ndarray],
                 targets: Mapping[str, Sequence[Target]], *, fold_matmul: bool = True,
                 keep: Collection[str] = ()
                 ) -> tuple[onnx.ModelProto, list[str]]:
    """A copy where each activation in `scales` is divided by its ``s`` and its targets'
    weight rows multiplied by it (see the module docstring); also the names of the ``Mul``
    nodes inserted where no fold was exact. `fold_matmul` False folds into LayerNormalization
    only (a producing MatMul's weight may have codes of its own already). Constants named in
    `keep` are never folded into (another method will overwrite them). `targets` must come
    from :func:`find_targets` on this same `proto` (they hold node indices)."""
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    graph = result.graph
    readers = _readers(graph)
    producers = {out: node for node in graph.node for out in node.output if out}
    targets = {activation: list(group) for activation, group in targets.items()}
    outputs = {value.name for value in graph.output}
    taken = {n.name for n in graph.node} | {t.name for t in graph.initializer} | \
        {v for n in graph.node for v in n.output} | {i.name for i in graph.input}
    inserted: list[str] = []
    before: dict[int, list[onnx.NodeProto]] = {}  # id of the first target -> Mul nodes
    for activation, s in scales.items():
        s = np.asarray(s, dtype=np.float64)
        group = list(targets[activation])
        arrays = _initializer_arrays(result, [t.weight for t in group])
        for t in group:
            shape = [1, 1]
            shape[t.in_axis] = -1
            _set_initializer(graph, t.weight, arrays[t.weight] * s.reshape(shape))
        exclusive = activation not in outputs and set(readers.get(activation, [])) \
            == {t.index for t in group}
        if exclusive and _fold(result, producers.get(activation), readers, s, fold_matmul,
                               set(keep)):
            continue
        inverse = onnx_tools.unique_name(f"{activation}_smooth_inv", taken)
        scaled = onnx_tools.unique_name(f"{activation}_smoothed", taken)
        name = onnx_tools.unique_name(f"{activation}_smooth_Mul", taken)
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
        mul = helper.make_node("Mul", [activation, inverse], [scaled], name=name)
        for t in group:
            graph.node[t.index].input[0] = scaled
        before.setdefault(min(t.index for t in group), []).append(mul)
        inserted.append(name)
    if before:
        nodes = []
        for i, node in enumerate(graph.node):
            nodes.extend(before.get(i, []))
            nodes.append(node)
        graph.ClearField("node")
        graph.node.extend(nodes)
    return result, inserted


def _fold(proto: onnx.ModelProto, producer: onnx.NodeProto | None,
          readers: Mapping[str, list[int]], s: np.ndarray, fold_matmul: bool,
          keep: set[str]) -> bool:
    """Divide the producer's output channels by `s` in its own constants; False when that is
    not exact (shared constants, other readers of an intermediate, an unknown operator)."""
    if producer is None:
        return False
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}

    def owned(name: str) -> bool:
        return name in initializers and len(readers.get(name, [])) == 1 and name not in keep

    arrays = _initializer_arrays(proto, [n for n in producer.input if n])
    if producer.op_type == "LayerNormalization":
        axis = int(_attributes(producer).get("axis", -1))
        scale = producer.input[1]
        bias = producer.input[2] if len(producer.input) > 2 else ""
        if axis != -1 or not owned(scale) or (bias and not owned(bias)) \
                or arrays[scale].shape != s.shape or (bias and arrays[bias].shape != s.shape):
            return False
        _set_initializer(graph, scale, arrays[scale] / s)
        if bias:
            _set_initializer(graph, bias, arrays[bias] / s)
        return True
    if not fold_matmul:
        return False
    if producer.op_type == "Add" and len(producer.input) == 2:
        matmul_out, bias = producer.input
        inner = next((n for n in graph.node if matmul_out in n.output), None)
        if (inner is None or inner.op_type != "MatMul" or not owned(bias)
                or len(readers.get(matmul_out, [])) != 1
                or arrays[bias].shape != s.shape or not owned(inner.input[1])):
            return False
        weight = numpy_helper.to_array(next(t for t in graph.initializer
                                            if t.name == inner.input[1]))
        if weight.ndim != 2 or weight.shape[1] != s.shape[0]:
            return False
        _set_initializer(graph, inner.input[1], weight / s[None, :])
        _set_initializer(graph, bias, arrays[bias] / s)
        return True
    if producer.op_type in ("MatMul", "Gemm") and owned(producer.input[1]):
        weight = arrays[producer.input[1]]
        attrs = _attributes(producer)
        out_axis = 0 if producer.op_type == "Gemm" and attrs.get("transB", 0) else 1
        bias = producer.input[2] if producer.op_type == "Gemm" and len(producer.input) > 2 else ""
        if weight.ndim != 2 or weight.shape[out_axis] != s.shape[0] \
                or (bias and (not owned(bias) or arrays[bias].shape != s.shape)):
            return False
        shape = [1, 1]
        shape[out_axis] = -1
        _set_initializer(graph, producer.input[1], weight / s.reshape(shape))
        if bias:
            _set_initializer(graph, bias, arrays[bias] / s)
        return True
    return False


def smooth_model(proto: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]],
                 alpha: float = DEFAULT_ALPHA, cancel: CancelToken = NEVER_CANCELLED
                 ) -> tuple[onnx.ModelProto, list[str], int]:
    """`proto` with every MatMul/Gemm input smoothed (see the module docstring): the copy,
    the names of the Mul nodes inserted (they should stay float: quantizing their input
    would quantize the outliers again) and how many activations were smoothed. One ONNX
    Runtime pass over `feeds` measures every activation's per-channel max |x|."""
    from engine.sensitivity_backends import channel_abs_stats

    model = onnx_tools.constants_to_initializers(proto)
    targets = find_targets(model)
    if not targets:
        return model, [], 0
    stats = channel_abs_stats(model, feeds, list(targets), cancel)
    scales = {}
    for activation, group in targets.items():
        x_max = stats[activation][0]
        w_max = weight_channel_max(model, group)
        if x_max.shape != w_max.shape:
            continue
        scales[activation] = smoothing_scales(x_max, w_max, alpha)
    smoothed, inserted = scale_inputs(model, scales, targets)
    return smoothed, inserted, len(scales)

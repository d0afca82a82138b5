"""ONNX plumbing shared by compression and export: export, repair, check, run, time.

Compression methods that work on ONNX graphs (static int8, weight-only 4-bit) need the graph
in a shape ONNX Runtime's quantizer understands: opset 13 or later for per-channel scales,
weights as initializers rather than Constant nodes, and Linear layers as MatMul rather than Gemm
where a kernel exists only for MatMul. The functions here make those repairs explicitly, so a
method that runs on a repaired graph does not silently skip the weights it was asked to compress.
"""

from __future__ import annotations

import io
import statistics
import time
import warnings
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engine.errors import SlimscopeError

if TYPE_CHECKING:
    import onnxruntime as ort
    import torch

ModelSource = Union[onnx.ModelProto, bytes, str, PathLike]
#: One batch for a model: an array for its first input, a feed naming every input, or an
#: (inputs, labels) pair as data sources yield them.
Batch = Union[np.ndarray, Mapping[str, np.ndarray], tuple]

#: ONNX Runtime's input type strings to the numpy dtypes we feed.
_NUMPY_INPUT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def _one_line(error: BaseException) -> str:
    """The first non-empty line of an exception, for one-line user messages."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


# -- export -------------------------------------------------------------------------------
def export_onnx(
    module: "torch.nn.Module",
    example_input: "torch.Tensor | tuple[Any, ...]",
    *,
    opset: int = 17,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("logits",),
    dynamic_batch: bool = True,
    dynamic_axes: "dict[str, dict[int, str]] | None" = None,
) -> onnx.ModelProto:
    """Trace `module` in eval mode with the TorchScript exporter and return the graph.

    The legacy exporter is used because it needs no onnxscript and folds BatchNorm into Conv,
    which is what quantizers want to see. The module's training flag is restored afterwards.
    The graph is built in memory, so models over protobuf's 2 GB limit are out of reach here.
    A torch.export graph's recurrent cells are first written out with static gate sizes, which
    that exporter cannot infer (engine.backends.torch_module.onnx_traceable).
    """
    import torch

    from engine.backends.torch_module import onnx_traceable

    if dynamic_axes is None and dynamic_batch:  # one input: its first axis is the batch
        dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice for the legacy exporter
            torch.onnx.export(
                onnx_traceable(module),
                example_input if isinstance(example_input, tuple) else (example_input,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
            )
    except Exception as error:  # torch raises many unrelated types for untraceable code
        raise SlimscopeError(
            f"could not export {type(module).__name__} to ONNX (opset {opset}): {_one_line(error)}"
        ) from error
    return onnx.load_from_string(buffer.getvalue())


# -- repairs ------------------------------------------------------------------------------
def opset_version(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise SlimscopeError("the ONNX model imports no default-domain opset")


def upgrade_opset(model: onnx.ModelProto, minimum: int = 13) -> onnx.ModelProto:
    """The model converted to opset `minimum` if it is older; unchanged (same object) otherwise.

    Per-channel DequantizeLinear needs its `axis` attribute, which exists only from opset 13;
    models exported at opset 11/12 (common for OCR and vision models) must be converted first.
    """
    current = opset_version(model)
    if current >= minimum:
        return model
    try:
        return onnx.version_converter.convert_version(model, minimum)
    except Exception as error:
        raise SlimscopeError(
            f"could not convert the ONNX model from opset {current} to {minimum}: "
            f"{_one_line(error)}"
        ) from error


#: Constant-node attributes holding plain numbers, with the dtype ONNX gives them.
_CONSTANT_NUMBER_ATTRIBUTES = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The array a Constant node produces, or None for string and sparse constants."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name in _CONSTANT_NUMBER_ATTRIBUTES:
            value = helper.get_attribute_value(attribute)
            return np.asarray(value, dtype=_CONSTANT_NUMBER_ATTRIBUTES[attribute.name])
    return None


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where the main graph's Constant nodes are initializers.

    ONNX Runtime's quantizers (and our methods) look for weights among initializers only; a
    weight stored as a Constant node (some exporters and optimizers do this) would be left in
    float without a word. Constants that are graph outputs stay nodes, since an initializer
    cannot be an output in every runtime.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    graph_outputs = {output.name for output in graph.output}
    kept_nodes = []
    for node in graph.node:
        value = _constant_value(node) if node.op_type == "Constant" and not node.domain else None
        if value is None or node.output[0] in graph_outputs:
            kept_nodes.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, name=node.output[0]))
    if len(kept_nodes) != len(graph.node):
        graph.ClearField("node")
        graph.node.extend(kept_nodes)
    return result


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in graph.initializer}


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs a node carries as attributes (If branches, Loop and Scan bodies)."""
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def taken_names(graph: onnx.GraphProto, taken: set[str] | None = None) -> set[str]:
    """Every value, initializer and node name in `graph` and its subgraphs (added to `taken`),
    so that a new name collides with none."""
    taken = set() if taken is None else taken
    taken.update(value.name for value in (*graph.input, *graph.output, *graph.value_info))
    taken.update(tensor.name for tensor in graph.initializer)
    for node in graph.node:
        taken.update((*node.input, *node.output, node.name))
        for sub in subgraphs(node):
            taken_names(sub, taken)
    return taken


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_N` for the first N that is not `taken`; the name is then taken."""
    name, counter = base, 1
    while name in taken:
        name, counter = f"{base}_{counter}", counter + 1
    taken.add(name)
    return name


def remove_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers no node (in any subgraph) or graph output reads, in place."""
    used = {output.name for output in graph.output}
    stack = [graph]
    while stack:
        current = stack.pop()
        for node in current.node:
            used.update(node.input)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    stack.append(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attribute.graphs)
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    if len(kept) != len(graph.initializer):
        graph.ClearField("initializer")
        graph.initializer.extend(kept)


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every Gemm with a constant weight is MatMul (+ Add for the bias).

    `nn.Linear` on 2-D input exports as Gemm, but ONNX Runtime's weight-only MatMulNBits
    quantizer handles only MatMul, and its dynamic int8 quantizer rewrites Gemm itself only when
    alpha = beta = 1: without this, such layers would silently stay in float. alpha, beta and
    transB are folded into the constants; Gemms with transA or a computed weight are left as
    they are.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    initializers = _initializers(graph)
    taken = set(initializers) | {name for node in graph.node for name in node.output}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        beta = attributes.get("beta", 1.0)
        if (
            node.op_type != "Gemm" or node.domain not in ("", "ai.onnx")
            or attributes.get("transA", 0) or node.input[1] not in initializers
            or (bias_name is not None and beta != 1.0 and bias_name not in initializers)
        ):
            new_nodes.append(node)
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if attributes.get("transB", 0):
            weight = weight.T
        alpha = np.asarray(attributes.get("alpha", 1.0), weight.dtype)
        weight = np.ascontiguousarray(weight * alpha)
        weight_name = unique_name(f"{node.input[1]}_matmul", taken)
        graph.initializer.append(numpy_helper.from_array(weight, name=weight_name))
        stem = node.name or node.output[0]
        matmul_output = unique_name(f"{stem}_matmul_out", taken) if bias_name else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [matmul_output],
                                          name=unique_name(f"{stem}_MatMul", taken)))
        if bias_name is None:
            continue
        if beta != 1.0:
            bias = numpy_helper.to_array(initializers[bias_name])
            bias_name = unique_name(f"{bias_name}_scaled", taken)
            graph.initializer.append(
                numpy_helper.from_array(bias * np.asarray(beta, bias.dtype), name=bias_name))
        new_nodes.append(helper.make_node("Add", [matmul_output, bias_name], [node.output[0]],
                                          name=unique_name(f"{stem}_Add", taken)))
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    remove_unused_initializers(graph)
    return result


# -- checks, sessions, timing -----------------------------------------------------------------
def _as_bytes_or_path(source: ModelSource) -> bytes | str:
    if isinstance(source, onnx.ModelProto):
        return source.SerializeToString()
    if isinstance(source, bytes):
        return source
    return str(Path(source))


def validate(source: ModelSource) -> None:
    """Raise a one-line SlimscopeError unless the model passes the full ONNX check and loads.

    The ONNX checker (with shape inference) catches malformed graphs; only creating an ONNX
    Runtime session catches graphs that are valid ONNX but have no kernel (e.g. an opset-12
    DequantizeLinear with per-channel scales).
    """
    try:
        if isinstance(source, (str, PathLike)):
            onnx.checker.check_model(str(source), full_check=True)
        else:
            model = source if isinstance(source, onnx.ModelProto) else onnx.load_from_string(source)
            onnx.checker.check_model(model, full_check=True)
    except Exception as error:
        raise SlimscopeError(f"invalid ONNX model: {_one_line(error)}") from error
    try:
        session(source)
    except Exception as error:  # ORT raises its own pybind types (Fail, InvalidGraph, ...)
        raise SlimscopeError(f"ONNX Runtime cannot load the model: {_one_line(error)}") from error


def session(source: ModelSource, threads: int | None = None) -> "ort.InferenceSession":
    """A CPU ONNX Runtime session; `threads` pins the intra-op thread count (None: the process's
    thread policy, :mod:`engine.threads`, else ORT's choice)."""
    import onnxruntime as ort

    from engine import threads as thread_policy

    if threads is None:
        threads = thread_policy.applied()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are not for our users
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(_as_bytes_or_path(source), options,
                                providers=["CPUExecutionProvider"])


def graph_input(model: onnx.ModelProto) -> tuple[str, np.dtype]:
    """Name and numpy dtype of the model's first real input (initializers are not inputs)."""
    weights = {tensor.name for tensor in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in weights:
            return value.name, helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    raise SlimscopeError("the ONNX model has no inputs to feed")


def as_feed(batch: Batch, name: str, dtype: np.dtype | type) -> dict[str, np.ndarray]:
    """The input feed for one batch: an array goes to input `name`, cast to `dtype`.

    An `(inputs, labels)` pair, as data sources yield them, feeds its inputs; a mapping is
    taken as the complete feed.
    """
    if isinstance(batch, tuple):
        batch = batch[0]
    if isinstance(batch, Mapping):
        return {key: np.asarray(value) for key, value in batch.items()}
    return {name: np.ascontiguousarray(batch, dtype=dtype)}


def feed_for(sess: "ort.InferenceSession", batch: Batch) -> dict[str, np.ndarray]:
    """The input feed for one batch of a session's model (see :func:`as_feed`)."""
    first = sess.get_inputs()[0]
    return as_feed(batch, first.name, _NUMPY_INPUT_DTYPES.get(first.type, np.float32))


def run(sess: "ort.InferenceSession", batch: Batch) -> np.ndarray:
    """The model's first output for one batch."""
    return sess.run(None, feed_for(sess, batch))[0]


def onnx_latency_ms(
    model: ModelSource,
    example_batch: Batch,
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 1,
) -> dict[str, float]:
    """Median and 90th-percentile wall time of one forward pass, in milliseconds.

    The median resists the odd slow run on a shared machine; p90 shows how noisy it was.
    """
    return compare_latency_ms({"model": model}, example_batch, repeats=repeats, warmup=warmup,
                              threads=threads)["model"]


def compare_latency_ms(
    models: Mapping[str, ModelSource],
    example_batch: Batch,
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 1,
    rounds: int = 3,
) -> dict[str, dict[str, float]]:
    """:func:`onnx_latency_ms` for several models, timed in interleaved rounds.

    Timing model A fully and then model B lets a burst of load on a shared machine land on
    one of them only; alternating in rounds spreads it over all, so their ratios hold up.
    """
    sessions = {name: session(model, threads=threads) for name, model in models.items()}
    feeds = {name: feed_for(sess, example_batch) for name, sess in sessions.items()}
    for name, sess in sessions.items():
        for _ in range(warmup):
            sess.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    rounds = max(1, min(rounds, repeats))
    for round_index in range(rounds):
        count = repeats // rounds + (1 if round_index < repeats % rounds else 0)
        for name, sess in sessions.items():
            for _ in range(count):
                start = time.perf_counter()
                sess.run(None, feeds[name])
                times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: {"median_ms": statistics.median(values),
                   "p90_ms": float(np.percentile(values, 90))}
            for name, values in times.items()}


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes the model takes as a single .onnx file (what the user's disk will see)."""
    return model.ByteSize()

"""What every ONNX exporter shares: the fp32 graphs, compaction, validation and ORT timing.

Every flavour starts from one fp32 ONNX graph of the compressed model: the compressed module
exported by torch (structured pruning and low-rank are already in its shapes), or, for an ONNX
model compressed without a torch module, the compressed backend's own proto (the user's graph,
its weights replaced). From there on every flavour is graph-level and does not care which. A
torch-exported graph is written *compact*: Constant-node weights become initializers,
node names and doc strings are dropped and intermediate tensors get short names. On a small
model that is a few percent of the file (the demo's int8 file: 0.269x -> 0.258x of fp32).
Quantized graphs additionally keep biases in float: ORT's quantizer stores each as int32 plus
a scale and a zero point, three tensors for one, and measured no faster.

A user's own ONNX graph keeps its node and tensor names (only Constant-node weights become
initializers): they are what the plan's keep_float and later inspection refer to.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
from torch import nn
from onnx import TensorProto, helper, numpy_helper

from engine import onnx_tools
from engine.data import batch_length
from engine.evaluate import OnnxRunner, Runner
from engine.export.base import (
    LATENCY_REPEATS,
    ONNX_SOURCE,
    TORCH_SOURCE,
    Exporter,
    ExportJob,
    eval_mode,
)


def compact(model: onnx.ModelProto, keep_names: bool = False) -> onnx.ModelProto:
    """A copy without Constant-node weights, node names, doc strings, value_info (shapes ORT
    infers itself) or long intermediate tensor names.

    Graph inputs, outputs and initializers keep their names (they are what users and
    inspection see); graphs with subgraphs keep every name, since a subgraph may refer to them.
    """
    result = onnx_tools.constants_to_initializers(model)
    if keep_names:
        return result
    graph = result.graph
    graph.doc_string = ""
    graph.ClearField("value_info")
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
    if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for attribute in node.attribute):
        return result
    kept = ({v.name for v in graph.input} | {v.name for v in graph.output}
            | {t.name for t in graph.initializer})
    short: dict[str, str] = {}
    counter = 0
    for node in graph.node:
        for name in node.output:
            if name and name not in kept and name not in short:
                while f"t{counter}" in kept:
                    counter += 1
                short[name] = f"t{counter}"
                counter += 1
    for node in graph.node:
        node.input[:] = [short.get(name, name) for name in node.input]
        node.output[:] = [short.get(name, name) for name in node.output]
    return result


def float_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where each DequantizeLinear of a constant int32 tensor (ORT's quantized biases)
    is replaced by the float tensor it computes."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    kept_nodes = []
    for node in graph.node:
        source = initializers.get(node.input[0]) if node.input else None
        if (node.op_type != "DequantizeLinear" or source is None
                or source.data_type != TensorProto.INT32
                or not all(name in initializers for name in node.input[1:] if name)):
            kept_nodes.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(
            _dequantized(node, initializers), name=node.output[0]))
    graph.ClearField("node")
    graph.node.extend(kept_nodes)
    onnx_tools.remove_unused_initializers(graph)
    return result


def _dequantized(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray:
    values = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
    zero = (numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
    if scale.ndim == 1 and values.ndim > 1:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        view = [1] * values.ndim
        view[axis] = -1
        scale, zero = scale.reshape(view), zero.reshape(view)
    return ((values - zero) * scale).astype(np.float32)


def fp32_graph(job: ExportJob) -> onnx.ModelProto:
    """The compressed model in fp32 ONNX, weights as initializers; made once per job.

    From the torch module by export, or from the compressed ONNX backend's proto. Not yet
    compact: ORT's quantizers name the nodes they add after the nodes they replace.
    """
    if "fp32" not in job.cache and job.source == ONNX_SOURCE:
        job.cache["fp32"] = onnx_tools.constants_to_initializers(
            _full_proto(job.compressed.backend))
    if "fp32" not in job.cache:
        with eval_mode(job.compressed.module) as module:
            job.cache["fp32"] = onnx_tools.constants_to_initializers(
                onnx_tools.export_onnx(_modeless(module), **job.onnx_trace(module)))
    return job.cache["fp32"]


def original_fp32_graph(job: ExportJob) -> onnx.ModelProto:
    """The original model in fp32 ONNX, written the same way: what sizes and times compare to.

    For an ONNX model, its own graph as loaded (external weights read in)."""
    if "original_fp32" not in job.cache and job.source == ONNX_SOURCE:
        job.cache["original_fp32"] = compact(_full_proto(job.model.backend), keep_names=True)
    if "original_fp32" not in job.cache:
        with eval_mode(job.original) as module:
            job.cache["original_fp32"] = compact(onnx_tools.export_onnx(
                _modeless(module), **job.onnx_trace(module)))
    return job.cache["original_fp32"]


class _Modeless(nn.Module):
    """A torch.export module for the ONNX tracer, which sets train(False) on what it traces:
    such a module refuses mode changes (its graph was captured in eval mode)."""

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program_module = program_module

    def train(self, mode: bool = True) -> _Modeless:
        return self

    def forward(self, *args: object) -> object:
        return self.program_module(*args)


def _modeless(module: nn.Module) -> nn.Module:
    """`module`, wrapped in :class:`_Modeless` when it comes from torch.export."""
    exported = isinstance(module, torch.fx.GraphModule) and \
        getattr(module, "_in_spec", None) is not None
    return _Modeless(module) if exported else module


def _full_proto(backend: object) -> onnx.ModelProto:
    """An ONNX backend's graph with every weight inside (its compressed copy, or the original)."""
    from engine.backends.onnx_graph import OnnxBackend

    if not isinstance(backend, OnnxBackend):
        raise TypeError(f"expected an ONNX backend, got {type(backend).__name__}")
    return backend.full_proto()


def keeps_names(job: ExportJob) -> bool:
    """A user's own ONNX graph keeps its names; a torch-exported one is compacted."""
    return job.source == ONNX_SOURCE


def save_checked(model: onnx.ModelProto, path: Path, keep_names: bool = False) -> None:
    """Write `model` as one file (compact unless `keep_names`), then check the file with onnx's
    checker and an ORT session.

    Models over protobuf's 2 GiB limit cannot be built in memory by our exporter in the first
    place (see onnx_tools.export_onnx), so no external-data files are written.
    """
    path.write_bytes(compact(model, keep_names=keep_names).SerializeToString())
    onnx_tools.validate(path)


@contextlib.contextmanager
def quiet_onnxruntime_logs() -> Iterator[None]:
    """Hold ORT's Python loggers at WARNING while its quantizers run.

    Importing ORT's MatMulNBits quantizer calls ``logging.basicConfig(level=INFO)``, after
    which it logs a line per node to the user's console.
    """
    logger = logging.getLogger("onnxruntime")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class OnnxExporter(Exporter):
    """Formats ONNX Runtime reloads; timed against the original's fp32 ONNX, interleaved."""

    suffixes = (".onnx",)
    runtime = "onnxruntime"
    sources = frozenset({TORCH_SOURCE, ONNX_SOURCE})

    def reload(self, path: Path, job: ExportJob) -> Runner:
        return OnnxRunner(path)

    def latency(self, path: Path, job: ExportJob) -> tuple[float, float, str]:
        times = onnx_tools.compare_latency_ms(
            {"file": path, "original": original_fp32_graph(job)}, job.example,
            repeats=LATENCY_REPEATS, threads=1)
        return times["file"]["median_ms"], times["original"]["median_ms"], \
            (f"onnxruntime CPU, 1 thread, batch {batch_length(job.example)}, median of "
             f"{LATENCY_REPEATS} (interleaved with the original's fp32 ONNX)")

    def baseline_bytes(self, job: ExportJob) -> tuple[int, str]:
        if job.source == ONNX_SOURCE:
            return onnx_tools.serialized_size(original_fp32_graph(job)), "the original ONNX graph"
        return (onnx_tools.serialized_size(original_fp32_graph(job)),
                "the original model as fp32 ONNX")


#: Operators whose second input is a layer's weight (the graph-level view of "a layer").
WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def weight_consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Initializer name -> the Conv/MatMul/Gemm nodes that read it as their weight (input 1):
    how a plan keyed by tensor names maps onto the graph's layers."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in initializers:
            found.setdefault(node.input[1], []).append(node)
    return found

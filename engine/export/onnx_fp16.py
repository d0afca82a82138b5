"""ONNX fp16: every weight stored in 16 bits, half the fp32 file; chosen by measurement.

Two ways to store it, both built and timed in ONNX Runtime on the example batch:

* weight-only fp16: each float32 weight becomes a float16 initializer followed by a Cast to
  float32. ONNX Runtime folds the Casts when it loads the file, so it runs exactly the fp32
  kernels (every CPU has them) at fp32 speed, from a file half the size;
* the whole graph in fp16 (ONNX Runtime's own float16 converter, inputs and outputs kept
  float32): smaller activations, but ORT's CPU provider has few fp16 kernels and inserts casts
  around the rest, which usually makes it slower on CPU.

The whole-graph file is kept only when it matches the compressed model (cosine >= 0.99) and is
clearly faster (at most 0.9x the weight-only latency); the notes say which was chosen and why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine import onnx_tools
from engine.errors import one_line
from engine.export.base import ExportJob, register
from engine.export.onnx_common import OnnxExporter, fp32_graph, keeps_names, save_checked

#: Tensors smaller than this stay float32 (shape-like constants, scalars: nothing to save).
MIN_ELEMENTS = 16
#: Suffix of the float16 initializer that a Cast turns back into the original name.
FP16_SUFFIX = "__fp16"
#: The whole-graph fp16 file must be this much faster than weight-only fp16 to be chosen.
WHOLE_GRAPH_SPEEDUP = 0.9
MIN_COSINE = 0.99


def weights_in_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every float32 initializer of at least MIN_ELEMENTS values is stored as
    float16 and cast back to float32 by a Cast node named like the tensor; nothing else
    changes, so every consumer (subgraphs included) reads the same float32 name. Constant
    nodes and initializers inside If / Loop / Scan bodies are stored the same way."""
    result = onnx.ModelProto()
    result.CopyFrom(onnx_tools.constants_to_initializers(model))
    graph = result.graph
    graph_inputs = {value.name for value in graph.input}
    kept: list[onnx.TensorProto] = []
    casts: list[onnx.NodeProto] = []
    for tensor in graph.initializer:
        size = int(np.prod(tensor.dims)) if tensor.dims else 1
        if (tensor.data_type != TensorProto.FLOAT or size < MIN_ELEMENTS
                or tensor.name in graph_inputs):  # an overridable input keeps its type
            kept.append(tensor)
            continue
        half_name = f"{tensor.name}{FP16_SUFFIX}"
        kept.append(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16),
                                            half_name))
        casts.append(helper.make_node("Cast", [half_name], [tensor.name], to=TensorProto.FLOAT,
                                      name=f"{tensor.name}{FP16_SUFFIX}_cast"))
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)  # Casts read initializers only, so first is in order
    graph.ClearField("node")
    graph.node.extend(nodes)
    taken = onnx_tools.taken_names(graph)
    for node in graph.node:
        for sub in onnx_tools.subgraphs(node):
            _subgraph_weights_in_fp16(sub, taken)
    return result


def _float_constant(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The float32 tensor of a Constant node's ``value`` (where weights sit), else None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    return next((a.t for a in node.attribute if a.name == "value"
                 and a.type == onnx.AttributeProto.TENSOR
                 and a.t.data_type == TensorProto.FLOAT), None)


def _subgraph_weights_in_fp16(graph: onnx.GraphProto, taken: set[str]) -> None:
    """weights_in_fp16 inside an If / Loop / Scan body, its own bodies included: Constant
    nodes and initializers of float32 become float16 with a Cast back under the same name.
    Real models keep all their weights there (Silero VAD: 25 If nodes, nested 4 deep), where
    constants_to_initializers, which converts the main graph only, does not reach."""
    inputs = {value.name for value in graph.input}
    nodes: list[onnx.NodeProto] = []
    kept: list[onnx.TensorProto] = []
    for tensor in graph.initializer:
        size = int(np.prod(tensor.dims)) if tensor.dims else 1
        if tensor.data_type != TensorProto.FLOAT or size < MIN_ELEMENTS or tensor.name in inputs:
            kept.append(tensor)
            continue
        half = onnx_tools.unique_name(f"{tensor.name}{FP16_SUFFIX}", taken)
        kept.append(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16),
                                            half))
        nodes.append(helper.make_node("Cast", [half], [tensor.name], to=TensorProto.FLOAT,
                                      name=onnx_tools.unique_name(f"{half}_cast", taken)))
    for node in graph.node:
        for sub in onnx_tools.subgraphs(node):
            _subgraph_weights_in_fp16(sub, taken)
        tensor = _float_constant(node)
        size = int(np.prod(tensor.dims)) if tensor is not None and tensor.dims else 1
        if tensor is None or size < MIN_ELEMENTS:
            nodes.append(node)
            continue
        half = onnx_tools.unique_name(f"{node.output[0]}{FP16_SUFFIX}", taken)
        nodes.append(helper.make_node(
            "Constant", [], [half], name=onnx_tools.unique_name(f"{half}_constant", taken),
            value=numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16),
                                          half)))
        nodes.append(helper.make_node("Cast", [half], [node.output[0]], to=TensorProto.FLOAT,
                                      name=onnx_tools.unique_name(f"{half}_cast", taken)))
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    graph.ClearField("node")
    graph.node.extend(nodes)


def whole_graph_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float tensor in fp16 by ONNX Runtime's converter; inputs and outputs stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(onnx_tools.constants_to_initializers(model),
                                                   keep_io_types=True))
    converted.topological_sort()  # the converter appends its Casts after their consumers
    return converted.model


def _cosine(expected: np.ndarray, produced: np.ndarray) -> float:
    a, b = expected.astype(np.float64).ravel(), produced.astype(np.float64).ravel()
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm else 0.0


@register
class OnnxFp16Exporter(OnnxExporter):
    name = "onnx-fp16"
    description = ("ONNX fp16: weights in 16 bits (cast to fp32 on load, or the whole graph in "
                   "fp16 where ONNX Runtime runs it faster); half the fp32 file")
    exact = False

    def write(self, job: ExportJob, path: Path) -> None:
        fp32 = fp32_graph(job)
        weight_only = weights_in_fp16(fp32)
        chosen, why = weight_only, "weight-only fp16 (Casts folded by ONNX Runtime at load)"
        try:
            whole = whole_graph_fp16(fp32)
            onnx_tools.validate(whole)
        except Exception as error:  # noqa: BLE001 - ORT's converter fails on some graphs
            job.notes.append(f"whole-graph fp16 not possible here ({one_line(error)}); "
                             "weights are stored fp16 and cast to fp32")
            whole = None
        if whole is not None and job.example is not None:
            times = onnx_tools.compare_latency_ms({"weights": weight_only, "whole": whole},
                                                  job.example, repeats=10, threads=1)
            reference = onnx_tools.run(onnx_tools.session(fp32, threads=1), job.example)
            cosine = _cosine(reference, onnx_tools.run(onnx_tools.session(whole, threads=1),
                                                       job.example))
            ratio = times["whole"]["median_ms"] / times["weights"]["median_ms"]
            measured = (f"whole-graph fp16 {times['whole']['median_ms']:.2f} ms vs weight-only "
                        f"{times['weights']['median_ms']:.2f} ms ({ratio:.2f}x), output cosine "
                        f"{cosine:.4f}")
            if cosine >= MIN_COSINE and ratio <= WHOLE_GRAPH_SPEEDUP:
                chosen, why = whole, f"whole graph in fp16, chosen by measurement: {measured}"
            else:
                why = f"weight-only fp16, chosen by measurement: {measured}"
        job.notes.append(f"fp16 ONNX: {why}")
        save_checked(chosen, path, keep_names=keeps_names(job))

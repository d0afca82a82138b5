"""ONNX weight-only 4/8-bit: Linear/MatMul weights as ONNX Runtime's MatMulNBits, activations float.

MatMulNBits stores codes packed with one scale (and, asymmetric, one packed zero point) per
block of inputs; the block size is the plan's group size when ORT accepts it (a power of two,
at least 16), else 128, whose per-block overhead is a quarter bit per weight. The codes are
computed again by ORT's quantizer from the compressed weights: with the plan's group size and
symmetry they land on the same grid. ORT has no low-bit kernel for Conv; those stay float and
the export says so, and a model with no MatMul/Gemm weights is refused with that reason.

ORT's quantizer takes every constant MatMul/Gemm weight. Weights the plan leaves in float are
hidden from it behind an Identity node (it skips weights that are not constants), recognised
by their values, then exposed again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from engine.compressed import CompressedModel, QuantizedWeight
from engine.export.base import ExportJob, register
from engine.export.onnx_common import (
    OnnxExporter,
    fp32_graph,
    quiet_onnxruntime_logs,
    save_checked,
)

#: Block size when the plan has none ORT accepts: 0.25 bit of scale per weight.
DEFAULT_BLOCK_SIZE = 128


def quantized_layers(compressed: CompressedModel) -> tuple[dict[str, QuantizedWeight],
                                                           dict[str, QuantizedWeight]]:
    """The plan's quantized weights by layer name: (Linear layers, all other layers)."""
    linear: dict[str, QuantizedWeight] = {}
    other: dict[str, QuantizedWeight] = {}
    for key, quant in compressed.quantized.items():
        layer = key.rpartition(".")[0]
        is_linear = isinstance(compressed.module.get_submodule(layer), nn.Linear)
        (linear if is_linear else other)[layer] = quant
    return linear, other


def weight_only_settings(job: ExportJob) -> tuple[int, bool]:
    """(block size, symmetric) matching the plan's Linear quantization where ORT allows."""
    linear, _ = quantized_layers(job.compressed)
    sizes = {q.group_size for q in linear.values()}
    size = sizes.pop() if len(sizes) == 1 else None
    valid = size is not None and size >= 16 and size & (size - 1) == 0
    if linear and not valid:
        job.notes.append(f"MatMulNBits takes power-of-two blocks of at least 16 inputs; the "
                         f"plan's Linear codes are re-quantized in blocks of {DEFAULT_BLOCK_SIZE}")
    symmetric = bool(linear) and all(q.symmetric for q in linear.values())
    return (size if valid else DEFAULT_BLOCK_SIZE), symmetric


#: Prefix of the Identity outputs that hide float weights from ORT's quantizer.
_HIDDEN = "slimscope_float_weight/"


def _hide_float_weights(model: onnx.ModelProto, planned: list[torch.Tensor]) -> onnx.ModelProto:
    """A copy where MatMul/Gemm weights that are none of `planned` (as (out, in) matrices)
    reach their node through an Identity."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for weight in planned:
        by_shape.setdefault(tuple(weight.shape), []).append(weight.detach().numpy())
    hidden = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in initializers:
            continue
        matrix = numpy_helper.to_array(initializers[node.input[1]])
        transposed = node.op_type == "Gemm" and any(
            a.name == "transB" and a.i for a in node.attribute)
        matrix = matrix if transposed else matrix.T  # torch's (out, in) layout
        if any(np.array_equal(matrix, w) for w in by_shape.get(matrix.shape, [])):
            continue
        name = f"{_HIDDEN}{node.input[1]}"
        hidden.append(helper.make_node("Identity", [node.input[1]], [name]))
        node.input[1] = name
    nodes = hidden + list(graph.node)  # they read initializers only, so first is in order
    graph.ClearField("node")
    graph.node.extend(nodes)
    return result


def _expose_float_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Undo :func:`_hide_float_weights`: consumers read the initializers directly again."""
    graph = model.graph
    for node in graph.node:
        node.input[:] = [name.removeprefix(_HIDDEN) for name in node.input]
    kept = [node for node in graph.node
            if not (node.op_type == "Identity" and node.output[0].startswith(_HIDDEN))]
    graph.ClearField("node")
    graph.node.extend(kept)
    return model


class _WeightOnly(OnnxExporter):
    bits: int
    exact = False

    def write(self, job: ExportJob, path: Path) -> None:
        from engine.methods.static_int8 import quantize_weight_only

        block_size, symmetric = weight_only_settings(job)
        linear, _ = quantized_layers(job.compressed)
        if not any(q.bits <= self.bits for q in linear.values()):
            job.notes.append(f"the plan puts no Linear weights in {self.bits} bits or fewer: this "
                             f"file adds {self.bits}-bit rounding that the plan's measurements "
                             "do not include")
        fp32 = fp32_graph(job)
        if linear:  # else the user asked for weight-only on a plan without it: quantize all
            module = job.compressed.module
            fp32 = _hide_float_weights(fp32, [module.get_submodule(name).weight
                                              for name in linear])
        convs = sum(node.op_type in ("Conv", "ConvTranspose") for node in fp32.graph.node)
        with quiet_onnxruntime_logs():
            quantized = quantize_weight_only(fp32, self.bits, block_size, symmetric=symmetric,
                                             skip_unsupported=True)
        if convs:
            job.notes.append(f"{convs} Conv layers stay fp32: ONNX Runtime has no {self.bits}-bit "
                             "weight-only kernel for Conv; use onnx-int8 (8-bit) or .slim")
        save_checked(_expose_float_weights(quantized), path)


@register
class OnnxWeight4Exporter(_WeightOnly):
    name = "onnx-w4"
    bits = 4
    description = "ONNX weight-only 4-bit (MatMulNBits) for Linear/MatMul; activations float"


@register
class OnnxWeight8Exporter(_WeightOnly):
    name = "onnx-w8"
    bits = 8
    description = "ONNX weight-only 8-bit (MatMulNBits) for Linear/MatMul; activations float"

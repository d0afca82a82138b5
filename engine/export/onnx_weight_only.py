"""ONNX weight-only 4/8-bit: Linear/MatMul weights as ONNX Runtime's MatMulNBits, activations float.

MatMulNBits stores codes packed with one scale (and, asymmetric, one packed zero point) per
block of inputs; the block size is the plan's group size when ORT accepts it (a power of two,
at least 16), else 128, whose per-block overhead is a quarter bit per weight. The codes are
computed again by ORT's quantizer from the compressed weights: with the plan's group size and
symmetry they land on the same grid. ORT has no low-bit kernel for Conv; those stay float and
the export says so, and a model with no MatMul/Gemm weights is refused with that reason.

ORT's quantizer takes every constant MatMul/Gemm weight. Weights the plan leaves in float are
hidden from it behind an Identity node (it skips weights that are not constants), recognised
by their values (a torch-exported graph) or by name (a user's ONNX graph, whose plan is keyed
by initializer names), then exposed again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engine.compressed import CompressedModel, QuantizedWeight
from engine.export.base import ONNX_SOURCE, ExportJob, register, source_of
from engine.methods.base import layer_kind, submodule, weight_of
from engine.export.onnx_common import (
    OnnxExporter,
    fp32_graph,
    keeps_names,
    quiet_onnxruntime_logs,
    save_checked,
    weight_consumers,
)

#: Block size when the plan has none ORT accepts: 0.25 bit of scale per weight.
DEFAULT_BLOCK_SIZE = 128


def quantized_layers(compressed: CompressedModel) -> tuple[dict[str, QuantizedWeight],
                                                           dict[str, QuantizedWeight]]:
    """The plan's quantized weights by layer name: (Linear layers, all other layers).

    For an ONNX model, by tensor key: (weights of MatMul/Gemm nodes, all others)."""
    linear: dict[str, QuantizedWeight] = {}
    other: dict[str, QuantizedWeight] = {}
    if source_of(compressed) == ONNX_SOURCE:
        consumers = weight_consumers(compressed.backend.full_proto())  # type: ignore[union-attr]
        for key, quant in compressed.quantized.items():
            matmul = any(node.op_type in ("MatMul", "Gemm") for node in consumers.get(key, []))
            (linear if matmul else other)[key] = quant
        return linear, other
    for key, quant in compressed.quantized.items():
        layer = key.rpartition(".")[0]
        is_linear = layer_kind(submodule(compressed.module, layer)) == "Linear"
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


def planned_by_value(planned: list[np.ndarray]) -> Callable[[str, np.ndarray], bool]:
    """Whether a graph weight (in torch's (out, in) layout) is one of the `planned` matrices."""
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for weight in planned:
        by_shape.setdefault(tuple(weight.shape), []).append(weight)
    return lambda name, matrix: any(np.array_equal(matrix, w)
                                    for w in by_shape.get(matrix.shape, []))


def _hide_float_weights(model: onnx.ModelProto,
                        is_planned: Callable[[str, np.ndarray], bool]) -> onnx.ModelProto:
    """A copy where MatMul/Gemm weights that are not planned (by initializer name and value in
    torch's (out, in) layout) reach their node through an Identity."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    hidden = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in initializers:
            continue
        matrix = numpy_helper.to_array(initializers[node.input[1]])
        transposed = node.op_type == "Gemm" and any(
            a.name == "transB" and a.i for a in node.attribute)
        matrix = matrix if transposed else matrix.T  # torch's (out, in) layout
        if is_planned(node.input[1], matrix):
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


def _nbits_codes(quant: QuantizedWeight, bits: int, prefix: str
                 ) -> tuple[list[onnx.TensorProto], int, int] | None:
    """MatMulNBits' packed weight, scales and zero points made from the plan's own codes, or
    None when they do not fit its layout: codes (N, K) of `bits` bits in blocks of
    `group_size` inputs (a power of two >= 16), as a torch Linear's (out, in) weight.

    MatMulNBits computes ``(q - zero_point) * scale`` with unsigned q and, without a
    zero-point input, zero_point 2**(bits-1): symmetric codes shifted by that much are the same
    numbers exactly."""
    size = quant.group_size
    if (quant.bits > bits or quant.codes.dim() != 2 or not size or size < 16
            or size & (size - 1) or quant.codes.shape[1] % size):
        return None
    codes = quant.codes.numpy().astype(np.int16)
    n, k = codes.shape
    blocks = k // size
    unsigned = (codes + (1 << (bits - 1) if quant.symmetric else 0)).astype(np.uint8)
    unsigned = unsigned.reshape(n, blocks, size)
    packed = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4) if bits == 4 else unsigned
    tensors = [numpy_helper.from_array(np.ascontiguousarray(packed), f"{prefix}_Q{bits}"),
               numpy_helper.from_array(quant.scale.numpy().astype(np.float32).reshape(-1),
                                       f"{prefix}_scales")]
    if not quant.symmetric:
        zero = quant.zero_point.numpy().astype(np.uint8).reshape(n, blocks)
        if bits == 4:
            zero = np.concatenate([zero, np.zeros((n, blocks % 2), np.uint8)], axis=1)
            zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
        tensors.append(numpy_helper.from_array(np.ascontiguousarray(zero).reshape(-1),
                                               f"{prefix}_zero_points"))
    return tensors, n, k


def codes_as_matmul_nbits(model: onnx.ModelProto, planned: dict[str, QuantizedWeight],
                          bits: int) -> tuple[onnx.ModelProto, set[str]]:
    """A copy where MatMul (weight (K, N)) and Gemm (transB, weight (N, K)) nodes whose planned
    codes fit MatMulNBits (see :func:`_nbits_codes`) run on those codes, written as they are
    rather than quantized again; returns the copy and the weight names so written."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    shapes = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    written: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = node.input[1] if len(node.input) > 1 else ""
        quant = planned.get(weight)
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        fits = quant is not None and weight in shapes and (
            (node.op_type == "MatMul" and tuple(quant.codes.shape) == shapes[weight][::-1])
            or (node.op_type == "Gemm" and attributes.get("transB") == 1
                and not attributes.get("transA") and attributes.get("alpha", 1.0) == 1.0
                and attributes.get("beta", 1.0) == 1.0
                and tuple(quant.codes.shape) == shapes[weight]))
        fits = fits and _codes_match(quant, initializers[weight], node.op_type == "MatMul")
        made = _nbits_codes(quant, bits, weight) if fits else None  # type: ignore[arg-type]
        if made is None:
            nodes.append(node)
            continue
        tensors, n, k = made
        graph.initializer.extend(tensors)
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        out = f"{node.output[0]}_nbits" if bias else node.output[0]
        nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *(t.name for t in tensors)], [out],
            name=node.name or f"{weight}_MatMulNBits", domain="com.microsoft", K=k, N=n,
            bits=bits, block_size=quant.group_size))  # type: ignore[union-attr]
        if bias:
            nodes.append(helper.make_node("Add", [out, bias], [node.output[0]],
                                          name=f"{node.name or weight}_bias"))
        written.add(weight)
    graph.ClearField("node")
    graph.node.extend(nodes)
    if written:
        from engine import onnx_tools

        onnx_tools.remove_unused_initializers(graph)
        if not any(o.domain == "com.microsoft" for o in result.opset_import):
            result.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return result, written


def _codes_match(quant: QuantizedWeight, stored: onnx.TensorProto, transposed: bool) -> bool:
    """Whether the codes, read as MatMulNBits reads them (``[N, K]``), decode to the graph's
    weight (a MatMul's ``[K, N]`` transposed). Shapes alone cannot tell for a square weight:
    round-to-nearest codes of an ONNX MatMul are kept in its stored ``[K, N]`` layout, AWQ's
    in ``[N, K]``; written the wrong way round the layer would compute with Wᵀ."""
    weight = numpy_helper.to_array(stored).astype(np.float32)
    expected = weight.T if transposed else weight
    decoded = quant.dequantize().numpy()
    if decoded.shape != expected.shape:
        return False
    tolerance = 1e-5 * max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    return bool(np.allclose(decoded, expected, rtol=1e-5, atol=tolerance))


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
        if linear and job.source == ONNX_SOURCE:
            fp32, written = codes_as_matmul_nbits(fp32, linear, self.bits)
            rest = {key: quant for key, quant in linear.items() if key not in written}
            if written:
                job.notes.append(f"{len(written)} MatMul/Gemm weights written as MatMulNBits "
                                 "from the plan's own codes (no second rounding)")
            if not rest:
                if any(node.op_type in ("Conv", "ConvTranspose") for node in fp32.graph.node):
                    job.notes.append(f"Conv layers stay fp32: ONNX Runtime has no {self.bits}-"
                                     "bit weight-only kernel for Conv; use onnx-int8")
                save_checked(fp32, path, keep_names=True)
                return
            job.notes.append(f"{len(rest)} weights re-quantized by ONNX Runtime's quantizer: "
                             "their codes are not grouped along the inputs in blocks it takes")
            fp32 = _hide_float_weights(fp32, lambda name, matrix: name in rest)
        elif linear:  # else the user asked for weight-only on a plan without it: quantize all
            module = job.compressed.module
            fp32 = _hide_float_weights(fp32, planned_by_value(
                [weight_of(module, name).detach().numpy() for name in linear]))
        convs = sum(node.op_type in ("Conv", "ConvTranspose") for node in fp32.graph.node)
        with quiet_onnxruntime_logs():
            quantized = quantize_weight_only(fp32, self.bits, block_size, symmetric=symmetric,
                                             skip_unsupported=True)
        if convs:
            job.notes.append(f"{convs} Conv layers stay fp32: ONNX Runtime has no {self.bits}-bit "
                             "weight-only kernel for Conv; use onnx-int8 (8-bit) or .slim")
        save_checked(_expose_float_weights(quantized), path, keep_names=keeps_names(job))


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

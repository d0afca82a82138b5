"""ONNX int8, runnable in ONNX Runtime: static QDQ (calibrated) chosen by measurement, or dynamic.

``onnx-int8`` hands the fp32 graph to :func:`quantize_int8_best`, which builds static QDQ,
dynamic-for-MatMul and a mix, and keeps the smallest that is not slower than fp32: ORT's dynamic
int8 makes conv nets several times slower on CPU (ConvInteger), so a file that is merely
smaller is not good enough. ``onnx-dynamic`` is dynamic int8 for MatMul/Gemm only (no
calibration); Conv stays fp32 on purpose. The choice and every candidate's size and latency
go into the export notes.

The plan is honoured graph-level, so the same code serves a torch-exported graph and a user's
own ONNX graph: ``activation_quant.keep_float`` names ONNX nodes that stay float (ORT's
``nodes_to_exclude``; the measured choice is then static QDQ with those nodes excluded, since
the dynamic candidates would quantize them again), and weight codes are per-channel when the
plan's codes are per-channel or group-wise, per-tensor when all of them are per-tensor.

A node kept float keeps float *activations*; its weight is stored as int8 codes read through a
DequantizeLinear all the same (weight-only int8, :func:`weight_only_int8`), as every other
weight here is int8 whatever the plan says (see the note of _plan_mismatch_notes). Keeping a
few nodes float then costs size almost nothing: on the PP-OCRv4 recogniser 0.28x of the fp32
file instead of 0.55x. There it also measured better: the same 301 nodes kept float with their
9 Conv weights in fp32 gave word accuracy 0.875, with int8 weights 0.963 (fp32 0.971); why
float weights lose there is not understood yet.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine import onnx_tools

from engine.compress import CALIBRATION_BATCH, DEFAULT_CALIBRATION_SAMPLES
from engine.data import SyntheticData
from engine.errors import SlimscopeError
from engine.export.base import TORCH_SOURCE, ExportJob, register
from engine.export.onnx_common import (
    OnnxExporter,
    float_biases,
    fp32_graph,
    keeps_names,
    quiet_onnxruntime_logs,
    save_checked,
    weight_consumers,
)
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress, sub_progress


def keep_float_nodes(job: ExportJob) -> list[str]:
    """The plan's ONNX node names whose activations stay float; notes names the graph lacks."""
    names = list((job.compressed.activation_quant or {}).get("keep_float", ()))
    present = {node.name for node in fp32_graph(job).graph.node}
    missing = [name for name in names if name not in present]
    if missing:
        job.notes.append(f"{len(missing)} keep_float nodes are not in this graph (first: "
                         f"{missing[0]!r}); they were made for another export of the model")
    return [name for name in names if name in present]


def plan_per_channel(job: ExportJob) -> bool:
    """Per-channel int8 weights unless every code in the plan is per-tensor."""
    quantized = job.compressed.quantized.values()
    finer = [q.axis is not None or bool(q.group_size) for q in quantized]
    if finer and any(finer) and not all(finer):
        job.notes.append("the plan mixes per-tensor and per-channel codes; ONNX Runtime's "
                         "quantizer takes one setting: every int8 weight is per-channel")
    return not finer or any(finer)


def _prepared(model: onnx.ModelProto, per_channel: bool,
              keep_float: Sequence[str]) -> onnx.ModelProto:
    """The graph ready for ORT's quantizer, with ORT's graph optimization where it keeps the
    `keep_float` node names.

    Unlike static_int8.prepare_for_quantization this skips symbolic shape inference, which on
    failure writes sym_shape_infer_temp.onnx and its weights into the current directory, and
    passes ORT a file, since given a ModelProto it moves the weights out of it in place.
    """
    from onnxruntime.quantization import quant_pre_process

    from engine.methods.static_int8 import _quiet_onnxruntime, prepare_for_quantization

    base = prepare_for_quantization(model, per_channel=per_channel, pre_process=False)
    with tempfile.TemporaryDirectory(prefix="slimscope-pre-") as folder:
        source, output = Path(folder) / "input.onnx", Path(folder) / "prepared.onnx"
        source.write_bytes(base.SerializeToString())
        try:
            with _quiet_onnxruntime():
                quant_pre_process(str(source), str(output), skip_symbolic_shape=True)
            optimized = onnx.load(str(output))
        except Exception:  # noqa: BLE001 - ORT's pre-processing is optional and raises anything
            return base
    if not set(keep_float) <= {node.name for node in optimized.graph.node}:
        return base  # a fusion renamed a node the plan keeps float
    return optimized


def quantize_static_keeping_float(
    fp32_model: onnx.ModelProto,
    calibration_batches: Iterable[onnx_tools.Batch],
    keep_float: Sequence[str],
    *,
    method: str = "minmax",
    per_channel: bool = True,
    weights_int8: Sequence[str] = (),
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> onnx.ModelProto:
    """Static int8 QDQ as engine.methods.static_int8.quantize_static_int8 builds it, with the
    nodes named in `keep_float` left in float (ORT's ``nodes_to_exclude``); those of them also
    named in `weights_int8` read int8 weights (:func:`weight_only_int8`).

    ORT's pre-processing may rename nodes it fuses; if it loses any of `keep_float`, the graph
    is quantized without it, so the plan's names still apply (see :func:`_prepared`).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from engine.methods.static_int8 import (
        CALIBRATION_METHODS,
        _BatchReader,
        _static_op_types,
        _with_temp_output,
        calibration_feeds,
    )

    if method not in CALIBRATION_METHODS:
        raise SlimscopeError(f"unknown calibration method {method!r} "
                             f"(choose one of {', '.join(CALIBRATION_METHODS)})")
    progress(0.0, "preparing the graph for quantization")
    prepared = _prepared(fp32_model, per_channel, keep_float)
    feeds = calibration_feeds(prepared, calibration_batches)
    cancel.check()
    reader = _BatchReader(feeds, sub_progress(progress, 0.1, 0.85), cancel)
    calibrate_method = {"minmax": CalibrationMethod.MinMax,
                        "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy}[method]
    with tempfile.TemporaryDirectory(prefix="slimscope-int8-") as folder:
        # given a ModelProto, ORT moves its weights out to external data in place; a file it
        # reads itself leaves ours whole
        source = Path(folder) / "prepared.onnx"
        source.write_bytes(prepared.SerializeToString())
        quantized = _with_temp_output(lambda output: quantize_static(
            str(source), output, reader, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=_static_op_types(), per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=calibrate_method, nodes_to_exclude=list(keep_float),
            # a Relu folded into its Q/DQ pair would vanish from the float path rewired below
            extra_options={"QDQKeepRemovableActivations": True}))
    quantized = float_inputs_for(quantized, keep_float, prepared)
    kept = set(keep_float)
    quantized, _ = weight_only_int8(quantized, [name for name in weights_int8 if name in kept],
                                    per_channel=per_channel)
    cancel.check()
    onnx_tools.validate(quantized)
    progress(1.0, "static int8 done")
    return quantized


#: Operators ORT fuses with the QuantizeLinear on their output into one int8 kernel.
_FUSED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def float_inputs_for(model: onnx.ModelProto, keep_float: Sequence[str],
                     before: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where the `keep_float` nodes read their activations unquantized.

    ORT's ``nodes_to_exclude`` leaves those nodes themselves in float, but a tensor they read
    is still quantized when its producer is (a Relu's output gets a QuantizeLinear ->
    DequantizeLinear pair), so the kept node would see int8 rounding all the same. Each such
    input is wired back to the tensor before the pair; pairs nobody reads any more are dropped.
    Only where that tensor is still made by the operator that made it in `before` (the graph
    given to the quantizer): ORT folds some activations into a pair, and skipping them is safe.
    Nor where it is the output of a quantized weight operator (Conv, MatMul, Gemm not kept
    float): ORT runs Conv as QLinearConv only with the QuantizeLinear on its output, and on the
    PP-OCRv4 recogniser removing those made the file 1.39x slower than fp32 instead of 0.67x.
    The kept node reads that producer's int8 output then, as ORT's own nodes_to_exclude does.
    """
    made_by = {name: node.op_type for node in before.graph.node for name in node.output}
    fused = {name for node in before.graph.node if node.op_type in _FUSED_OPS
             and node.name not in set(keep_float) for name in node.output}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    keep = set(keep_float)
    producers = {name: node for node in graph.node for name in node.output}
    for node in graph.node:
        if node.name not in keep:
            continue
        for index, name in enumerate(node.input):
            dequantize = producers.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            quantize = producers.get(dequantize.input[0])
            if quantize is None or quantize.op_type != "QuantizeLinear":
                continue
            source = quantize.input[0]
            now = producers[source].op_type if source in producers else None
            if now == made_by.get(source) and source not in fused:  # graph inputs: both None
                node.input[index] = source
    _drop_unread_pairs(graph)
    return result


def weight_slot(node: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto]
                ) -> tuple[int, int | None] | None:
    """Where `node` reads a constant float weight of rank >= 2, and the axis of its output
    channels there (None: one scale for the whole tensor); None when it reads none."""
    def weight(slot: int) -> onnx.TensorProto | None:
        tensor = initializers.get(node.input[slot]) if len(node.input) > slot else None
        return tensor if (tensor is not None and len(tensor.dims) >= 2
                          and tensor.data_type == TensorProto.FLOAT) else None

    if node.op_type in ("Conv", "ConvTranspose") and weight(1) is not None:
        return 1, 0 if node.op_type == "Conv" else 1
    if node.op_type == "Gemm" and weight(1) is not None:
        transposed = any(a.name == "transB" and a.i for a in node.attribute)
        return 1, 0 if transposed else 1
    if node.op_type == "MatMul":
        for slot, axis in ((1, 1), (0, 0)):  # X @ W: columns are outputs; W @ X: rows
            tensor = weight(slot)
            if tensor is not None:
                return slot, axis if len(tensor.dims) == 2 else None
    return None


def weight_only_int8(model: onnx.ModelProto, node_names: Iterable[str], *,
                     per_channel: bool = True) -> tuple[onnx.ModelProto, list[str]]:
    """A copy where the named nodes read their weights as symmetric int8 codes through a
    DequantizeLinear (their activations stay float), and the names of the nodes changed.

    For nodes whose activations the plan keeps float but whose weights it quantizes: the
    file shrinks as if they were int8 and ORT still runs them in float. A weight read by
    several named nodes is stored once; the float tensor goes when nothing reads it any more.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    taken = ({n for node in graph.node for n in (*node.input, *node.output)}
             | set(initializers) | {value.name for value in graph.input})
    wanted = set(node_names)
    dequantized: dict[str, str] = {}
    added: list[onnx.NodeProto] = []
    changed = []
    for node in graph.node:
        found = weight_slot(node, initializers) if node.name in wanted else None
        if found is None:
            continue
        slot, axis = found
        name = node.input[slot]
        if name not in dequantized:
            dequantized[name] = _fresh_name(f"{name}_dequantized", taken)
            codes, scale = _symmetric_int8(numpy_helper.to_array(initializers[name]),
                                           axis if per_channel else None)
            codes_name = _fresh_name(f"{name}_int8", taken)
            scale_name = _fresh_name(f"{name}_scale", taken)
            graph.initializer.extend([numpy_helper.from_array(codes, codes_name),
                                      numpy_helper.from_array(scale, scale_name)])
            added.append(helper.make_node(
                "DequantizeLinear", [codes_name, scale_name], [dequantized[name]],
                name=_fresh_name(f"{name}_DequantizeLinear", taken),
                **({"axis": axis} if scale.ndim else {})))
        node.input[slot] = dequantized[name]
        changed.append(node.name)
    if added:
        nodes = [*added, *graph.node]  # DequantizeLinear reads initializers only: first is
        graph.ClearField("node")       # topologically sound
        graph.node.extend(nodes)
        onnx_tools.remove_unused_initializers(graph)
    return result, changed


def _symmetric_int8(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Codes in [-127, 127] and the float scale (one per index of `axis`, or one)."""
    other = tuple(i for i in range(weight.ndim) if i != axis) if axis is not None else None
    largest = np.abs(weight).max(axis=other) if weight.size else np.zeros(())
    scale = np.where(largest > 0, largest / 127.0, 1.0).astype(np.float32)
    shaped = scale
    if axis is not None:
        view = [1] * weight.ndim
        view[axis] = -1
        shaped = scale.reshape(view)
    codes = np.clip(np.rint(weight / shaped), -127, 127).astype(np.int8)
    return codes, scale


def _fresh_name(base: str, taken: set[str]) -> str:
    name, counter = base, 0
    while name in taken:
        counter += 1
        name = f"{base}_{counter}"
    taken.add(name)
    return name


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of `graph` or of its subgraphs reads, and its outputs."""
    read = {value.name for value in graph.output}
    for node in graph.node:
        read.update(node.input)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH
                        else attribute.graphs):
                read |= _names_read(sub)
    return read


def _drop_unread_pairs(graph: onnx.GraphProto) -> None:
    """Remove QuantizeLinear/DequantizeLinear nodes whose outputs nothing reads, repeatedly."""
    while True:
        read = _names_read(graph)
        kept = [node for node in graph.node
                if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
                or any(name in read for name in node.output)]
        if len(kept) == len(graph.node):
            return
        graph.ClearField("node")
        graph.node.extend(kept)


def _plan_mismatch_notes(job: ExportJob) -> None:
    """Where int8 for every operator differs from what the plan asked for, layer by layer."""
    quantized = job.compressed.quantized
    low = sorted({q.bits for q in quantized.values() if q.bits < 8})
    if low:
        job.notes.append(f"weights the plan put in {'/'.join(map(str, low))} bits are stored in "
                         "8 bits: ONNX Runtime has no lower-bit kernel for them (Conv) here; "
                         ".slim stores them packed")
    if job.source == TORCH_SOURCE:
        from torch import nn

        weighted = {name for name, layer in job.compressed.module.named_modules()
                    if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd))}
        kept = weighted - {key.rpartition(".")[0] for key in quantized}
    else:
        # nodes the plan keeps float get int8 weights too (weight-only, see the module notes)
        kept = set(weight_consumers(fp32_graph(job))) - set(quantized)
    if quantized and kept:
        job.notes.append(f"{len(kept)} Conv/Linear layers the plan keeps in float are int8 here "
                         "too: the quantizer takes every operator it supports")


@register
class OnnxInt8Exporter(OnnxExporter):
    name = "onnx-int8"
    description = ("ONNX int8: static QDQ (calibrated), dynamic for MatMul, or a mix, "
                   "whichever is smallest and not slower than fp32")
    exact = False

    def write(self, job: ExportJob, path: Path) -> None:
        from engine.methods.static_int8 import quantize_int8_best

        if job.calibration is None:
            raise SlimscopeError("static int8 needs calibration data: give --calibration or "
                                 "--data (or choose --format onnx-dynamic)")
        if isinstance(job.calibration, SyntheticData):
            job.notes.append("static int8 was calibrated on synthetic inputs; give --calibration "
                             "with real samples for activation ranges that fit real data")
        _plan_mismatch_notes(job)
        method = (job.compressed.activation_quant or {}).get("calibration", "minmax")
        batches = [inputs for inputs, _ in
                   job.calibration.head(DEFAULT_CALIBRATION_SAMPLES).batches(CALIBRATION_BATCH)]
        keep_float = keep_float_nodes(job)
        per_channel = plan_per_channel(job)
        if keep_float:
            with quiet_onnxruntime_logs():
                quantized = quantize_static_keeping_float(
                    fp32_graph(job), batches, keep_float, method=method,
                    per_channel=per_channel, weights_int8=keep_float,
                    progress=job.progress, cancel=job.cancel)
            job.notes.append(f"static int8 (QDQ, {'per-channel' if per_channel else 'per-tensor'}"
                             f" weights) with {len(keep_float)} nodes kept float as the plan "
                             "says (their weights int8, weight-only)")
        else:
            with quiet_onnxruntime_logs():
                quantized, report = quantize_int8_best(
                    fp32_graph(job), batches, method=method, per_channel=per_channel,
                    progress=job.progress, cancel=job.cancel)
            for candidate in report.candidates:  # the chosen one says if none was as fast
                mark = "chosen" if candidate.chosen else "not chosen"
                job.notes.append(f"int8 {candidate.name} {mark}: {candidate.reason}")
        save_checked(float_biases(quantized), path, keep_names=keeps_names(job))


@register
class OnnxDynamicExporter(OnnxExporter):
    name = "onnx-dynamic"
    description = "ONNX dynamic int8 for MatMul/Gemm (no calibration); Conv stays fp32"
    exact = False

    def write(self, job: ExportJob, path: Path) -> None:
        fp32 = fp32_graph(job)
        if any(node.op_type in ("Conv", "ConvTranspose") for node in fp32.graph.node):
            job.notes.append("Conv layers stay fp32 in dynamic int8: ONNX Runtime's ConvInteger "
                             "runs several times slower than fp32 on CPU; use onnx-int8 for "
                             "them")
        keep_float = keep_float_nodes(job)
        with quiet_onnxruntime_logs():
            quantized = quantize_dynamic_keeping_float(fp32, keep_float)
        if keep_float:
            job.notes.append(f"{len(keep_float)} nodes kept float as the plan says")
        save_checked(quantized, path, keep_names=keeps_names(job))


def quantize_dynamic_keeping_float(model: onnx.ModelProto,
                                   keep_float: Sequence[str] = ()) -> onnx.ModelProto:
    """engine.methods.static_int8.quantize_dynamic_int8 (MatMul only) with the nodes named in
    `keep_float` left in float; a Gemm rewritten as MatMul keeps its exclusion."""
    from onnxruntime.quantization import quantize_dynamic

    from engine.methods.static_int8 import DYNAMIC_OPS, _with_temp_output

    prepared = onnx_tools.gemm_to_matmul(onnx_tools.constants_to_initializers(model))
    # gemm_to_matmul names the MatMul it makes "<gemm name>_MatMul"
    excluded = [*keep_float, *(f"{name}_MatMul" for name in keep_float)]
    quantized = _with_temp_output(lambda output: quantize_dynamic(
        prepared, output, op_types_to_quantize=list(DYNAMIC_OPS), per_channel=False,
        nodes_to_exclude=excluded))
    onnx_tools.validate(quantized)
    return quantized

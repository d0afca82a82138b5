"""ONNX int8, runnable in ONNX Runtime: static QDQ (calibrated), weight-only or dynamic, chosen
by measurement.

``onnx-int8`` hands the fp32 graph to engine.methods.static_int8.quantize_int8_best, which
builds static QDQ, weight-only int8 (codes decoded when ONNX Runtime loads the file, float
activations), dynamic-for-MatMul and a mix, and keeps the smallest that matches fp32 and is
not slower than it: ORT's dynamic int8 makes conv nets several times slower on CPU
(ConvInteger), and static QDQ makes small conv nets slower too (PP-OCR's classifier: 1.3-1.7x),
so a file that is merely smaller is not good enough. Weights a candidate leaves float
(embedding tables, weights inside If / Loop / Scan bodies) are stored int8 in every candidate.
``onnx-dynamic`` is dynamic int8 for MatMul/Gemm only (no calibration); Conv stays fp32 on
purpose. The choice and every candidate's size and latency go into the export notes.

The plan is honoured graph-level, so the same code serves a torch-exported graph and a user's
own ONNX graph: ``activation_quant.keep_float`` names ONNX nodes that stay float (ORT's
``nodes_to_exclude``; the candidates are then static QDQ with those nodes excluded and
weight-only, which keeps every activation float, since the dynamic candidates would quantize
them again), and weight codes are per-channel when the plan's codes are per-channel or
group-wise, per-tensor when all of them are per-tensor.

A node kept float keeps float *activations*; its weight is stored as int8 codes read through a
DequantizeLinear all the same (weight-only int8, :func:`weight_only_int8`), as every other
weight here is int8 whatever the plan says (see the note of _plan_mismatch_notes). Keeping a
few nodes float then costs size almost nothing: on the PP-OCRv4 recogniser 0.28x of the fp32
file instead of 0.55x. There it also measured better: the same 301 nodes kept float with their
9 Conv weights in fp32 gave word accuracy 0.875, with int8 weights 0.963 (fp32 0.971); why
float weights lose there is not understood yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import onnx

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
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress
from engine.methods.static_int8 import (
    quantize_dynamic_int8,
    quantize_int8_best,
    quantize_static_int8,
    weight_only_int8,
    weights_int8_everywhere,
)


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
    """Static int8 QDQ with the nodes named in `keep_float` left in float; those of them also
    named in `weights_int8` read int8 weights (see quantize_static_int8's `nodes_to_exclude`).
    Every other float weight the quantizer did not reach (inside If / Loop / Scan bodies,
    embedding tables) is stored int8 weight-only too, as the module notes say.
    """
    quantized = quantize_static_int8(
        fp32_model, calibration_batches, method=method, per_channel=per_channel,
        nodes_to_exclude=keep_float, excluded_weights_int8=False,
        progress=progress, cancel=cancel)
    kept = set(keep_float)
    quantized, _ = weight_only_int8(quantized, [name for name in weights_int8 if name in kept],
                                    per_channel=per_channel)
    quantized, _ = weights_int8_everywhere(
        quantized, per_channel=per_channel,
        # nodes kept float with float weights keep them
        skip=_weights_read_by(quantized, kept - set(weights_int8)))
    onnx_tools.validate(quantized)
    return quantized


def _weights_read_by(model: onnx.ModelProto, nodes: set[str]) -> set[str]:
    return {name for node in model.graph.node if node.name in nodes for name in node.input}


def _plan_mismatch_notes(job: ExportJob) -> None:
    """Where int8 for every operator differs from what the plan asked for, layer by layer."""
    quantized = job.compressed.quantized
    low = sorted({q.bits for q in quantized.values() if q.bits < 8})
    if low:
        job.notes.append(f"weights the plan put in {'/'.join(map(str, low))} bits are stored in "
                         "8 bits: ONNX Runtime's int8 kernels take 8-bit codes; onnx-w4 stores "
                         "MatMul weights in 4 bits, .slim stores every code packed")
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
    description = ("ONNX int8: static QDQ (calibrated), int8 weights only, dynamic for MatMul, "
                   "or a mix, whichever is smallest and not slower than fp32")
    exact = False

    def write(self, job: ExportJob, path: Path) -> None:
        if job.calibration is None:
            raise SlimscopeError("static int8 needs calibration data: give --calibration or "
                                 "--data (or choose --format onnx-dynamic)")
        if isinstance(job.calibration, SyntheticData):
            job.notes.append("static int8 was calibrated on synthetic inputs; give --calibration "
                             "with real samples for activation ranges that fit real data")
        _plan_mismatch_notes(job)
        method = (job.compressed.activation_quant or {}).get("calibration", "minmax")
        smoothing = (job.compressed.activation_quant or {}).get("smoothing")
        batches = [inputs for inputs, _ in
                   job.calibration.head(DEFAULT_CALIBRATION_SAMPLES).batches(CALIBRATION_BATCH)]
        keep_float = keep_float_nodes(job)
        per_channel = plan_per_channel(job)
        with quiet_onnxruntime_logs():
            quantized, report = quantize_int8_best(
                fp32_graph(job), batches, method=method, per_channel=per_channel,
                keep_float=keep_float, smoothing=smoothing, progress=job.progress,
                cancel=job.cancel)
        if smoothing is not None:
            job.notes.append(f"the static int8 candidate was smoothed first (SmoothQuant, alpha "
                             f"{smoothing:g}): activation outliers moved into MatMul/Gemm weights")
        if keep_float:
            job.notes.append(f"{len(keep_float)} nodes keep float activations as the plan says "
                             f"({'per-channel' if per_channel else 'per-tensor'} int8 weights)")
        for candidate in report.candidates:  # the chosen one says if none was as fast
            mark = "chosen" if candidate.chosen else "not chosen"
            job.notes.append(f"int8 {candidate.name} {mark}: {candidate.reason}")
        for failure in report.failed:
            job.notes.append(f"int8 {failure} (could not be built)")
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
    `keep_float` left in float."""
    return quantize_dynamic_int8(model, nodes_to_exclude=keep_float)

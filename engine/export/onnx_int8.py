"""ONNX int8, runnable in ONNX Runtime: static QDQ (calibrated) chosen by measurement, or dynamic.

``onnx-int8`` hands the fp32 graph to :func:`quantize_int8_best`, which builds static QDQ,
dynamic-for-MatMul and a mix, and keeps the smallest that is not slower than fp32: ORT's dynamic
int8 makes conv nets several times slower on CPU (ConvInteger), so a file that is merely
smaller is not good enough. ``onnx-dynamic`` is dynamic int8 for MatMul/Gemm only (no
calibration); Conv stays fp32 on purpose. The choice and every candidate's size and latency
go into the export notes.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from engine.compress import CALIBRATION_BATCH, DEFAULT_CALIBRATION_SAMPLES
from engine.data import SyntheticData
from engine.errors import SlimscopeError
from engine.export.base import ExportJob, register
from engine.export.onnx_common import (
    OnnxExporter,
    float_biases,
    fp32_graph,
    quiet_onnxruntime_logs,
    save_checked,
)


def _plan_mismatch_notes(job: ExportJob) -> None:
    """Where int8 for every operator differs from what the plan asked for, layer by layer."""
    quantized = job.compressed.quantized
    low = sorted({q.bits for q in quantized.values() if q.bits < 8})
    if low:
        job.notes.append(f"weights the plan put in {'/'.join(map(str, low))} bits are stored in "
                         "8 bits: ONNX Runtime has no lower-bit kernel for them (Conv) here; "
                         ".slim stores them packed")
    weighted = {name for name, layer in job.compressed.module.named_modules()
                if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd))}
    kept = weighted - {key.rpartition(".")[0] for key in quantized}
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
        with quiet_onnxruntime_logs():
            quantized, report = quantize_int8_best(fp32_graph(job), batches, method=method,
                                                   progress=job.progress, cancel=job.cancel)
        for candidate in report.candidates:  # the chosen one says if none was as fast as fp32
            mark = "chosen" if candidate.chosen else "not chosen"
            job.notes.append(f"int8 {candidate.name} {mark}: {candidate.reason}")
        save_checked(float_biases(quantized), path)


@register
class OnnxDynamicExporter(OnnxExporter):
    name = "onnx-dynamic"
    description = "ONNX dynamic int8 for MatMul/Gemm (no calibration); Conv stays fp32"
    exact = False

    def write(self, job: ExportJob, path: Path) -> None:
        from engine.methods.static_int8 import quantize_dynamic_int8

        fp32 = fp32_graph(job)
        if any(node.op_type in ("Conv", "ConvTranspose") for node in fp32.graph.node):
            job.notes.append("Conv layers stay fp32 in dynamic int8: ONNX Runtime's ConvInteger "
                             "runs several times slower than fp32 on CPU; use onnx-int8 for "
                             "them")
        with quiet_onnxruntime_logs():
            quantized = quantize_dynamic_int8(fp32)
        save_checked(quantized, path)

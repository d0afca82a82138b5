"""ONNX in fp32: the compressed structure (channels removed, layers factorized) as plain floats.

Structured pruning and low-rank shrink the file because the layers themselves are smaller.
Unstructured zeros and integer codes do not: ONNX Runtime has no CPU kernel for sparse or
low-bit weights without quantized operators, so they are written dense and dequantized, and
the export says so. The .onnx default picks a quantized flavour when the plan has codes.

From a user's ONNX graph this is that graph with the compressed float weights (pruned zeros,
dequantized codes) and its names kept: about the original's size, which the headline says.
"""

from __future__ import annotations

from pathlib import Path

from engine.export.base import TORCH_SOURCE, ExportJob, register
from engine.export.onnx_common import OnnxExporter, fp32_graph, keeps_names, save_checked
from engine.export.torch_files import float_storage_note


@register
class OnnxFp32Exporter(OnnxExporter):
    name = "onnx"
    description = "ONNX fp32 (pruned channels and low-rank factors really removed)"

    def write(self, job: ExportJob, path: Path) -> None:
        if job.source == TORCH_SOURCE:  # other kinds: the headline's size note says it
            float_storage_note(job, "fp32 ONNX", keeps_casts=False)
            if job.compressed.masks:
                job.notes.append("fp32 ONNX stores pruned zeros densely (ONNX Runtime has no "
                                 "sparse CPU kernels); .slim stores only the non-zeros")
        save_checked(fp32_graph(job), path, keep_names=keeps_names(job))

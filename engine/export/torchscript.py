"""TorchScript (.pt via --format torchscript, the .pt default when the architecture changed).

The module is traced on the example batch, so the file carries its own code: it runs wherever
``torch.jit.load`` does, without the model's Python classes and without trusting a pickle.
Tracing records the path the example took; models whose forward branches on data need
``torch.export`` (.pt2) instead. A TorchScript model is saved as it is, with its own compiled
code (control flow included): only its weights changed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from engine.evaluate import Runner, TorchRunner
from engine.export.base import ExportJob, TorchExporter, register, trace
from engine.export.torch_files import float_storage_note


@register
class TorchScriptExporter(TorchExporter):
    name = "torchscript"
    suffixes = (".pt", ".pth")
    description = "TorchScript (graph + weights; runs without the model's Python code)"

    def write(self, job: ExportJob, path: Path) -> None:
        float_storage_note(job, "TorchScript", keeps_casts=False)
        traced = trace(job.compressed.module, job.example_arguments)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # still the format users load
            torch.jit.save(traced, str(path))

    def reload(self, path: Path, job: ExportJob) -> Runner:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return TorchRunner(torch.jit.load(str(path), map_location="cpu"))

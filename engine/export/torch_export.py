"""torch.export programs (.pt2): an ATen graph plus weights, PyTorch's current deployment format.

The batch axis is exported as dynamic (``Dim.AUTO``), so the file takes any batch size; the
example batch has at least two samples because torch.export specializes a size-1 axis. A
module that takes one batch size only (a program exported with a static batch) is re-exported
at that batch: its graph may hold sizes computed from it, so a dynamic batch would not be
honest; the reloaded file is fed that many samples at a time.
Files are written and read through file objects, since torch.export insists on a .pt2 name
and the temporary file beside the destination has another.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.errors import SlimscopeError, one_line
from engine.evaluate import Runner, TorchRunner, fixed_batch_of
from engine.export.base import ExportJob, TorchExporter, eval_mode, register
from engine.export.torch_files import float_storage_note


@register
class TorchExportExporter(TorchExporter):
    name = "pt2"
    suffixes = (".pt2",)
    description = "torch.export program (.pt2)"

    def write(self, job: ExportJob, path: Path) -> None:
        float_storage_note(job, ".pt2", keeps_casts=False)
        module = job.compressed.module
        try:
            with eval_mode(module):
                program = torch.export.export(module, job.example_arguments,
                                              dynamic_shapes=job.dynamic_batch_shapes())
        except Exception as error:  # torch.export raises many unrelated types
            raise SlimscopeError(f"torch.export could not capture {type(module).__name__}: "
                                 f"{one_line(error)}") from error
        with path.open("wb") as handle:
            torch.export.save(program, handle)

    def reload(self, path: Path, job: ExportJob) -> Runner:
        with path.open("rb") as handle:
            program = torch.export.load(handle)
        module = program.module()
        return TorchRunner(_Modeless(module), fixed_batch=fixed_batch_of(module))


class _Modeless(nn.Module):
    """Runs an exported program's module, which refuses train()/eval(): it has no modes, its
    graph was captured in eval mode. Held unregistered, so mode changes stop here."""

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "program_module", program_module)

    def forward(self, *args: object) -> torch.Tensor:
        return self.program_module(*args)

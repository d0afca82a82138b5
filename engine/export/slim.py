"""The .slim bundle: the plan's sparse and low-bit weights really stored that way (see
:mod:`engine.bundle` for the layout and the architecture recipes), reloaded by Slimscope itself.
"""

from __future__ import annotations

from pathlib import Path

from engine.bundle import read_bundle, stripped_torchscript, write_bundle, zoo_architecture
from engine.evaluate import Runner, TorchRunner
from engine.export.base import ExportJob, TorchExporter, register, trace


@register
class SlimBundleExporter(TorchExporter):
    name = "slim"
    suffixes = (".slim",)
    description = ("Slimscope bundle: packed low-bit codes, non-zero masks, the plan and the "
                   "architecture (smallest; reloads with Slimscope)")

    def write(self, job: ExportJob, path: Path) -> None:
        arch = zoo_architecture(job.compressed.module, job.model.metadata)
        if arch is not None:
            recipe, graph = {"kind": "zoo", "name": arch}, None
        else:
            recipe = {"kind": "torchscript"}
            # one tensor, or the named inputs in the module's argument order (a text model's
            # input_ids, attention_mask, ...): the trace takes them positionally
            graph = stripped_torchscript(trace(job.compressed.module, job.example_arguments),
                                         stored=set(job.compressed.module.state_dict()))
        job.notes.extend(write_bundle(
            path, job.compressed, architecture=recipe, architecture_bytes=graph,
            inputs=job.model.inputs, outputs=job.model.outputs,
            source={"file": job.model.path.name, "format": job.model.format}))

    def reload(self, path: Path, job: ExportJob) -> Runner:
        return TorchRunner(read_bundle(path).module)


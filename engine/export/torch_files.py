"""PyTorch weight files: a state_dict (.pt) or safetensors when the architecture is unchanged,
else the whole pickled module.

A state_dict is the safe default (loads with ``weights_only=True``); it is only possible when
every tensor keeps its original name and shape. Structured pruning and low-rank change the
architecture: such models go to TorchScript, .pt2 or the pickled module, which the reader must
trust. fp16/bf16 casts are stored in their 16-bit type; integer codes are not, since PyTorch
loads no integer weights into float layers: those formats say so in a note.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.errors import SlimscopeError
from engine.evaluate import Runner, TorchRunner
from engine.export.base import (
    TORCH_SOURCE,
    WEIGHTS_SOURCE,
    ExportJob,
    TorchExporter,
    load_into_copy,
    register,
)
from engine.zoo import ARCH_METADATA_KEY, INPUT_SHAPE_METADATA_KEY


def stored_state_dict(job: ExportJob) -> dict[str, torch.Tensor]:
    """Tensors as stored: fp16/bf16 casts kept in their dtype, everything contiguous."""
    state = {}
    for name, tensor in job.compressed.module.state_dict().items():
        dtype = job.compressed.cast.get(name)
        state[name] = (tensor.to(dtype) if dtype else tensor).detach().contiguous().clone()
    return state


def float_storage_note(job: ExportJob, format_name: str, keeps_casts: bool) -> None:
    """Say where the plan's low-bit weights are written as floats, so nobody takes the file
    for smaller than it is."""
    compressed = job.compressed
    bits = sorted({q.bits for q in compressed.quantized.values()})
    if bits:
        job.notes.append(f"{format_name} stores the {len(compressed.quantized)} quantized "
                         f"weights ({'/'.join(map(str, bits))}-bit codes) as floats; write .slim "
                         "(or .onnx) to store the codes themselves")
    if compressed.cast and not keeps_casts:
        job.notes.append(f"{format_name} stores the {len(compressed.cast)} fp16/bf16 tensors "
                         "as float32; write .safetensors, a state_dict .pt or .slim to keep "
                         "them in 16 bits")


def _architecture_metadata(job: ExportJob) -> dict[str, str]:
    """The zoo architecture name and input shape, so Slimscope reloads the file as runnable."""
    return {k: v for k, v in job.model.metadata.items()
            if k in (ARCH_METADATA_KEY, INPUT_SHAPE_METADATA_KEY)}


class _WeightsOnly(TorchExporter):
    """Shared by state_dict and safetensors: same tensors, same reload into the architecture."""

    def check(self, job: ExportJob) -> None:
        if not job.architecture_unchanged():
            raise SlimscopeError(f"{self.name} holds weights only, and this plan changes the "
                                 "architecture (structured pruning or low-rank); write "
                                 ".pt (TorchScript), .pt2, .onnx or .slim instead")



@register
class StateDictExporter(_WeightsOnly):
    name = "state-dict"
    suffixes = (".pt", ".pth")
    description = "PyTorch state_dict (weights only; loads with weights_only=True)"

    def write(self, job: ExportJob, path: Path) -> None:
        float_storage_note(job, "a state_dict", keeps_casts=True)
        state: dict[str, object] = dict(stored_state_dict(job))
        arch = job.model.metadata.get(ARCH_METADATA_KEY)
        if arch:  # read back by engine.formats: the file reopens as a runnable model
            state[ARCH_METADATA_KEY] = arch
        torch.save(state, path)

    def reload(self, path: Path, job: ExportJob) -> Runner:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        return TorchRunner(load_into_copy(job.original, tensors))


def backend_floats(job: ExportJob) -> dict[str, torch.Tensor]:
    """A weights-only model's compressed tensors as stored: casts in their 16-bit dtype."""
    backend = job.compressed.backend
    assert backend is not None
    state = {}
    for key in job.model.tensors.unique_keys():
        value = torch.from_numpy(np.array(backend.read(key)))  # a writable copy
        state[key] = value.to(job.compressed.cast.get(key, value.dtype)).contiguous()
    return state


@register
class SafetensorsExporter(_WeightsOnly):
    """From a torch module, or from a weights-only model (read back and compared exactly)."""

    name = "safetensors"
    suffixes = (".safetensors",)
    description = "safetensors (weights only, no code; safe to open)"
    sources = frozenset({TORCH_SOURCE, WEIGHTS_SOURCE})

    def write(self, job: ExportJob, path: Path) -> None:
        from safetensors.torch import save_file

        if job.source == WEIGHTS_SOURCE:
            metadata = {str(k): str(v) for k, v in job.model.metadata.items()}
            save_file(backend_floats(job), str(path), metadata=metadata or None)
            return
        float_storage_note(job, "safetensors", keeps_casts=True)
        save_file(stored_state_dict(job), str(path),
                  metadata=_architecture_metadata(job) or None)

    def reload(self, path: Path, job: ExportJob) -> Runner:
        from safetensors.torch import load_file

        return TorchRunner(load_into_copy(job.original, load_file(str(path))))

    def rebuilt_tensors(self, path: Path, job: ExportJob) -> dict[str, np.ndarray]:
        from safetensors.torch import load_file

        return {key: value.to(torch.float32).numpy() if value.dtype == torch.bfloat16
                else value.numpy() for key, value in load_file(str(path)).items()}

    def latency(self, path: Path, job: ExportJob) -> tuple[float, float, str] | None:
        return None if job.source == WEIGHTS_SOURCE else super().latency(path, job)

    def baseline_bytes(self, job: ExportJob) -> tuple[int, str]:
        if job.source == WEIGHTS_SOURCE:
            return job.model.file_bytes, "the original file"
        return super().baseline_bytes(job)


@register
class PickledModuleExporter(TorchExporter):
    name = "torch-module"
    suffixes = (".pt", ".pth")
    description = "whole pickled PyTorch module (any architecture; loading runs its code)"

    def write(self, job: ExportJob, path: Path) -> None:
        float_storage_note(job, "a pickled module", keeps_casts=False)
        job.notes.append("a pickled module loads only with weights_only=False (Slimscope: "
                         "--trust), and only where its class can be imported")
        torch.save(job.compressed.module, path)

    def reload(self, path: Path, job: ExportJob) -> Runner:
        return TorchRunner(torch.load(path, map_location="cpu", weights_only=False))

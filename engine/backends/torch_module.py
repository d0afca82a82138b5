"""Torch modules: a live ``nn.Module``, a TorchScript module, or a torch.export program's module.

All three run through :class:`~engine.evaluate.TorchRunner` and keep their weights as named
parameters and buffers, so reading and replacing weights is one code path. They differ in what
surgery they allow: only a plain ``nn.Module`` can have its channels pruned by torch-pruning or
be traced by torch.fx; a TorchScript module is compiled code, and a torch.export module is a
graph specialised to the shapes it was exported with.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from engine.backends.base import (
    FX_TRACE,
    GRADIENTS,
    GRAPH_SURGERY,
    LOW_RANK,
    ONNX_EXPORT,
    RUN,
    TORCH_MODULE,
    TRAIN,
    Backend,
    check_replacement,
)
from engine.errors import SlimscopeError

if TYPE_CHECKING:
    from engine.evaluate import Runner


class TorchModuleBackend(Backend):
    """A plain ``nn.Module`` (a trusted pickle, a known architecture, a .slim bundle)."""

    name: ClassVar[str] = "torch"
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {RUN, GRADIENTS, TRAIN, GRAPH_SURGERY, LOW_RANK, FX_TRACE, ONNX_EXPORT, TORCH_MODULE})

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def _tensors(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict(keep_vars=True)

    def read(self, key: str) -> np.ndarray:
        from engine.formats._torch_common import tensor_to_numpy

        try:
            return tensor_to_numpy(self._tensors()[key])
        except KeyError:
            raise SlimscopeError(f"the model has no tensor named {key!r}") from None

    def with_weights(self, replacements: Mapping[str, np.ndarray]) -> TorchModuleBackend:
        module = self._copy()
        state = module.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, value in replacements.items():
                if key not in state:
                    raise SlimscopeError(f"the model has no tensor named {key!r}")
                target = state[key]
                check_replacement(key, value, tuple(target.shape))
                target.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype))
        return self._like(module)

    def _like(self, module: nn.Module) -> TorchModuleBackend:
        return type(self)(module)

    def _copy(self) -> nn.Module:
        return copy.deepcopy(self.module)

    def runner(self, threads: int | None = None) -> "Runner":
        from engine.evaluate import TorchRunner

        return TorchRunner(self.module, threads)

    def save(self, path: Path) -> None:
        torch.save(self.module.state_dict(), str(path))


class TorchScriptBackend(TorchModuleBackend):
    """A TorchScript module: runs, trains where autograd reaches, but takes no surgery."""

    name: ClassVar[str] = "torchscript"
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {RUN, GRADIENTS, TRAIN, ONNX_EXPORT, TORCH_MODULE})
    reasons: ClassVar[Mapping[str, str]] = {
        GRAPH_SURGERY: "a TorchScript file is compiled code whose layer shapes cannot be changed; "
                       "structured pruning needs the model's Python module (a .pt with --trust)",
        LOW_RANK: "a TorchScript module's layers cannot be replaced by factorized ones; "
                  "open the Python module or an ONNX export instead",
        FX_TRACE: "TorchScript cannot be traced by torch.fx (the exact sweep runs whole-model "
                  "passes instead)",
    }

    def _copy(self) -> nn.Module:
        buffer = io.BytesIO()
        torch.jit.save(self.module, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer, map_location="cpu")

    def save(self, path: Path) -> None:
        torch.jit.save(self.module, str(path))


class ExportedProgramBackend(TorchModuleBackend):
    """The module of a torch.export program: a graph specialised to its exported input shapes."""

    name: ClassVar[str] = "torch.export"
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {RUN, GRADIENTS, FX_TRACE, ONNX_EXPORT, TORCH_MODULE})
    reasons: ClassVar[Mapping[str, str]] = {
        GRAPH_SURGERY: "a torch.export graph is specialised to its layer shapes; structured "
                       "pruning needs the model's Python module (a .pt with --trust)",
        LOW_RANK: "a torch.export graph's layers cannot be replaced by factorized ones; "
                  "open the Python module or an ONNX export instead",
        TRAIN: "a torch.export program was exported for inference; fine-tuning needs the "
               "model's Python module (a .pt with --trust)",
    }

    def __init__(self, module: nn.Module, program: "torch.export.ExportedProgram | None" = None,
                 static_batch: int | None = None) -> None:
        super().__init__(module)
        self.program = program
        #: The batch size the program was exported for when it is fixed (None: dynamic).
        self.static_batch = static_batch
        if static_batch:
            from engine.evaluate import FIXED_BATCH_ATTRIBUTE

            setattr(module, FIXED_BATCH_ATTRIBUTE, static_batch)

    def _like(self, module: nn.Module) -> ExportedProgramBackend:
        return ExportedProgramBackend(module, None, self.static_batch)

    def save(self, path: Path) -> None:
        if self.program is None:
            raise SlimscopeError("this torch.export model has changed weights; export it "
                                 "through an exporter, which re-exports the module")
        torch.export.save(self.program, str(path))

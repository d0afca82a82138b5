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
    BIAS_CORRECTION,
    LAYER_STATISTICS,
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


#: Why GPTQ, OBS and bias correction cannot run on a compiled module.
_NO_HOOKS = ("GPTQ, OBS and bias correction read each layer's inputs through forward hooks on "
             "the layer modules, which {what} does not have; open the Python module (a .pt with "
             "--trust) or an ONNX export (GPTQ and OBS)")

class TorchModuleBackend(Backend):
    """A plain ``nn.Module`` (a trusted pickle, a known architecture, a .slim bundle)."""

    name: ClassVar[str] = "torch"
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {RUN, GRADIENTS, TRAIN, GRAPH_SURGERY, LOW_RANK, FX_TRACE, ONNX_EXPORT, TORCH_MODULE,
         LAYER_STATISTICS, BIAS_CORRECTION})

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
        LAYER_STATISTICS: _NO_HOOKS.format(what="a TorchScript module"),
        BIAS_CORRECTION: _NO_HOOKS.format(what="a TorchScript module"),
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
        LAYER_STATISTICS: _NO_HOOKS.format(what="a torch.export graph"),
        BIAS_CORRECTION: _NO_HOOKS.format(what="a torch.export graph"),
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


# -- torch.export graphs for the TorchScript-based ONNX exporter ------------------------------------
def _lstm_cell(x: torch.Tensor, hx: list[torch.Tensor], w_ih: torch.Tensor, w_hh: torch.Tensor,
               b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten.lstm_cell`` with the gates split at sizes known from the weight (i, f, g, o)."""
    h, c = hx
    gates = _gates(x, w_ih, b_ih) + _gates(h, w_hh, b_hh)
    i, f, g, o = torch.split(gates, int(w_hh.shape[1]), dim=1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_next), c_next


def _gru_cell(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
              b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None) -> torch.Tensor:
    """``aten.gru_cell`` with static gate sizes (r, z, n)."""
    hidden = int(w_hh.shape[1])
    x_r, x_z, x_n = torch.split(_gates(x, w_ih, b_ih), hidden, dim=1)
    h_r, h_z, h_n = torch.split(_gates(h, w_hh, b_hh), hidden, dim=1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def _rnn_tanh_cell(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                   b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None
                   ) -> torch.Tensor:
    return torch.tanh(_gates(x, w_ih, b_ih) + _gates(h, w_hh, b_hh))


def _rnn_relu_cell(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                   b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None
                   ) -> torch.Tensor:
    return torch.relu(_gates(x, w_ih, b_ih) + _gates(h, w_hh, b_hh))


def _gates(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


#: Recurrent-cell operators a torch.export graph keeps whole, and their static-split forms. The
#: TorchScript-based ONNX exporter expands the cells with ``unsafe_chunk``, which it cannot
#: export when the traced gate size is unknown ("unknown dimension size"); splitting at the
#: weight's hidden size gives a plain ONNX Split.
_CELL_REWRITES = {"lstm_cell": _lstm_cell, "gru_cell": _gru_cell,
                  "rnn_tanh_cell": _rnn_tanh_cell, "rnn_relu_cell": _rnn_relu_cell}


def onnx_traceable(module: nn.Module) -> nn.Module:
    """`module`, or a copy of a torch.export graph module whose recurrent cells are written out
    with static gate splits (see :data:`_CELL_REWRITES`); same weights, same results.

    Other modules (eager, TorchScript) come back unchanged: their cells reach the exporter as
    module calls it knows. A wrapper holding the graph as its only child (the exporters'
    mode-less wrapper) is rewritten around a rewritten copy."""
    children = list(module.children())
    graph_module = module if isinstance(module, torch.fx.GraphModule) else \
        (children[0] if len(children) == 1 and isinstance(children[0], torch.fx.GraphModule)
         else None)
    if graph_module is None or not any(_cell_of(node) for node in graph_module.graph.nodes):
        return module
    rewritten = copy.deepcopy(graph_module)
    for node in rewritten.graph.nodes:
        replacement = _cell_of(node)
        if replacement is not None:
            node.target = replacement
    rewritten.recompile()
    if graph_module is module:
        return rewritten
    wrapper = copy.copy(module)  # shallow: shares everything but the swapped child
    wrapper._modules = dict(module._modules)
    wrapper._modules[next(iter(module._modules))] = rewritten
    return wrapper


def _cell_of(node: torch.fx.Node) -> object | None:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    return _CELL_REWRITES.get(target.overloadpacket.__name__)

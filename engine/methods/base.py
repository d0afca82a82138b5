"""The one small interface every compression technique implements, and the registry of them.

A :class:`Method` changes a working copy of a module in place for the layers a resolved plan
gives it, and records what it did in a :class:`~engine.compressed.CompressedModel`. Methods run
in :data:`STAGES` order; :mod:`engine.methods.apply` orchestrates them.

Unstructured pruning splits further, as torch's ``nn.utils.prune`` does with ``compute_mask``:
a :class:`PruningMethod` only *scores* elements and *selects* which to keep; zeroing and
recording the masks is shared here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Optional

import torch
from torch import nn

from engine.compressed import CompressedModel
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress
from engine.plan import LayerPlan

#: Order in which techniques run: surgery that changes shapes first, value rounding last.
STAGES = ("structured", "low_rank", "prune", "quantize")

#: One calibration batch: model inputs and labels (None when the data has no labels).
Batch = tuple[Any, Optional[torch.Tensor]]


@dataclass
class Context:
    """What a method may need beyond the module and its layers' plans."""

    calibration: Iterable[Batch] | None = None
    #: Inputs to trace the model with (structured pruning); a tensor or a tuple of positional args.
    example_inputs: Any = None
    progress: Progress = no_progress
    cancel: CancelToken = NEVER_CANCELLED


class Method(ABC):
    """A compression technique; one instance lives in :data:`REGISTRY` under `name`."""

    name: ClassVar[str]
    stage: ClassVar[str]
    #: Needs `Context.calibration` batches (to compute gradients).
    needs_calibration: ClassVar[bool] = False
    #: Needs `Context.example_inputs` (to trace the graph).
    needs_example_inputs: ClassVar[bool] = False

    @abstractmethod
    def apply(
        self,
        module: nn.Module,
        layers: Mapping[str, LayerPlan],
        result: CompressedModel,
        context: Context,
    ) -> None:
        """Change `module` in place for the named layers and record what was done in `result`."""


class PruningMethod(Method):
    """Unstructured or semi-structured pruning: score, select, then zero and record masks."""

    stage = "prune"

    def prepare(self, module: nn.Module, names: list[str], context: Context) -> dict[str, torch.Tensor] | None:
        """Per-layer data the scores need beyond the weight (gradients); None by default."""
        return None

    @abstractmethod
    def score(self, weight: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """Importance of every weight element, same shape as `weight`; low scores go first."""

    def select(self, scores: Mapping[str, torch.Tensor], layers: Mapping[str, LayerPlan]) -> dict[str, torch.Tensor]:
        """Boolean keep-masks; by default each layer loses exactly its own `amount`."""
        return {name: keep_top(s, layers[name].pruning.amount) for name, s in scores.items()}

    def apply(self, module: nn.Module, layers: Mapping[str, LayerPlan], result: CompressedModel, context: Context) -> None:
        names = list(layers)
        extra = self.prepare(module, names, context)
        weights = {name: weight_of(module, name) for name in names}
        scores = {name: self.score(w.detach(), extra[name] if extra else None) for name, w in weights.items()}
        masks = self.select(scores, layers)
        with torch.no_grad():
            for name, mask in masks.items():
                weights[name].mul_(mask)
                key = f"{name}.weight"
                previous = result.masks.get(key)
                result.masks[key] = mask if previous is None else (mask & previous)
        context.progress(1.0, f"{self.name}: pruned {len(masks)} layers")


def keep_top(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """Mask keeping all but exactly ``round(amount * numel)`` lowest-scoring elements.

    Ranking (not a threshold) makes the count exact even when scores tie.
    """
    flat = scores.reshape(-1)
    n_prune = int(round(amount * flat.numel()))
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    if n_prune:
        order = torch.argsort(flat, stable=True)
        mask[order[:n_prune]] = False
    return mask.reshape(scores.shape)


def submodule(module: nn.Module, name: str) -> nn.Module:
    """``module.get_submodule(name)``, which TorchScript modules refuse; attribute lookup works
    for both, so methods reach a TorchScript model's layers the same way."""
    target = module
    for part in name.split(".") if name else ():
        target = getattr(target, part, None)
        if not isinstance(target, nn.Module):
            raise AttributeError(f"the model has no layer named {name!r}")
    return target


def own_tensor(layer: nn.Module, attribute: str) -> torch.Tensor | None:
    """The parameter `layer` holds directly under `attribute`, or None.

    Eager modules hold ``nn.Parameter`` objects; a TorchScript module hands out its parameters
    as plain tensors and has no ``_parameters.get``, so ``named_parameters`` is the one way
    that works for both. Editing the tensor in place edits the module.
    """
    for name, tensor in layer.named_parameters(recurse=False):
        if name == attribute:
            return tensor
    return None


#: Attribute a loader sets on a layer whose class no longer says what it was (torch.export's
#: holders are plain modules; the kind comes from the operators that read the weight).
KIND_ATTRIBUTE = "_slimscope_kind"


def layer_kind(layer: nn.Module) -> str:
    """The class name a user wrote: TorchScript keeps it as `original_name`, a torch.export
    program's loader records it (KIND_ATTRIBUTE)."""
    recorded = getattr(layer, KIND_ATTRIBUTE, None)
    if isinstance(recorded, str):
        return recorded
    if isinstance(layer, torch.jit.ScriptModule):
        return str(layer.original_name)
    return type(layer).__name__


def weight_of(module: nn.Module, layer_name: str) -> torch.Tensor:
    """The `weight` parameter of the named sub-module (a plain tensor in TorchScript)."""
    weight = own_tensor(submodule(module, layer_name), "weight")
    if weight is None:
        raise TypeError(f"layer {layer_name!r} has no weight parameter")
    return weight


#: plan method name -> the one instance that carries it out. Filled by `register` as each
#: method module is imported; importing :mod:`engine.methods` imports them all.
REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding one instance of `cls` to :data:`REGISTRY` under ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    if cls.stage not in STAGES:
        raise ValueError(f"method {cls.name!r} has unknown stage {cls.stage!r}")
    REGISTRY[cls.name] = cls()
    return cls

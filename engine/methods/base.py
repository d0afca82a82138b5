"""The one small interface every compression technique implements, and the registry of them.

A :class:`Method` changes a working copy of a module in place for the layers a resolved plan
gives it, and records what it did in a :class:`~engine.compressed.CompressedModel`. Methods run
in :data:`STAGES` order; :mod:`engine.methods.apply` orchestrates them.

Unstructured pruning splits further, as torch's ``nn.utils.prune`` does with ``compute_mask``:
a :class:`PruningMethod` only *scores* elements and *selects* which to keep; zeroing and
recording the masks is shared here.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Optional

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
                key = weight_key(name)
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
    for both, so methods reach a TorchScript model's layers the same way.

    A recurrent weight's layer name ends in the parameter (``rnn.weight_ih_l0``): it comes back
    as a :class:`RecurrentView` holding that weight and its bias, so methods that look for
    ``weight`` / ``bias`` on a layer handle it like any other."""
    parent_name, _, last = name.rpartition(".")
    if is_recurrent_weight(last):
        owner = submodule(module, parent_name)
        weight = own_tensor(owner, last)
        if weight is not None:
            return RecurrentView(owner, last, weight)
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


# -- recurrent weights as layers ----------------------------------------------------------------
#: torch's recurrent parameter names: ``weight_ih_l0``, ``weight_hh_l1_reverse`` (LSTM/GRU/RNN)
#: and ``weight_ih`` / ``weight_hh`` (their Cell forms). Each is a layer of its own, named by
#: its parameter path, as the ONNX adapter makes W and R of an LSTM node two layers
#: (``<node>.weight_ih``, ``<node>.weight_hh``).
_RECURRENT_WEIGHT = re.compile(r"weight_(ih|hh)(_l\d+)?(_reverse)?")
#: Layer kinds of recurrent weights, shared with the ONNX adapter's LSTM/GRU/RNN nodes.
RECURRENT_KINDS = frozenset({"LSTM", "GRU", "RNN"})
#: Gates per hidden unit: the rows of ``weight_hh`` over its columns tell the cell apart where
#: the class name is lost (torch.export's parameter holders are plain modules).
_KIND_BY_GATES = {4: "LSTM", 3: "GRU", 1: "RNN"}


def is_recurrent_weight(attribute: str) -> bool:
    """Whether a parameter name is a recurrent weight (a layer of its own)."""
    return _RECURRENT_WEIGHT.fullmatch(attribute) is not None


def weight_key(layer_name: str) -> str:
    """The parameter key of a layer's weight: ``<layer>.weight``, or the layer name itself for
    a recurrent weight (``rnn.weight_ih_l0``). Keys of masks and codes follow it."""
    return layer_name if is_recurrent_weight(layer_name.rpartition(".")[2]) \
        else f"{layer_name}.weight"


def parameter_key(layer_name: str, attribute: str) -> str:
    """The key of a layer's `attribute` ("weight" or "bias"); a recurrent weight's bias is the
    parameter of the same gate set (``bias_ih_l0`` for ``weight_ih_l0``)."""
    parent, _, last = layer_name.rpartition(".")
    if not is_recurrent_weight(last):
        return f"{layer_name}.{attribute}"
    if attribute == "weight":
        return layer_name
    own = last.replace("weight", attribute, 1)
    return f"{parent}.{own}" if parent else own


def recurrent_kind(owner: nn.Module) -> str | None:
    """"LSTM", "GRU" or "RNN" for a module holding recurrent weights, else None."""
    name = layer_kind(owner).removesuffix("Cell")
    if name in RECURRENT_KINDS:
        return name
    hidden = next((t for n, t in owner.named_parameters(recurse=False)
                   if n.startswith("weight_hh")), None)
    if hidden is None or hidden.dim() != 2 or hidden.shape[1] == 0 \
            or hidden.shape[0] % hidden.shape[1]:
        return None
    return _KIND_BY_GATES.get(hidden.shape[0] // hidden.shape[1])


def recurrent_weights(module: nn.Module, prefix: str = ""
                      ) -> Iterator[tuple[str, str, str | None]]:
    """(layer name, kind, bias key or None) of every recurrent weight `module` holds directly;
    names are prefixed with `prefix` (the module's path)."""
    own = dict(module.named_parameters(recurse=False))
    recurrent = [name for name in own if is_recurrent_weight(name)]
    if not recurrent:
        return
    kind = recurrent_kind(module)
    if kind is None:
        return
    dot = f"{prefix}." if prefix else ""
    for name in recurrent:
        bias = name.replace("weight", "bias", 1)
        yield f"{dot}{name}", kind, (f"{dot}{bias}" if bias in own else None)


_RECURRENT_BIAS = re.compile(r"bias_(ih|hh)(_l\d+)?(_reverse)?")


def recurrent_layer_of(parameter: str) -> str | None:
    """The layer a recurrent parameter belongs to (``rnn.bias_ih_l0`` -> ``rnn.weight_ih_l0``),
    or None for any other parameter, whose layer is its module path."""
    parent, _, last = parameter.rpartition(".")
    if is_recurrent_weight(last):
        return parameter
    if _RECURRENT_BIAS.fullmatch(last):
        own = last.replace("bias", "weight", 1)
        return f"{parent}.{own}" if parent else own
    return None


def is_weight_key(key: str) -> bool:
    """Whether a parameter key names a layer's weight (``*.weight`` or a recurrent weight)."""
    return key.endswith("weight") or is_recurrent_weight(key.rpartition(".")[2])


class RecurrentView(nn.Module):
    """One recurrent weight (and its bias) of a recurrent module, seen as a layer.

    It holds the module's own tensors (not copies), so a method that edits ``weight`` in place
    edits the model; TorchScript hands out plain tensors, hence the direct registration."""

    def __init__(self, owner: nn.Module, attribute: str, weight: torch.Tensor) -> None:
        super().__init__()
        self._parameters["weight"] = weight  # type: ignore[assignment]
        bias = own_tensor(owner, attribute.replace("weight", "bias", 1))
        if bias is not None:
            self._parameters["bias"] = bias  # type: ignore[assignment]
        setattr(self, KIND_ATTRIBUTE, recurrent_kind(owner) or "RNN")


def refuse_recurrent(method: str, names: Iterable[str], kinds: Mapping[str, str] | None = None
                     ) -> None:
    """One PlanError line when a method that needs a layer's row/column structure (channel
    pruning, N:M groups) is planned for a recurrent weight, whose rows are gate blocks."""
    from engine.errors import PlanError
    from engine.formats.guard import quote

    for name in names:
        kind = (kinds or {}).get(name)
        if is_recurrent_weight(name.rpartition(".")[2]) or kind in RECURRENT_KINDS:
            raise PlanError(f"layer {quote(name)}: {method} cannot act on a recurrent "
                            f"({kind or 'LSTM/GRU/RNN'}) weight, whose rows are stacked gates; "
                            "use magnitude pruning or quantization for it")


def weight_of(module: nn.Module, layer_name: str) -> torch.Tensor:
    """The `weight` parameter of the named sub-module (a plain tensor in TorchScript)."""
    weight = own_tensor(submodule(module, layer_name), "weight")
    if weight is None:
        raise TypeError(f"layer {layer_name!r} has no weight parameter")
    return weight


@dataclass(frozen=True)
class WeightLayer:
    """One weight layer of a torch module as plan resolution and the loaders see it."""

    name: str
    kind: str
    weight_key: str
    bias_key: str | None
    weight: torch.Tensor
    #: Path of the sub-module that owns the weight ("" for the root).
    owner: str
    #: A recurrent weight (one of several in its module), not the module's own ``weight``.
    recurrent: bool = False


def weight_layers(module: nn.Module) -> list[WeightLayer]:
    """Every weight layer of `module`, in module order: each sub-module that owns a ``weight``
    parameter, and each recurrent weight (``rnn.weight_ih_l0``) of LSTM/GRU/RNN modules and
    cells. The one listing the loaders, plan resolution and sensitivity share, so a layer the
    inspector shows is one the methods can reach."""
    found: list[WeightLayer] = []
    for name, layer in module.named_modules():
        dot = f"{name}." if name else ""
        weight = own_tensor(layer, "weight")
        if weight is not None:
            bias = f"{dot}bias" if own_tensor(layer, "bias") is not None else None
            found.append(WeightLayer(name or "weight", layer_kind(layer), f"{dot}weight", bias,
                                     weight, name))
        for layer_name, kind, bias in recurrent_weights(layer, name):
            recurrent = own_tensor(layer, layer_name.rpartition(".")[2])
            assert recurrent is not None  # recurrent_weights lists the layer's own parameters
            found.append(WeightLayer(layer_name, kind, layer_name, bias, recurrent, name, True))
    return found


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

"""A plan applied to a model without a torch module (ONNX graph, weights only), tensor by tensor.

Magnitude (per layer and global), N:M, uniform 2..8-bit codes and fp16/bf16 casts need nothing
but the weight, so they run on any backend. The weights are read through the backend, turned
into torch tensors, and handed to the very same registered methods the torch path runs
(:mod:`engine.methods`): each planned weight sits in a small stand-in module under an alias
(``t0``, ``t1``, ...), so layer names of any spelling are safe and no maths is written twice.
The result is a new backend copy (``Backend.with_weights``): masks applied, codes dequantized,
casts rounded; the original backend is never changed.

Methods that need more than the weight ask the backend first, before any work, and refuse in
one line naming the layer: gradient and Taylor pruning need gradients, structured pruning graph
surgery, low-rank a backend that can factorize (see :class:`Factorizing`), recovery training.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from engine.backends.base import GRADIENTS, GRAPH_SURGERY, LOW_RANK, TRAIN, Backend
from engine.compressed import CompressedModel, QuantizedWeight
from engine.errors import PlanError, SlimscopeError
from engine.formats.guard import quote
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress, sub_progress
from engine.methods import REGISTRY, STAGES, Context
from engine.methods.apply import method_names
from engine.methods.base import RECURRENT_KINDS
from engine.plan import LayerPlan, LowRank, Plan

if TYPE_CHECKING:
    from engine.model import Layer, Model

#: Registered methods that work on a weight alone, so on every backend.
WEIGHT_ONLY_METHODS = frozenset({"magnitude", "magnitude-global", "nm", "uniform", "cast"})
#: Pruning method -> the capability it needs beyond the weight, and what it is called.
_PRUNING_NEEDS = {"gradient": (GRADIENTS, "gradient pruning"),
                  "taylor": (GRADIENTS, "Taylor pruning"),
                  "structured": (GRAPH_SURGERY, "structured pruning")}


@runtime_checkable
class Factorizing(Protocol):
    """A backend that can replace layers by two thinner ones (truncated SVD by graph rewrite).

    `settings` maps weight keys to their low-rank section; the answer is the rewritten copy and,
    per weight key actually factorized, the rank and the keys of the factors' weights (first,
    second). A weight left whole (the rank would not pay) is simply absent.
    """

    def factorize(self, settings: Mapping[str, LowRank]
                  ) -> tuple[Backend, dict[str, tuple[int, tuple[str, ...]]]]: ...


class _Holder(nn.Module):
    """One planned weight (and its bias, for casts) where the registered methods look for it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None


def check_tensor_plan(model: "Model", plan: Plan, resolved: Mapping[str, LayerPlan]) -> None:
    """Refuse, in one line naming the layer, any planned method this model's backend cannot do.

    Runs before any work, so a plan that cannot finish does not spend minutes first.
    """
    if plan.recovery and not model.can(TRAIN):
        raise SlimscopeError(f"the plan's recovery section cannot run on {model.path.name}: "
                             f"{model.why_not(TRAIN)}")
    for name, layer_plan in resolved.items():
        pruning = layer_plan.pruning
        if pruning is not None and pruning.method in _PRUNING_NEEDS:
            capability, what = _PRUNING_NEEDS[pruning.method]
            if not model.can(capability):
                raise SlimscopeError(f"layer {quote(name)}: {what} is not available for "
                                     f"{model.path.name}: {model.why_not(capability)}")
            raise SlimscopeError(f"layer {quote(name)}: {what} on a {model.backend.name} model "
                                 "is not built yet; open a PyTorch module of the same model")
        if layer_plan.low_rank is not None:
            if not model.can(LOW_RANK):
                raise SlimscopeError(f"layer {quote(name)}: low-rank factorization is not "
                                     f"available for {model.path.name}: {model.why_not(LOW_RANK)}")
            if not isinstance(model.backend, Factorizing):
                raise SlimscopeError(f"layer {quote(name)}: low-rank factorization of a "
                                     f"{model.backend.name} model is not built yet")
            why_not_factorize = getattr(model.backend, "why_not_factorize", None)
            problem = why_not_factorize(model.layer(name).weight_key) if why_not_factorize else None
            if problem:
                raise SlimscopeError(f"layer {quote(name)}: {problem}")
            if layer_plan.pruning is not None or layer_plan.quantization is not None:
                raise PlanError(f"layer {quote(name)}: low-rank together with pruning or "
                                f"quantization is not built yet for {model.backend.name} models; "
                                "plan one of them for this layer")


def apply_tensor_plan(
    model: "Model",
    plan: Plan,
    *,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> tuple[CompressedModel, dict[str, tuple[str, ...]]]:
    """Compress a copy of `model`'s weights as `plan` says; see the module docstring.

    Also answers, per weight key a backend factorized, the keys of the factors' weights.
    """
    assert model.backend is not None
    resolved = plan.resolve(model.layers)
    check_tensor_plan(model, plan, resolved)
    owners = _weight_owners(model, resolved)
    result = CompressedModel(
        module=None,
        plan=plan.to_dict(),
        activation_quant=plan.activation_quant.to_dict() if plan.activation_quant else None,
    )
    backend = model.backend
    low_rank = {layer.weight_key: layer_plan.low_rank for layer, layer_plan in owners
                if layer_plan.low_rank is not None}
    factors: dict[str, tuple[str, ...]] = {}
    if low_rank:
        progress(0.0, f"low-rank: {len(low_rank)} layers")
        assert isinstance(backend, Factorizing)
        backend, factorized = backend.factorize(low_rank)
        for layer, _ in owners:
            if layer.weight_key in factorized:
                result.low_rank[layer.name], factors[layer.weight_key] = factorized[layer.weight_key]
            elif layer.weight_key in low_rank:
                result.notes.append(f"{layer.name}: the requested rank would not reduce "
                                    "parameters; layer kept whole")
    work = [(layer, layer_plan) for layer, layer_plan in owners
            if any(m in WEIGHT_ONLY_METHODS for m in method_names(layer_plan))]
    if work:
        replacements = _run_methods(model, work, result, sub_progress(progress, 0.1, 0.95),
                                    cancel)
        backend = backend.with_weights(replacements)
    result.backend = backend
    progress(1.0, "compression done")
    return result, factors


def _weight_owners(model: "Model", resolved: Mapping[str, LayerPlan]
                   ) -> list[tuple["Layer", LayerPlan]]:
    """One (layer, plan) per stored weight; layers that share a weight must share its plan."""
    first: dict[str, tuple["Layer", LayerPlan]] = {}
    for layer in model.layers:
        layer_plan = resolved[layer.name]
        owner = first.get(layer.weight_key)
        if owner is None:
            first[layer.weight_key] = (layer, layer_plan)
        elif owner[1] != layer_plan:
            raise PlanError(f"layer {quote(layer.name)} shares its weight with "
                            f"{quote(owner[0].name)} but the plan treats them differently; "
                            "give both the same settings")
    return [(layer, layer_plan) for layer, layer_plan in first.values() if not layer_plan.keep]


def _run_methods(model: "Model", work: list[tuple["Layer", LayerPlan]], result: CompressedModel,
                 progress: Progress, cancel: CancelToken) -> dict[str, np.ndarray]:
    """Run the registered weight-only methods on stand-ins; the replaced tensors by key."""
    assert model.backend is not None
    holder = nn.Module()
    alias_of: dict[str, "Layer"] = {}
    stored_shapes: dict[str, tuple[int, ...]] = {}
    by_method: dict[str, dict[str, LayerPlan]] = defaultdict(dict)
    for i, (layer, layer_plan) in enumerate(work):
        cancel.check()
        alias = f"t{i}"
        casts = layer_plan.quantization is not None and layer_plan.quantization.is_float
        stored = _float_tensor(model, layer, layer.weight_key)
        stored_shapes[alias] = tuple(stored.shape)
        weight = output_rows(layer.kind, stored)
        bias = _float_tensor(model, layer, layer.bias_key) if casts and layer.bias_key else None
        holder.add_module(alias, _Holder(weight, bias))
        alias_of[alias] = layer
        for method_name in method_names(layer_plan):
            by_method[method_name][alias] = layer_plan
    scratch = CompressedModel(module=holder)
    order = sorted(by_method, key=lambda m: STAGES.index(REGISTRY[m].stage))
    for i, method_name in enumerate(order):
        cancel.check()
        stage = sub_progress(progress, i / len(order), (i + 1) / len(order))
        stage(0.0, f"{method_name}: {len(by_method[method_name])} layers")
        with torch.no_grad():
            REGISTRY[method_name].apply(holder, by_method[method_name], scratch,
                                        Context(None, None, stage, cancel))
    replacements: dict[str, np.ndarray] = {}
    for alias, layer in alias_of.items():
        part = holder.get_submodule(alias)
        keys = {"weight": layer.weight_key, "bias": layer.bias_key}
        for param_name, key in keys.items():
            scratch_key = f"{alias}.{param_name}"
            if key is None:
                continue
            value = getattr(part, param_name)
            if value is None:
                continue
            # the weight back in its stored shape (see output_rows); a bias never changed shape
            shape = stored_shapes[alias] if param_name == "weight" else tuple(value.shape)
            if scratch_key in scratch.masks:
                result.masks[key] = scratch.masks[scratch_key].reshape(shape)
            if scratch_key in scratch.quantized:
                result.quantized[key] = stored_layout(scratch.quantized[scratch_key], shape)
            if scratch_key in scratch.cast:
                result.cast[key] = scratch.cast[scratch_key]
            if param_name == "weight" or scratch_key in scratch.cast:
                replacements[key] = value.detach().numpy().reshape(shape)
    result.notes.extend(_rename(note, alias_of) for note in scratch.notes)
    return replacements


def output_rows(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """`weight` with its output rows on axis 0, where the compression methods look for them
    (per-channel scales, group rows): an ONNX recurrent weight ``[D, 4H, in]`` becomes
    ``[D*4H, in]``, one row per gate unit and direction, as torch's ``weight_ih_l0`` and the
    ``[4H, in]`` a graph unsqueezes first already are. Everything else is returned as it is."""
    if kind in RECURRENT_KINDS and weight.dim() == 3:
        return weight.reshape(-1, weight.shape[-1])
    return weight


def stored_layout(quantized: QuantizedWeight, shape: Sequence[int]) -> QuantizedWeight:
    """Codes made on :func:`output_rows`' view, back in the stored `shape`: a per-channel scale
    then runs along axis 1 for one direction, and per row of each direction (groups of a whole
    row) for two; group-wise and per-tensor scales only reshape."""
    shape = tuple(shape)
    if tuple(quantized.codes.shape) == shape:
        return quantized
    codes = quantized.codes.reshape(shape)
    if quantized.axis is None or len(shape) != 3:
        group_scales = (shape[0], -1) if quantized.group_size else tuple(quantized.scale.shape)
        return replace(quantized, codes=codes, scale=quantized.scale.reshape(group_scales),
                       zero_point=quantized.zero_point.reshape(group_scales))
    if shape[0] == 1:
        return replace(quantized, codes=codes, axis=1)
    rows = shape[:2]
    return replace(quantized, codes=codes, axis=None, group_size=shape[2],
                   scale=quantized.scale.reshape(rows),
                   zero_point=quantized.zero_point.reshape(rows))


def _float_tensor(model: "Model", layer: "Layer", key: str) -> torch.Tensor:
    """A float32 copy of a stored tensor; integer tensors (already quantized) are refused."""
    assert model.backend is not None
    value = np.asarray(model.backend.read(key))
    if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
        raise SlimscopeError(f"layer {quote(layer.name)}: its weight is stored as "
                             f"{value.dtype.name}, already quantized; plan it as keep")
    return torch.from_numpy(np.array(value, dtype=np.float32))


def _rename(note: str, alias_of: Mapping[str, "Layer"]) -> str:
    alias, sep, rest = note.partition(":")
    layer = alias_of.get(alias)
    return f"{layer.name}{sep}{rest}" if layer is not None and sep else note

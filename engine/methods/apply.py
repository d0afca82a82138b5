"""Apply a plan to a deep copy of a torch module: the orchestration of all methods.

Order: structured → low-rank → unstructured / N:M pruning → quantization. Shape-changing
surgery runs first so later steps see the final layers; quantization runs last so it rounds
the pruned weights (zeros stay exactly zero, see :mod:`engine.methods.quantize`). After
low-rank, a factorized layer's later settings apply to both of its factors ``<layer>.0`` and
``<layer>.1``. The original module is never modified.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from engine.backends.base import GRADIENTS, GRAPH_SURGERY, LOW_RANK

from engine.compressed import CompressedModel
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress, sub_progress
from engine.methods import REGISTRY, STAGES, Context
from engine.errors import PlanError
from engine.methods.base import Batch, layer_kind, own_tensor
from engine.plan import LayerInfo, LayerPlan, Plan


def module_layers(module: nn.Module) -> list[LayerInfo]:
    """Every sub-module that owns a `weight` parameter, as plan resolution sees it (TorchScript
    modules included: their kinds are the original class names)."""
    layers = []
    for name, layer in module.named_modules():
        weight = own_tensor(layer, "weight")
        if weight is not None:
            layers.append(LayerInfo(name, layer_kind(layer), tuple(weight.shape)))
    return layers


def _capabilities_needed(method_name: str) -> tuple[str, ...]:
    """Backend capabilities a method needs beyond reading and writing weights."""
    method = REGISTRY[method_name]
    needed = []
    if method.stage == "structured":
        needed.append(GRAPH_SURGERY)
    if method.stage == "low_rank":
        needed.append(LOW_RANK)
    if method.needs_calibration:
        needed.append(GRADIENTS)
    return tuple(needed)


def plan_refusal(resolved: Mapping[str, LayerPlan], why_not: Callable[[str], str | None]
                 ) -> str | None:
    """One line saying why a resolved plan cannot run where `why_not` answers for capabilities
    (e.g. ``Model.why_not``), or None: checked before any work, so nothing half-runs."""
    users: dict[str, list[str]] = defaultdict(list)
    for name, layer_plan in resolved.items():
        for method_name in method_names(layer_plan):
            users[method_name].append(name)
    for method_name, names in users.items():
        for capability in _capabilities_needed(method_name):
            reason = why_not(capability)
            if reason is not None:
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3
                                                 else "")
                return f"the plan's {method_name} step (layers {shown}) cannot run: {reason}"
    return None


def _module_why_not(module: nn.Module) -> Callable[[str], str | None]:
    """What a bare module allows: TorchScript takes no surgery; eager modules take everything."""
    if isinstance(module, torch.jit.ScriptModule):
        from engine.backends.torch_module import TorchScriptBackend

        return TorchScriptBackend(module).why_not
    return lambda _capability: None


def method_names(layer_plan: LayerPlan) -> list[str]:
    """Registry names of the methods that carry out one layer's plan."""
    names = []
    if layer_plan.pruning is not None:
        names.append(layer_plan.pruning.method)
    if layer_plan.low_rank is not None:
        names.append("svd")
    if layer_plan.quantization is not None:
        names.append("cast" if layer_plan.quantization.is_float else "uniform")
    return names


def apply_plan(
    module: nn.Module,
    plan: Plan,
    *,
    calibration: Iterable[Batch] | None = None,
    example_inputs: Any = None,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> CompressedModel:
    """Compress a deep copy of `module` as `plan` says.

    `calibration` yields ``(inputs, labels or None)`` batches; gradient methods iterate it
    once. `example_inputs` traces the graph for structured pruning; when absent, the first
    calibration batch's inputs are used (so pass a re-iterable such as a list or DataLoader).
    """
    resolved = plan.resolve(module_layers(module))
    refusal = plan_refusal(resolved, _module_why_not(module))
    if refusal is not None:
        raise PlanError(refusal)
    work = copy.deepcopy(module)
    result = CompressedModel(
        module=work,
        plan=plan.to_dict(),
        activation_quant=plan.activation_quant.to_dict() if plan.activation_quant else None,
    )
    by_method: dict[str, dict[str, LayerPlan]] = defaultdict(dict)
    for name, layer_plan in resolved.items():
        for method_name in method_names(layer_plan):
            by_method[method_name][name] = layer_plan
    order = sorted(by_method, key=lambda m: STAGES.index(REGISTRY[m].stage))
    if example_inputs is None and calibration is not None and any(REGISTRY[m].needs_example_inputs for m in order):
        example_inputs = next(iter(calibration))[0]
    for i, method_name in enumerate(order):
        cancel.check()
        method = REGISTRY[method_name]
        layers = _follow_factorized(by_method[method_name], result.low_rank)
        stage_progress = sub_progress(progress, i / len(order), (i + 1) / len(order))
        stage_progress(0.0, f"{method_name}: {len(layers)} layers")
        method.apply(work, layers, result, Context(calibration, example_inputs, stage_progress, cancel))
    for param in work.parameters():
        param.grad = None
    work.train(module.training)
    progress(1.0, "compression done")
    return result


def _follow_factorized(layers: dict[str, LayerPlan], factorized: dict[str, int]) -> dict[str, LayerPlan]:
    """Point settings for a factorized layer at its two factors."""
    out: dict[str, LayerPlan] = {}
    for name, layer_plan in layers.items():
        if name in factorized:
            out[f"{name}.0"] = out[f"{name}.1"] = layer_plan
        else:
            out[name] = layer_plan
    return out

"""Apply a plan to a deep copy of a torch module: the orchestration of all methods.

Order: structured → low-rank → unstructured / N:M pruning → quantization. Shape-changing
surgery runs first so later steps see the final layers; quantization runs last so it rounds
the pruned weights (zeros stay exactly zero, see :mod:`engine.methods.quantize`). After
low-rank, a factorized layer's later settings apply to both of its factors ``<layer>.0`` and
``<layer>.1``. The original module is never modified.

Error-compensating methods (GPTQ, OBS pruning) and bias correction read layer-input statistics
from the calibration batches (:mod:`engine.calibration_stats`); bias correction runs last, on
the layers whose plan asks for it and that pruning or quantization changed, against their
weights as they were before those two stages.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from engine.backends.base import (
    BIAS_CORRECTION, GRADIENTS, GRAPH_SURGERY, LAYER_STATISTICS, LOW_RANK)

from engine.compressed import CompressedModel
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress, sub_progress
from engine.methods import REGISTRY, STAGES, Context
from engine.errors import PlanError
from engine.formats.guard import quote
from engine.methods.base import Batch, weight_layers, weight_of
from engine.methods.bias_correction import correct_biases
from engine.plan import LayerInfo, LayerPlan, Plan


def module_layers(module: nn.Module) -> list[LayerInfo]:
    """Every weight layer, as plan resolution sees it (TorchScript modules included: their kinds
    are the original class names; recurrent weights are layers of their own)."""
    return [LayerInfo(found.name, found.kind, tuple(found.weight.shape))
            for found in weight_layers(module)]


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
    if needs_statistics(method_name):
        needed.append(LAYER_STATISTICS)
    return tuple(needed)


def plan_refusal(resolved: Mapping[str, LayerPlan], why_not: Callable[[str], str | None]
                 ) -> str | None:
    """One line saying why a resolved plan cannot run where `why_not` answers for capabilities
    (e.g. ``Model.why_not``), or None: checked before any work, so nothing half-runs."""
    users: dict[str, list[str]] = defaultdict(list)
    for name, layer_plan in resolved.items():
        for method_name in method_names(layer_plan):
            users[method_name].append(name)
        if layer_plan.bias_correction and not layer_plan.keep:
            users["bias correction"].append(name)
    for method_name, names in users.items():
        needed = ((BIAS_CORRECTION,) if method_name == "bias correction"
                  else _capabilities_needed(method_name))
        for capability in needed:
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
    quantization = layer_plan.quantization
    if quantization is not None:
        names.append("cast" if quantization.is_float
                     else quantization.method if quantization.method in ("gptq", "awq")
                     else "uniform")
    return names


def needs_statistics(method_name: str) -> bool:
    """Whether a registered method reads layer-input statistics of calibration data."""
    return bool(getattr(REGISTRY[method_name], "needs_statistics", False))


def statistics_refusal(resolved: Mapping[str, LayerPlan], module: nn.Module | None,
                       has_calibration: bool) -> str | None:
    """One line saying why the plan's statistics-based steps (GPTQ, OBS, bias correction)
    cannot run, or None: they need calibration data and an eager torch module's hooks."""
    for name, layer_plan in resolved.items():
        steps = [m for m in method_names(layer_plan) if needs_statistics(m)]
        if layer_plan.bias_correction and (layer_plan.pruning is not None
                                           or layer_plan.quantization is not None):
            steps.append("bias correction")
        if not steps:
            continue
        if not has_calibration:
            return (f"layer {quote(name)}: {steps[0]} needs calibration data "
                    "(--data or --calibration)")
        if module is not None and isinstance(module, torch.jit.ScriptModule):
            return (f"layer {quote(name)}: {steps[0]} needs forward hooks on an eager torch "
                    "module, and TorchScript has none; open the model as a state_dict or module")
    return None


def apply_plan(
    module: nn.Module,
    plan: Plan,
    *,
    calibration: Iterable[Batch] | None = None,
    example_inputs: Any = None,
    why_not: Callable[[str], str | None] | None = None,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> CompressedModel:
    """Compress a deep copy of `module` as `plan` says.

    `calibration` yields ``(inputs, labels or None)`` batches; gradient methods iterate it
    once. `example_inputs` traces the graph for structured pruning; when absent, the first
    calibration batch's inputs are used (so pass a re-iterable such as a list or DataLoader).
    `why_not` answers for the model's backend (``Model.why_not``); without it, for what a bare
    module allows.
    """
    resolved = plan.resolve(module_layers(module))
    refusal = plan_refusal(resolved, why_not or _module_why_not(module)) or statistics_refusal(
        resolved, module, calibration is not None)
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
    correcting = [name for name, lp in resolved.items() if lp.bias_correction
                  and (lp.pruning is not None or lp.quantization is not None)]
    steps = len(order) + (1 if correcting else 0)
    references: dict[str, torch.Tensor] | None = None
    for i, method_name in enumerate(order):
        cancel.check()
        method = REGISTRY[method_name]
        if references is None and method.stage in ("prune", "quantize"):
            references = _references(work, correcting, result)
        layers = _follow_factorized(by_method[method_name], result.low_rank)
        stage_progress = sub_progress(progress, i / steps, (i + 1) / steps)
        stage_progress(0.0, f"{method_name}: {len(layers)} layers")
        method.apply(work, layers, result, Context(calibration, example_inputs, stage_progress, cancel))
    if correcting and references:
        cancel.check()
        correct_biases(work, references, result,
                       Context(calibration, example_inputs,
                               sub_progress(progress, len(order) / steps, 1.0), cancel))
    for param in work.parameters():
        param.grad = None
    work.train(module.training)
    progress(1.0, "compression done")
    return result


def _references(work: nn.Module, names: list[str], result: CompressedModel
                ) -> dict[str, torch.Tensor]:
    """Copies of the weights bias correction measures the change against, taken before the
    first pruning or quantization stage. A factorized layer is left out, with a note: its
    error is the two factors' together, which the one-layer correction does not model."""
    references = {}
    for name in names:
        if name in result.low_rank:
            result.notes.append(f"{name}: bias correction of a factorized layer is not built "
                                "yet; skipped")
            continue
        references[name] = weight_of(work, name).detach().clone()
    return references


def _follow_factorized(layers: dict[str, LayerPlan], factorized: dict[str, int]) -> dict[str, LayerPlan]:
    """Point settings for a factorized layer at its two factors."""
    out: dict[str, LayerPlan] = {}
    for name, layer_plan in layers.items():
        if name in factorized:
            out[f"{name}.0"] = out[f"{name}.1"] = layer_plan
        else:
            out[name] = layer_plan
    return out

"""Structured pruning: physically remove output channels and fix every layer that depends on them.

torch-pruning's DependencyGraph finds which layers must change together (BatchNorm after a
conv, the next conv/linear's inputs, both sides of a residual add, the slices of a concat);
its group L2 magnitude scores the channels of a whole group; ``Group.prune`` does the surgery.
Layers whose channels are the model's outputs are skipped with a note, since removing them
would change what the model returns. A layer already narrowed as part of an earlier layer's
group (e.g. the other side of a residual add) is not pruned a second time.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch_pruning as tp
from torch import nn

from engine.compressed import CompressedModel
from engine.errors import PlanError
from engine.methods.base import Context, Method, refuse_recurrent, register
from engine.plan import LayerPlan


def width(layer: nn.Module) -> int | None:
    """Output channels of a conv or linear layer; None for other layers."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.out_channels
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return None


def out_channels(module: nn.Module) -> dict[str, int]:
    """Output channels of every conv and linear layer, by name."""
    return {name: w for name, layer in module.named_modules() if (w := width(layer)) is not None}


def _run(module: nn.Module, inputs: Any) -> Any:
    return module(*inputs) if isinstance(inputs, tuple) else module(inputs)


def _output_shapes(module: nn.Module, inputs: Any) -> list[tuple[int, ...]]:
    with torch.no_grad():
        return [tuple(t.shape) for t in tp.utils.flatten_as_list(_run(module, inputs))]


def output_layers(module: nn.Module, inputs: Any) -> set[nn.Module]:
    """Sub-modules whose output tensor is itself one of the model's outputs."""
    produced: list[tuple[Any, nn.Module]] = []  # holding the tensors keeps their ids unique
    hooks = [
        m.register_forward_hook(lambda m, _i, out: produced.append((out, m)))
        for m in module.modules()
        if m is not module
    ]
    try:
        with torch.no_grad():
            outputs = {id(t) for t in tp.utils.flatten_as_list(_run(module, inputs))}
    finally:
        for hook in hooks:
            hook.remove()
    return {m for out, m in produced if id(out) in outputs}


def _touches_output(group: tp.Group, outputs: set[nn.Module], graph: tp.DependencyGraph) -> bool:
    for dep, _ in group:
        target = dep.target
        if target.type == tp.ops.OPTYPE.OUTPUT:
            return True
        if target.module in outputs and graph.is_out_channel_pruning_fn(dep.handler):
            return True
    return False


@register
class StructuredPruning(Method):
    name = "structured"
    stage = "structured"
    needs_example_inputs = True

    def apply(self, module: nn.Module, layers: Mapping[str, LayerPlan], result: CompressedModel, context: Context) -> None:
        refuse_recurrent("structured pruning", layers)  # channels are stacked gates there
        inputs = context.example_inputs
        if inputs is None:
            first = next(iter(layers))
            raise PlanError(f"layer {first!r}: pruning.method 'structured' needs example inputs to trace the model")
        before = out_channels(module)
        shapes_before = _output_shapes(module, inputs)
        outputs = output_layers(module, inputs)
        with torch.enable_grad():  # tracing follows autograd; callers may be inside no_grad
            graph = tp.DependencyGraph().build_dependency(module, example_inputs=inputs, verbose=False)
        importance = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
        for i, (name, layer_plan) in enumerate(layers.items()):
            context.cancel.check()
            layer = module.get_submodule(name)
            count = width(layer)
            if count != before[name]:
                result.notes.append(f"{name}: already narrowed with a coupled layer; not pruned again")
                continue
            prune_fn = graph.get_pruner_of_module(layer).prune_out_channels
            group = graph.get_pruning_group(layer, prune_fn, list(range(count)))
            if _touches_output(group, outputs, graph):
                result.notes.append(f"{name}: its channels are model outputs; structured pruning skipped")
                continue
            n_prune = min(int(round(layer_plan.pruning.amount * count)), count - 1)
            if n_prune == 0:
                continue
            scores = importance(group)
            doomed = torch.argsort(scores, stable=True)[:n_prune].tolist()
            group = graph.get_pruning_group(layer, prune_fn, doomed)
            if not graph.check_pruning_group(group):
                result.notes.append(f"{name}: pruning would empty a coupled layer; skipped")
                continue
            group.prune()
            context.progress((i + 1) / len(layers), f"structured: {name} {count} -> {count - n_prune}")
        after = out_channels(module)
        result.channels.update({n: (before[n], after[n]) for n in before if after.get(n) != before[n]})
        if _output_shapes(module, inputs) != shapes_before:
            raise PlanError(f"layer {next(iter(layers))!r}: structured pruning changed the model's output shape")

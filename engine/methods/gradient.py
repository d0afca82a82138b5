"""Gradient-importance pruning: |g| and first-order Taylor |w·g| over calibration batches.

Gradients come from cross-entropy on the calibration batches. Batches without labels use the
model's own argmax as the target: KL divergence to the unpruned model would be the natural
alternative, but at the unpruned weights it is at its minimum and its gradient is zero, so it
carries no signal. Per-batch |g| are summed (Σ_b |g_b|), so gradients of opposite sign in
different batches do not cancel; Taylor importance is then |w| · Σ_b |g_b| = Σ_b |w·g_b|.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import PlanError
from engine.methods.base import Context, PruningMethod, register, weight_of


def accumulate_gradients(module: nn.Module, names: list[str], context: Context) -> dict[str, torch.Tensor]:
    """Σ over calibration batches of |∂loss/∂weight| for each named layer.

    Runs in eval mode (no dropout, BatchNorm statistics untouched) and leaves no `.grad` behind.
    """
    if context.calibration is None:
        raise PlanError(
            f"layer {names[0]!r}: pruning.method needs calibration data for gradients, and none was given"
        )
    weights = {name: weight_of(module, name) for name in names}
    totals = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    was_training = module.training
    requires = [(p, p.requires_grad) for p in module.parameters()]
    targets = {id(w) for w in weights.values()}
    module.eval()
    for p in module.parameters():
        p.requires_grad_(id(p) in targets)
    batches = 0
    try:
        with torch.enable_grad():
            for inputs, labels in context.calibration:
                context.cancel.check()
                outputs = module(*inputs) if isinstance(inputs, (tuple, list)) else module(inputs)
                targets = labels if labels is not None else outputs.detach().argmax(dim=1)
                loss = F.cross_entropy(outputs, targets)
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                for name, grad in zip(weights, grads):
                    if grad is not None:
                        totals[name] += grad.abs()
                batches += 1
                context.progress(0.0, f"gradients: batch {batches}")
    finally:
        for p, flag in requires:
            p.requires_grad_(flag)
        module.train(was_training)
    if batches == 0:
        raise PlanError(f"layer {names[0]!r}: the calibration data for gradient pruning is empty")
    return totals


@register
class GradientPruning(PruningMethod):
    """Prunes the weights the loss is least sensitive to: score |g| (summed over batches)."""

    name = "gradient"
    needs_calibration = True

    def prepare(self, module: nn.Module, names: list[str], context: Context) -> dict[str, torch.Tensor]:
        return accumulate_gradients(module, names, context)

    def score(self, weight: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        assert extra is not None
        return extra


@register
class TaylorPruning(GradientPruning):
    """First-order Taylor estimate of the loss change when a weight is zeroed: |w·g|."""

    name = "taylor"

    def score(self, weight: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        assert extra is not None
        return weight.abs() * extra

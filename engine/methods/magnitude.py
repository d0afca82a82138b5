"""Magnitude pruning: the smallest |w| go first, per layer or with one threshold for all."""

from __future__ import annotations

from typing import Mapping

import torch

from engine.methods.base import PruningMethod, keep_top, register
from engine.plan import LayerPlan


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


@register
class MagnitudePruning(PruningMethod):
    """Each layer loses its own `amount` of smallest-magnitude weights."""

    name = "magnitude"

    def score(self, weight: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        return magnitude_scores(weight)


@register
class GlobalMagnitudePruning(MagnitudePruning):
    """All selected layers share one threshold, so layers with small weights lose more.

    The plan guarantees one shared amount; exactly ``round(amount * total)`` weights go.
    """

    name = "magnitude-global"

    def select(self, scores: Mapping[str, torch.Tensor], layers: Mapping[str, LayerPlan]) -> dict[str, torch.Tensor]:
        if not scores:
            return {}
        amount = next(iter(layers.values())).pruning.amount
        names = list(scores)
        flat = torch.cat([scores[name].reshape(-1) for name in names])
        keep = keep_top(flat, amount)
        masks, start = {}, 0
        for name in names:
            size = scores[name].numel()
            masks[name] = keep[start:start + size].reshape(scores[name].shape)
            start += size
        return masks

"""N:M semi-structured sparsity (2:4 by default): at most N non-zeros in every M inputs.

Groups run along the input dimension, the layout sparse tensor cores accelerate: for a Linear
consecutive input features of one output row; for a convolution consecutive input channels at
the same output channel and kernel position (NVIDIA ASP's layout). Within a group the largest
magnitudes are kept.
"""

from __future__ import annotations

from typing import Mapping

import torch

from engine.errors import PlanError
from engine.methods.base import PruningMethod, refuse_recurrent, register
from engine.plan import LayerPlan


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly `n` kept in every group of `m` along dim 1 (input channels)."""
    # move the input dim last: (out, in, *k) -> (out, *k, in)
    moved = scores.movedim(1, -1)
    grouped = moved.reshape(-1, m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(1, grouped.topk(n, dim=1).indices, True)
    return keep.reshape(moved.shape).movedim(-1, 1)


@register
class NMPruning(PruningMethod):
    name = "nm"

    def score(self, weight: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        return weight.abs()

    def select(self, scores: Mapping[str, torch.Tensor], layers: Mapping[str, LayerPlan]) -> dict[str, torch.Tensor]:
        refuse_recurrent("N:M pruning", scores)  # gate blocks have no input-channel groups
        masks = {}
        for name, s in scores.items():
            n, m = layers[name].pruning.nm
            if s.shape[1] % m:  # the plan checked original shapes; surgery may have changed them
                raise PlanError(
                    f"layer {name!r}: pruning.pattern '{n}:{m}': M={m} does not divide its "
                    f"{s.shape[1]} input channels after structured or low-rank changes"
                )
            masks[name] = nm_mask(s, n, m)
        return masks

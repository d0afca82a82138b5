"""Low-rank factorization: a layer becomes two thinner ones by truncated SVD.

``W ≈ U_r S_r V_r^T`` is split evenly, first = S_r^½ V_r^T and second = U_r S_r^½, so both
factors have similar ranges (kinder to later quantization). A Linear becomes
``Sequential(Linear(in, r, bias=False), Linear(r, out))``; a Conv2d (out, in, kh, kw) is
reshaped to out x (in*kh*kw) and becomes a kh x kw conv with r outputs (same stride, padding,
dilation) followed by a 1x1 conv. The replacement is a Sequential, so its layers are named
``<layer>.0`` and ``<layer>.1``. Energy selection keeps the smallest rank whose squared singular
values sum to at least that fraction of the total, rounded up to a multiple of the layer's
quantization group size or N:M group (see :func:`rank_multiple`). A layer is left alone, with a note, when the
two factors would not have fewer parameters.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from engine.compressed import CompressedModel
from engine.methods.base import Context, Method, register
from engine.plan import LayerPlan, LowRank


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2)."""
    power = singular_values.double().pow(2)
    kept = torch.cumsum(power, 0) / power.sum()
    # a tiny tolerance so energy=1.0 does not demand more than the float sum can give
    return min(int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1, len(power))


def rank_multiple(layer_plan: LayerPlan) -> int:
    """What an energy-chosen rank is rounded up to, so the second factor's input dimension
    still splits into the quantization groups and N:M groups the same plan asks for."""
    multiple = 1
    quant = layer_plan.quantization
    if quant is not None and quant.granularity == "group" and not quant.is_float:
        multiple = math.lcm(multiple, quant.group_size)
    if layer_plan.pruning is not None and layer_plan.pruning.is_nm:
        multiple = math.lcm(multiple, layer_plan.pruning.nm[1])
    return multiple


def svd_factors(matrix: torch.Tensor, setting: LowRank, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(first r x in, second out x r) with second @ first the best rank-r approximation.

    An energy-chosen rank is rounded up to a multiple of `multiple` (capped at full rank).
    """
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    if setting.rank is not None:
        rank = setting.rank
    else:
        rank = -(-rank_for_energy(s, setting.energy) // multiple) * multiple
    rank = min(rank, len(s))
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    second = u[:, :rank] * root[None, :]
    return first.to(matrix.dtype), second.to(matrix.dtype)


def factorize(layer: nn.Module, setting: LowRank, multiple: int = 1) -> nn.Sequential | None:
    """The two-layer replacement for a Linear or ungrouped Conv2d, or None if it isn't smaller."""
    weight = layer.weight
    matrix = weight.reshape(weight.shape[0], -1)
    first_w, second_w = svd_factors(matrix, setting, multiple)
    rank = first_w.shape[0]
    if rank * (matrix.shape[0] + matrix.shape[1]) >= matrix.numel():
        return None
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, rank, bias=False)
        second = nn.Linear(rank, layer.out_features, bias=has_bias)
        first_w_shaped, second_w_shaped = first_w, second_w
    else:
        first = nn.Conv2d(
            layer.in_channels, rank, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode,
        )
        second = nn.Conv2d(rank, layer.out_channels, 1, bias=has_bias)
        first_w_shaped = first_w.reshape(rank, *weight.shape[1:])
        second_w_shaped = second_w.reshape(layer.out_channels, rank, 1, 1)
    pair = nn.Sequential(first, second).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        first.weight.copy_(first_w_shaped)
        second.weight.copy_(second_w_shaped)
        if has_bias:
            second.bias.copy_(layer.bias)
    return pair


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)


@register
class SVDLowRank(Method):
    name = "svd"
    stage = "low_rank"

    def apply(self, module: nn.Module, layers: Mapping[str, LayerPlan], result: CompressedModel, context: Context) -> None:
        for i, (name, layer_plan) in enumerate(layers.items()):
            context.cancel.check()
            layer = module.get_submodule(name)
            if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                result.notes.append(f"{name}: grouped convolution; low-rank factorization skipped")
                continue
            pair = factorize(layer, layer_plan.low_rank, rank_multiple(layer_plan))
            if pair is None:
                result.notes.append(f"{name}: the requested rank would not reduce parameters; layer kept whole")
                continue
            _replace(module, name, pair)
            result.low_rank[name] = pair[0].weight.shape[0]
            context.progress((i + 1) / len(layers), f"factorized {name} at rank {result.low_rank[name]}")

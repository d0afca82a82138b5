"""OBS-style pruning with compensation: choose and fix pruned weights with the layer's XᵀX.

Optimal Brain Surgeon (Hassibi & Stork 1993) per layer: with the layer-input Hessian
``H = 2XᵀX``, removing weight ``w_ij`` costs ``w_ij² / [H⁻¹]_jj`` in output error, and the
other weights of row i absorb it by the OBS update ``δw_i = -w_ij / [H⁻¹]_jj · H⁻¹_{j,:}``.
Two solvers, chosen by cost:

* **Exact OBS** (Frantar, Singh & Alistarh, "Optimal Brain Compression", NeurIPS 2022), when
  ``rows · d³`` is at most :data:`EXACT_FLOPS`: each row removes its weights greedily one at a
  time, always the cheapest remaining one, updating every remaining weight and ``H⁻¹``. With
  an amount, every row's removal costs are recorded first and the layer's budget goes to the
  globally cheapest removals (a prefix of each row's sequence).
* **SparseGPT** (Frantar & Alistarh, ICML 2023) for larger layers: columns left to right with
  the upper Cholesky factor of ``H⁻¹`` that GPTQ uses
  (:func:`engine.methods.gptq.inverse_cholesky`), the pruned set chosen per block of
  :data:`BLOCK_SIZE` columns from the already-updated weights ("adaptive mask selection").

Rows are compared in the units the next layer sees: when a BatchNorm takes the layer's output
directly, row c's error is weighted by that BatchNorm's ``|γ_c| / sqrt(var_c + eps)`` (as if it
were folded into the layer). Within a row this changes nothing; across rows it decides which
channels can afford to lose more. (On the demo's first convolution, 9 inputs, this is the
difference between 62% and 99% accuracy at 70% sparsity.)

* Unstructured (`amount`): each block prunes its share of exactly ``round(amount · numel)``
  weights (shares rounded cumulatively, so the layer total is exact), lowest
  ``w² / [Hinv]_jj²`` first (the paper's score on the Cholesky factor).
* N:M (`pattern`): in every group of M consecutive inputs of a row, the M-N lowest-scoring go.
  For a convolution the groups are consecutive input channels at one kernel position, the
  layout of :mod:`engine.methods.nm_sparsity` (and of sparse tensor cores).

Statistics are collected layer by layer in forward order on the model being pruned (see
:func:`engine.calibration_stats.layer_by_layer`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from engine.calibration_stats import InputStats, check_supported, layer_by_layer
from engine.compressed import CompressedModel
from engine.errors import PlanError
from engine.formats.guard import quote
from engine.methods.base import Context, Method, register, weight_key, weight_of
from engine.methods.bias_correction import following_batchnorms
from engine.methods.gptq import inverse_cholesky
from engine.plan import DEFAULT_DAMPING, LayerPlan, Pruning

#: Columns per block: mask selection and lazy updates (the paper's Bs = 128).
BLOCK_SIZE = 128
#: Largest ``rows · d³`` solved by exact OBS (about a second on one core); beyond, SparseGPT.
EXACT_FLOPS = 1e9
#: Memory for the per-row inverse Hessians exact OBS holds at once (float64).
EXACT_BYTES = 64 << 20


def _cumulative_shares(total: int, parts: list[int]) -> list[int]:
    """`total` split in proportion to `parts`, rounded so the shares add up to exactly `total`."""
    whole = sum(parts)
    shares, done, seen = [], 0, 0
    for part in parts:
        seen += part
        upto = int(round(total * seen / whole)) if whole else 0
        shares.append(upto - done)
        done = upto
    return shares


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    n_prune: int | None = None,
    nm: tuple[int, int] | None = None,
    damping: float = DEFAULT_DAMPING,
    block_size: int = BLOCK_SIZE,
    where: str = "the layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(compensated weight, keep-mask) for a 2-D `weight` ``[rows, cols]``.

    Exactly `n_prune` weights go (unstructured), or M-N of every M consecutive columns of each
    row (`nm` = (N, M)). The returned weight is float64 and exactly 0 where the mask is False.
    """
    w = weight.to(torch.float64).clone()
    rows, cols = w.shape
    hinv = inverse_cholesky(hessian, damping, where)
    if nm is not None:
        block_size = max(nm[1], block_size - block_size % nm[1])
    starts = list(range(0, cols, block_size))
    widths = [min(block_size, cols - s) for s in starts]
    shares = _cumulative_shares(n_prune or 0, widths)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for start, width, share in zip(starts, widths, shares):
        stop = start + width
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        hinv_block = hinv[start:stop, start:stop]
        diagonal = torch.diagonal(hinv_block)
        block_keep = torch.ones_like(block, dtype=torch.bool)
        if nm is None and share:
            scores = (block ** 2 / diagonal[None, :] ** 2).reshape(-1)
            lowest = torch.argsort(scores, stable=True)[:share]
            block_keep.view(-1)[lowest] = False
        for i in range(width):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                scores = block[:, i:i + m] ** 2 / diagonal[None, i:i + m] ** 2
                lowest = torch.topk(scores, m - n, dim=1, largest=False).indices
                block_keep[:, i:i + m].scatter_(1, lowest, False)
            column = block[:, i]
            pruned = torch.where(block_keep[:, i], column, torch.zeros_like(column))
            error = (column - pruned) / hinv_block[i, i]
            block[:, i:] -= error[:, None] * hinv_block[i, i:][None, :]
            block[:, i] = pruned  # exactly zero, not zero up to rounding
            errors[:, i] = error
        w[:, start:stop] = block
        keep[:, start:stop] = block_keep
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return w, keep


def _damped_inverse(hessian: torch.Tensor, damping: float, where: str) -> torch.Tensor:
    """``(H + λI)⁻¹`` in float64 (λ as in :func:`engine.methods.gptq.inverse_cholesky`)."""
    upper = inverse_cholesky(hessian, damping, where)  # (H + λI)⁻¹ = Uᵀ U
    return upper.T @ upper


def _greedy_rows(w: torch.Tensor, hinv: torch.Tensor, counts: torch.Tensor,
                 nm: tuple[int, int] | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact OBS on a few rows at once: row r removes `counts[r]` weights, cheapest first
    (within N:M groups that still may lose one). Returns (new rows, keep-mask, removal costs
    in order)."""
    rows, d = w.shape
    w = w.clone()
    inverse = hinv.expand(rows, d, d).clone()
    removed = torch.zeros(rows, d, dtype=torch.bool)
    costs = torch.zeros(rows, int(counts.max()) if rows else 0, dtype=torch.float64)
    index = torch.arange(rows)
    for step in range(costs.shape[1]):
        active = step < counts
        diagonal = torch.diagonal(inverse, dim1=1, dim2=2)
        scores = w ** 2 / diagonal.clamp(min=torch.finfo(torch.float64).tiny)
        blocked = removed
        if nm is not None:
            n, m = nm
            full = removed.reshape(rows, -1, m).sum(-1, keepdim=True) >= m - n
            blocked = removed | full.expand(-1, -1, m).reshape(rows, d)
        scores = scores.masked_fill(blocked, float("inf"))
        q = scores.argmin(1)
        costs[:, step] = scores[index, q]
        # rows already done get a zero coefficient: their update vanishes, in place
        coefficient = active.to(torch.float64) / inverse[index, q, q]
        column = inverse[index, :, q]  # [rows, d]
        w.sub_((w[index, q] * coefficient)[:, None] * column)
        inverse.baddbmm_(column[:, :, None], (column * coefficient[:, None])[:, None, :],
                         alpha=-1.0)
        removed[index[active], q[active]] = True
        w[removed] = 0.0  # exactly, not up to rounding
    return w, ~removed, costs


def exact_obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    n_prune: int | None = None,
    nm: tuple[int, int] | None = None,
    damping: float = DEFAULT_DAMPING,
    where: str = "the layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`obs_prune`, by exact greedy OBS per row (see the module docstring)."""
    w = weight.to(torch.float64)
    rows, d = w.shape
    hinv = _damped_inverse(hessian, damping, where)
    chunk = max(1, EXACT_BYTES // (8 * d * d))
    if nm is not None:
        counts = torch.full((rows,), d // nm[1] * (nm[1] - nm[0]), dtype=torch.long)
    else:
        total = n_prune or 0
        if total == 0:
            return w.clone(), torch.ones(rows, d, dtype=torch.bool)
        costs = torch.cat([_greedy_rows(w[r:r + chunk], hinv,
                                        torch.full((min(chunk, rows - r),), d), None)[2]
                           for r in range(0, rows, chunk)])
        # a row's k-th removal is only available after its first k-1: make costs non-decreasing
        # along the row, then the cheapest `total` are a prefix of every row
        monotone = torch.cummax(costs, dim=1).values.reshape(-1)
        chosen = torch.argsort(monotone, stable=True)[:total]
        counts = torch.bincount(chosen // d, minlength=rows)
    parts = [_greedy_rows(w[r:r + chunk], hinv, counts[r:r + chunk], nm)
             for r in range(0, rows, chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _batchnorm_weights(module: nn.Module, names: list[str], context: Context
                       ) -> dict[str, torch.Tensor]:
    """Per layer whose output goes straight into a BatchNorm, each output channel's gain
    through it (see :func:`batchnorm_gains`)."""
    batches = list(context.calibration or [])
    if not batches:
        return {}
    check_supported(module, names, "OBS pruning")
    return batchnorm_gains(module, names, batches)


def batchnorm_gains(module: nn.Module, names: list[str], batches: list[Any]
                    ) -> dict[str, torch.Tensor]:
    """Per layer whose output goes straight into a BatchNorm, each output channel's gain
    through it, ``|γ| / sqrt(var + eps)`` (float64; floored so no channel divides by zero)."""
    gains = {}
    for name, norm in following_batchnorms(module, names, batches).items():
        gain = 1.0 / torch.sqrt(norm.running_var.to(torch.float64) + norm.eps)
        if norm.weight is not None:
            gain = gain * norm.weight.detach().to(torch.float64).abs()
        if gain.shape[0] == weight_of(module, name).shape[0] and float(gain.max()) > 0:
            gains[name] = gain.clamp(min=1e-6 * float(gain.max()))
    return gains


def _channel_last(in_per_group: int, kernel: int) -> torch.Tensor:
    """Column order putting a conv's input channels innermost: consecutive columns are then
    consecutive channels at one kernel position (N:M groups as nm_sparsity lays them)."""
    return torch.arange(in_per_group * kernel).reshape(in_per_group, kernel).T.reshape(-1)


def prune_layer(weight: torch.Tensor, stats: InputStats, pruning: Pruning,
                row_weight: torch.Tensor | None = None, *, where: str = "the layer"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(compensated weight float64, keep-mask), both in `weight`'s shape, for one Linear/Conv
    weight ``[out, ...]`` with its input statistics: exactly ``round(amount · numel)`` weights
    go (split over conv groups), or the N:M pattern. `row_weight` ``[out]`` weighs each output
    row's error (a following BatchNorm's gain, see :func:`batchnorm_gains`)."""
    out = weight.shape[0]
    nm = pruning.nm if pruning.is_nm else None
    if nm is not None and weight.dim() > 1 and weight.shape[1] % nm[1]:
        raise PlanError(f"{where}: pruning.pattern '{nm[0]}:{nm[1]}': "
                        f"M={nm[1]} does not divide its {weight.shape[1]} input channels "
                        "after structured or low-rank changes")
    flat = weight.detach().reshape(out, -1).to(torch.float64)
    kernel = flat.shape[1] // weight.shape[1]
    order = _channel_last(weight.shape[1], kernel)
    per_group = out // stats.groups
    total = 0 if nm is not None else int(round(float(pruning.amount or 0.0) * flat.numel()))
    shares = _cumulative_shares(total, [per_group] * stats.groups)
    new = torch.empty_like(flat)
    keep = torch.empty(flat.shape, dtype=torch.bool)
    scale = (row_weight if row_weight is not None
             else torch.ones(out, dtype=torch.float64))[:, None]
    inverse = torch.argsort(order)
    for g, share in enumerate(shares):
        rows = slice(g * per_group, (g + 1) * per_group)
        h = stats.hessian(g)[order][:, order]
        solver = exact_obs_prune if per_group * flat.shape[1] ** 3 <= EXACT_FLOPS else obs_prune
        pruned, kept = solver((flat[rows] * scale[rows])[:, order], h, n_prune=share, nm=nm,
                              where=where)
        new[rows] = pruned[:, inverse] / scale[rows]
        keep[rows] = kept[:, inverse]
    return new.reshape(weight.shape), keep.reshape(weight.shape)


@register
class OBSPruning(Method):
    """Per-layer amount or N:M pattern, chosen and compensated with the layer-input Hessian."""

    name = "obs"
    stage = "prune"
    needs_statistics = True

    def apply(self, module: nn.Module, layers: Mapping[str, LayerPlan], result: CompressedModel,
              context: Context) -> None:
        row_weights = _batchnorm_weights(module, list(layers), context)
        for i, (name, stats) in enumerate(layer_by_layer(module, list(layers), context, "OBS pruning")):
            pruning = layers[name].pruning
            assert pruning is not None
            weight = weight_of(module, name)
            new, mask = prune_layer(weight, stats, pruning, row_weights.get(name),
                                    where=f"layer {quote(name)}")
            with torch.no_grad():
                weight.copy_(new.to(weight.dtype) * mask)
            key = weight_key(name)
            previous = result.masks.get(key)
            result.masks[key] = mask if previous is None else (mask & previous)
            context.progress((i + 1) / len(layers), f"OBS: pruned {name}")

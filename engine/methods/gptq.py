"""GPTQ: quantize a layer column by column, compensating each rounding error with the rest.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023). For one layer with weight ``W`` (rows: outputs, columns: inputs)
and input Hessian ``H = 2XᵀX``, quantizing column ``j`` to ``q`` and spreading its error over
the columns not yet quantized by the OBS update

    δW[:, F] = -(w_j - q_j) / [H_F⁻¹]_jj · [H_F⁻¹]_{j, F}

minimises the layer's output error ``‖WX - ŴX‖²`` greedily. The rows of the upper Cholesky
factor of ``H⁻¹`` are exactly those successive ``[H_F⁻¹]_{j,:} / sqrt([H_F⁻¹]_jj)``, so one
factorization serves every column (the paper's Step 3), and updates to columns outside the
current block of `block_size` columns are applied lazily, once per block (Step 2).

Options: `damping` adds ``damping · mean(diag H)`` to the diagonal (numerical stability);
`act_order` handles columns in order of decreasing ``diag H`` (the inputs with the most
energy first). Group-wise scales are fitted when the group's first column is reached (on the
updated weights), except with `act_order`, where groups would no longer be consecutive, so
all group scales are fitted up front ("static groups"); either way they are stored like
round-to-nearest's (:mod:`engine.methods.quantize`), so exports and size reports are unchanged.

The layer's input statistics come from :mod:`engine.calibration_stats`, one layer at a time in
forward order on the model being compressed: each layer is quantized for the inputs the
already-quantized earlier layers really produce, as in the paper.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from engine.calibration_stats import InputStats, layer_by_layer
from engine.compressed import CompressedModel
from engine.errors import PlanError
from engine.formats.guard import quote
from engine.methods.base import Context, Method, register, weight_key, weight_of
from engine.methods.quantize import packed, qparams, unit_ranges
from engine.plan import LayerPlan, Quantization

#: Columns per lazy-update block (the paper's B = 128).
BLOCK_SIZE = 128
#: How many times the damping is multiplied by 10 when H is still not positive definite.
DAMPING_RETRIES = 4


def inverse_cholesky(hessian: torch.Tensor, damping: float, where: str = "the layer"
                     ) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, ``λ = damping · mean(diag H)``, in float64.

    Inputs that never fire (zero diagonal) get ``H_jj = 1``: nothing couples them to the other
    columns, so their weights are simply rounded (or pruned) without compensation.
    """
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    base = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    # With P the order reversal and P(H + λI)P = M Mᵀ (lower Cholesky), (H + λI)⁻¹ = Uᵀ U for
    # U = P M⁻¹ P, upper triangular with a positive diagonal: the factor we want, for one
    # Cholesky and one triangular inverse (instead of Cholesky, inverse and Cholesky again).
    reversed_h = h.flip(0, 1)
    for attempt in range(DAMPING_RETRIES + 1):
        lam = damping * base * (10.0 ** attempt)
        factor, info = torch.linalg.cholesky_ex(reversed_h + lam * eye)
        if int(info) == 0:
            inverse = torch.linalg.solve_triangular(factor, eye, upper=False)
            upper = inverse.flip(0, 1)
            if bool(torch.isfinite(upper).all()):
                return upper
    raise PlanError(f"{where}: its input Hessian is not positive definite even with damping "
                    f"{damping * 10 ** DAMPING_RETRIES:g}; use more calibration data or a larger "
                    "damping")


class _Grid:
    """Scales and zero points per (row, unit); a unit is a row (per-channel / per-tensor) or a
    group of `group_size` consecutive columns."""

    def __init__(self, rows: int, cols: int, bits: int, symmetric: bool, range_method: str,
                 group_size: int | None) -> None:
        self.bits, self.symmetric, self.range_method = bits, symmetric, range_method
        self.group_size = group_size
        units = cols // group_size if group_size else 1
        self.scale = torch.ones(rows, units, dtype=torch.float64)
        self.zero = torch.zeros(rows, units, dtype=torch.float64)
        _, _, self.qmin, self.qmax = qparams(torch.zeros(1, 1), torch.ones(1, 1), bits, symmetric)

    def unit(self, column: int) -> int:
        return column // self.group_size if self.group_size else 0

    def fit(self, unit: int, values: torch.Tensor) -> None:
        """Set one unit's parameters from `values` ``[rows, k]`` (k may be all the columns)."""
        lo, hi = unit_ranges(values, self.bits, self.symmetric, self.range_method)
        scale, zero, _, _ = qparams(lo, hi, self.bits, self.symmetric)
        # the stored scale is float32: quantize with exactly the value stored
        self.scale[:, unit] = scale[:, 0].to(torch.float32).to(torch.float64)
        self.zero[:, unit] = zero[:, 0]

    def codes(self, column: torch.Tensor, unit: int) -> torch.Tensor:
        scale, zero = self.scale[:, unit], self.zero[:, unit]
        return torch.clamp(torch.round(column / scale) + zero, self.qmin, self.qmax)

    def values(self, codes: torch.Tensor, unit: int) -> torch.Tensor:
        return (codes - self.zero[:, unit]) * self.scale[:, unit]


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: _Grid,
    *,
    act_order: bool = False,
    damping: float = 0.01,
    block_size: int = BLOCK_SIZE,
    keep: torch.Tensor | None = None,
    fit_groups: bool = False,
    where: str = "the layer",
) -> torch.Tensor:
    """Integer codes ``[rows, cols]`` (float64) for a 2-D `weight`, GPTQ-compensated.

    `grid` holds fitted parameters, or, with `fit_groups`, gets each group fitted when its
    first column comes up (then columns must go in order: no `act_order`). `keep` (bool, the
    weight's shape) forces pruned weights to the code of exactly 0 and compensates that too.
    """
    w = weight.to(torch.float64).clone()
    rows, cols = w.shape
    h = hessian.to(torch.float64)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order \
        else torch.arange(cols)
    w, h = w[:, order], h[order][:, order]
    keep_ordered = keep[:, order] if keep is not None else None
    hinv = inverse_cholesky(h, damping, where)
    group = grid.group_size or 1
    block_size = max(group, block_size - block_size % group)  # groups never straddle blocks
    codes = torch.zeros_like(w)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = int(order[start + i])
            unit = grid.unit(column)
            if fit_groups and column % group == 0:
                values = block[:, i:i + group]
                if keep_ordered is not None:
                    values = values * keep_ordered[:, start + i:start + i + group]
                grid.fit(unit, values)
            code = grid.codes(block[:, i], unit)
            if keep_ordered is not None:
                code = torch.where(keep_ordered[:, start + i], code, grid.zero[:, unit])
            quantized = grid.values(code, unit)
            error = (block[:, i] - quantized) / hinv_block[i, i]
            block[:, i:] -= error[:, None] * hinv_block[i, i:][None, :]
            errors[:, i] = error
            codes[:, start + i] = code
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return codes[:, torch.argsort(order)]


def quantize_layer(weight: torch.Tensor, stats: InputStats, settings: Quantization, *,
                   mask: torch.Tensor | None = None, block_size: int = BLOCK_SIZE,
                   where: str = "the layer"):
    """GPTQ for a Linear/Conv weight (any shape, flattened to ``[out, d]``), per conv group.

    Returns the :class:`~engine.compressed.QuantizedWeight` in the weight's shape.
    """
    out = weight.shape[0]
    flat = weight.detach().reshape(out, -1).to(torch.float64)
    keep = mask.reshape(out, -1) if mask is not None else None
    kept = flat * keep if keep is not None else flat
    bits, symmetric, granularity = int(settings.bits), settings.symmetric, settings.granularity
    group_size = settings.group_size if granularity == "group" else None
    grid = _Grid(out, flat.shape[1], bits, symmetric, settings.range, group_size)
    fit_groups = group_size is not None and not settings.act_order
    if granularity == "per-tensor":
        whole = _Grid(1, 1, bits, symmetric, settings.range, None)
        whole.fit(0, kept.reshape(1, -1))
        grid.scale[:], grid.zero[:] = whole.scale[0, 0], whole.zero[0, 0]
    elif granularity == "per-channel":
        grid.fit(0, kept)
    elif not fit_groups:  # act-order with groups: fit every group up front
        assert group_size is not None
        for unit in range(flat.shape[1] // group_size):
            grid.fit(unit, kept[:, unit * group_size:(unit + 1) * group_size])
    codes = torch.empty_like(flat)
    per_group = out // stats.groups
    for g in range(stats.groups):
        rows = slice(g * per_group, (g + 1) * per_group)
        sub = _Grid(per_group, flat.shape[1], bits, symmetric, settings.range, group_size)
        sub.scale, sub.zero = grid.scale[rows].clone(), grid.zero[rows].clone()
        codes[rows] = gptq_quantize(
            flat[rows], stats.hessian(g), sub, act_order=settings.act_order,
            damping=settings.damping, block_size=block_size,
            keep=keep[rows] if keep is not None else None, fit_groups=fit_groups, where=where)
        grid.scale[rows], grid.zero[rows] = sub.scale, sub.zero
    if granularity == "per-tensor":
        scale, zero = grid.scale[:1, :1], grid.zero[:1, :1]
    elif granularity == "per-channel":
        scale, zero = grid.scale[:, :1], grid.zero[:, :1]
    else:
        scale, zero = grid.scale, grid.zero
    return packed(codes.reshape(weight.shape), scale, zero, bits, symmetric, granularity,
                  group_size)


@register
class GPTQQuantization(Method):
    """Integer codes like "uniform", with each layer's rounding errors compensated (GPTQ)."""

    name = "gptq"
    stage = "quantize"
    #: Needs layer-input statistics from calibration batches (not gradients).
    needs_statistics = True

    def apply(self, module: nn.Module, layers: Mapping[str, LayerPlan], result: CompressedModel,
              context: Context) -> None:
        for i, (name, stats) in enumerate(layer_by_layer(module, list(layers), context, self.name)):
            settings = layers[name].quantization
            assert settings is not None
            weight = weight_of(module, name)
            key = weight_key(name)
            row = weight[0].numel()
            if settings.granularity == "group" and row % settings.group_size:
                raise PlanError(
                    f"layer {quote(name)}: quantization.group_size {settings.group_size} does not "
                    f"divide its input dimension {row} after structured or low-rank changes")
            q = quantize_layer(weight, stats, settings, mask=result.masks.get(key),
                               where=f"layer {quote(name)}")
            with torch.no_grad():
                weight.copy_(q.dequantize().to(weight.dtype))
            result.quantized[key] = q
            context.progress((i + 1) / len(layers), f"GPTQ: {name} to {settings.bits} bits")

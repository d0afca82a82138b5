"""Weight quantization: uniform integer codes (2..8 bits), or rounding through fp16 / bf16.

Uniform codes, ``w ≈ (code - zero_point) * scale``, one scale per *unit*: the whole tensor,
each output channel (axis 0), or each group of `group_size` consecutive elements of an output
row (the row flattened, so in_channels*kh*kw for a conv).

* Symmetric: codes in [-(2^(b-1)-1), 2^(b-1)-1] (restricted range, so ±max are equally
  representable), zero point 0, int8 container.
* Asymmetric: codes in [0, 2^b-1], uint8 container. The range is widened to include 0, so the
  zero point is an integer code and a zero weight dequantizes to exactly 0 — pruned weights
  stay pruned. Masks are re-applied to the codes anyway (masked codes set to the zero point).
* Range "minmax" uses each unit's extremes; "mse" searches clipping ratios of that range and
  keeps, per unit, the one with the lowest squared error (clipping a few outliers buys finer
  steps for everything else).

The module's weight is set to the dequantized values, so it runs in float and its accuracy is
what the stored codes give.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from engine.compressed import CompressedModel, QuantizedWeight
from engine.errors import PlanError
from engine.methods.base import (Context, Method, own_tensor, parameter_key, register, submodule,
                                 weight_key, weight_of)
from engine.plan import LayerPlan, Quantization

#: Clipping ratios tried by the MSE range search (1.0 = min-max, always included).
MSE_RATIOS = torch.linspace(1.0, 0.05, 96)
FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _units(weight: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """The weight as (units, elements per unit); each row gets one scale and zero point."""
    if granularity == "per-tensor":
        return weight.reshape(1, -1)
    if granularity == "per-channel":
        return weight.reshape(weight.shape[0], -1)
    return weight.reshape(-1, group_size)


def _qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale, zero point and code range for per-unit ranges [lo, hi] (lo <= 0 <= hi)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.maximum(-lo, hi) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale), -qmax, qmax
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero, 0, qmax


def _fake_quant(units: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    scale, zero, qmin, qmax = _qparams(lo, hi, bits, symmetric)
    codes = torch.clamp(torch.round(units / scale) + zero, qmin, qmax)
    return codes, scale, zero, (codes - zero) * scale


def quantize_tensor(
    weight: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    granularity: str = "per-channel",
    group_size: int | None = None,
    range_method: str = "minmax",
) -> QuantizedWeight:
    """Integer codes, scales and zero points for `weight`; see the module docstring."""
    w = weight.detach().to(torch.float32)
    units = _units(w, granularity, group_size)
    lo, hi = unit_ranges(units, bits, symmetric, range_method)
    codes, scale, zero, _ = _fake_quant(units, lo, hi, bits, symmetric)
    return packed(codes.reshape(w.shape), scale, zero, bits, symmetric, granularity, group_size)


def unit_ranges(units: torch.Tensor, bits: int, symmetric: bool, range_method: str = "minmax"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit ranges ``[lo, hi]`` (``[units, 1]`` each, lo <= 0 <= hi) of `units` rows:
    min-max, or the MSE-best clipping of it. GPTQ takes its grid from here too."""
    lo = units.min(dim=1, keepdim=True).values.clamp(max=0)
    hi = units.max(dim=1, keepdim=True).values.clamp(min=0)
    ratio = torch.ones_like(lo)
    if range_method == "mse":
        best = torch.full_like(lo, float("inf"))
        for candidate in MSE_RATIOS.tolist():
            *_, deq = _fake_quant(units, lo * candidate, hi * candidate, bits, symmetric)
            err = (units - deq).pow(2).sum(dim=1, keepdim=True)
            better = err < best
            best = torch.where(better, err, best)
            ratio = torch.where(better, torch.full_like(ratio, candidate), ratio)
    return lo * ratio, hi * ratio


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
            ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale, zero point and code range for per-unit ranges (see the module docstring)."""
    return _qparams(lo, hi, bits, symmetric)


def packed(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
           symmetric: bool, granularity: str, group_size: int | None) -> QuantizedWeight:
    """Codes (float, in the weight's shape) and per-unit scale / zero point as the stored
    :class:`QuantizedWeight`: the one layout every quantizer writes, so exporters and size
    reports read GPTQ's codes exactly like round-to-nearest's."""
    shape = codes.shape
    dtype = torch.int8 if symmetric else torch.uint8
    if granularity == "per-tensor":
        param_shape: tuple[int, ...] = ()
    elif granularity == "per-channel":
        param_shape = (shape[0],)
    else:
        param_shape = (shape[0], -1)
    return QuantizedWeight(
        codes=codes.to(dtype),
        scale=scale.to(torch.float32).reshape(param_shape),
        zero_point=zero.reshape(param_shape).to(dtype),
        bits=bits,
        symmetric=symmetric,
        axis=0 if granularity == "per-channel" else None,
        group_size=group_size if granularity == "group" else None,
    )


def _zero_masked(q: QuantizedWeight, mask: torch.Tensor) -> None:
    """Set masked-out codes to the zero point, so they dequantize to exactly 0."""
    shape = q.codes.shape
    if q.group_size:
        codes = q.codes.reshape(shape[0], -1, q.group_size)
        zero = q.zero_point.reshape(shape[0], -1, 1).expand_as(codes)
        codes[~mask.reshape(codes.shape)] = zero[~mask.reshape(codes.shape)]
    elif q.axis is not None:
        view = [-1] + [1] * (len(shape) - 1)
        zero = q.zero_point.reshape(view).expand(shape)
        q.codes[~mask] = zero[~mask]
    else:
        q.codes[~mask] = q.zero_point


@register
class UniformQuantization(Method):
    name = "uniform"
    stage = "quantize"

    def apply(self, module: nn.Module, layers: Mapping[str, LayerPlan], result: CompressedModel, context: Context) -> None:
        for i, (name, layer_plan) in enumerate(layers.items()):
            context.cancel.check()
            settings: Quantization = layer_plan.quantization
            weight = weight_of(module, name)
            key = weight_key(name)
            row = weight[0].numel()
            if settings.granularity == "group" and row % settings.group_size:
                raise PlanError(  # the plan checked original shapes; surgery may have changed them
                    f"layer {name!r}: quantization.group_size {settings.group_size} does not divide "
                    f"its input dimension {row} after structured or low-rank changes"
                )
            q = quantize_tensor(
                weight, settings.bits, settings.symmetric, settings.granularity,
                settings.group_size, settings.range,
            )
            if key in result.masks:
                _zero_masked(q, result.masks[key])
            with torch.no_grad():
                weight.copy_(q.dequantize().to(weight.dtype))
            result.quantized[key] = q
            context.progress((i + 1) / len(layers), f"quantized {name} to {settings.bits} bits")


@register
class FloatCast(Method):
    """Store weight and bias as fp16/bf16; the module keeps float32 values rounded through it."""

    name = "cast"
    stage = "quantize"

    def apply(self, module: nn.Module, layers: Mapping[str, LayerPlan], result: CompressedModel, context: Context) -> None:
        for name, layer_plan in layers.items():
            dtype = FLOAT_DTYPES[layer_plan.quantization.bits]
            layer = submodule(module, name)
            for param_name in ("weight", "bias"):
                param = own_tensor(layer, param_name)
                if param is not None:
                    with torch.no_grad():
                        param.copy_(param.to(dtype).to(param.dtype))
                    result.cast[parameter_key(name, param_name)] = dtype

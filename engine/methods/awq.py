"""AWQ-style activation-aware scaling for weight-only low-bit quantization.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(MLSys 2024). Weights meeting large activations matter most; scaling input channel ``j`` of
the weight up by ``s_j`` (and its activation down by the same factor, exactly) shrinks their
relative rounding error. AWQ searches ``s = mean|X_j|^a`` over a small grid of ``a`` in
[0, 1] per layer, keeping the ``a`` whose quantized layer ``Q(W·diag(s))·diag(1/s)`` has the
least output error. With the layer-input second moments ``H = XᵀX`` that error is exact,
``err = tr(ΔW H ΔWᵀ)``, so the search needs no second pass over the data. ``a = 0`` (s = 1) is
plain round to nearest, so the chosen scale is never worse than it on the calibration data.

The ONNX graph rewrite that divides the activation by ``s`` (folded into a LayerNormalization
or an inserted Mul) is :func:`engine.methods.smoothquant.scale_inputs`; the ONNX path runs in
:mod:`engine.tensor_compress`. On a torch module, folding ``1/s``
into the LayerNorm or Linear that alone feeds the layer (found on a torch.fx trace) is exact;
any other layer is refused in one line. Each layer's input statistics are collected once, on
the module as given (the folds are exact in float).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from engine.compressed import CompressedModel, QuantizedWeight
from engine.errors import PlanError
from engine.formats.guard import quote
from engine.methods.base import Context, Method, register
from engine.methods.quantize import quantize_tensor
from engine.plan import LayerPlan, Quantization

#: Exponents tried for s = mean|X|^a (AWQ's own grid has 20 steps; 11 measured as good).
DEFAULT_GRID = tuple(i / 10 for i in range(11))
#: Channels whose mean |x| is below this fraction of the largest count as this small.
_FLOOR = 1e-4
#: Scales are kept in this range (a dead channel must not become 0 or inf).
SCALE_LIMITS = (1e-4, 1e4)


def rtn(weight: torch.Tensor, settings: Quantization) -> QuantizedWeight:
    """Round-to-nearest codes of an ``[out, in]`` weight as the plan's settings say."""
    group = settings.group_size if settings.granularity == "group" else None
    return quantize_tensor(weight, int(settings.bits), settings.symmetric, settings.granularity,
                           group, settings.range)


def output_error(change: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)``: the squared output change summed over the calibration rows."""
    change = change.to(torch.float64)
    return float(((change @ hessian.to(torch.float64)) * change).sum())


def scales_for(mean_abs: torch.Tensor, exponent: float) -> torch.Tensor:
    """``mean|X|^a``, normalised so the largest and smallest scale straddle 1 (as AWQ does)."""
    x = mean_abs.to(torch.float64)
    x = torch.clamp(x, min=float(x.max()) * _FLOOR if float(x.max()) > 0 else 1.0)
    s = x ** exponent
    s = s / torch.sqrt(s.max() * s.min())
    return torch.clamp(s, *SCALE_LIMITS)


def search_scales(weights: Sequence[torch.Tensor], hessian: torch.Tensor, mean_abs: torch.Tensor,
                  settings: Quantization, grid: Sequence[float] = DEFAULT_GRID
                  ) -> tuple[torch.Tensor, float, dict[float, float]]:
    """The input-channel scale shared by the ``[out, in]`` `weights` that read one activation
    (a transformer's Q, K and V) with the least summed output error; also that error and the
    error of every exponent tried (``a = 0`` is round to nearest)."""
    errors: dict[float, float] = {}
    best: tuple[float, torch.Tensor] | None = None
    for exponent in grid:
        s = scales_for(mean_abs, exponent)
        error = 0.0
        for weight in weights:
            w = weight.to(torch.float64)
            scaled = (w * s[None, :]).to(torch.float32)
            back = rtn(scaled, settings).dequantize().to(torch.float64) / s[None, :]
            error += output_error(back - w, hessian)
        errors[exponent] = error
        if best is None or error < best[0]:
            best = (error, s)
    assert best is not None, "the grid is empty"
    return best[1], best[0], errors


def _exact_producers(module: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Per AWQ Linear, the LayerNorm or Linear whose output it reads, where dividing that
    layer's output channels by ``s`` is exact: found on a torch.fx trace, both called once, the
    producer read only by AWQ Linears. Any other layer is refused in one line naming it."""
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as exc:  # noqa: BLE001 - fx refuses data-dependent control flow and more
        reason = " ".join(str(exc).split())[:80]
        raise PlanError(f"layer {quote(names[0])}: AWQ on a PyTorch module needs a torch.fx "
                        f"trace to fold its scales exactly, which failed ({reason}); use gptq "
                        "or rtn") from None
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    wanted = set(names)
    producers: dict[str, str] = {}
    for name in names:
        if not isinstance(module.get_submodule(name), nn.Linear):
            raise PlanError(f"layer {quote(name)}: AWQ on a PyTorch module is built for Linear "
                            "layers; plan gptq or rtn for it")
        found = calls.get(name, [])
        source = found[0].args[0] if len(found) == 1 and found[0].args else None
        producer = str(source.target) if isinstance(source, torch.fx.Node) \
            and source.op == "call_module" else ""
        layer = module.get_submodule(producer) if producer else None
        exact = (
            isinstance(layer, (nn.LayerNorm, nn.Linear)) and len(calls[producer]) == 1
            and all(user.op == "call_module" and str(user.target) in wanted
                    for user in source.users)  # type: ignore[union-attr]
            and (not isinstance(layer, nn.LayerNorm)
                 or (layer.elementwise_affine and len(layer.normalized_shape) == 1)))
        if not exact:
            raise PlanError(f"layer {quote(name)}: AWQ folds 1/s into the LayerNorm or Linear "
                            "that alone feeds it, and this layer has none (or it also feeds "
                            "other layers); plan gptq or rtn for it")
        producers[name] = producer
    return producers


@register
class AWQQuantization(Method):
    """Activation-aware scaling + round to nearest. On a torch module the 1/s goes into the
    LayerNorm or Linear that alone feeds the layer; layers sharing one (Q, K and V) share s."""

    name = "awq"
    stage = "quantize"
    needs_statistics = True

    def apply(self, module: nn.Module, layers: Mapping[str, LayerPlan], result: CompressedModel,
              context: Context) -> None:
        from engine.calibration_stats import collect_input_stats

        names = list(layers)
        producers = _exact_producers(module, names)
        if context.calibration is None:
            raise PlanError("AWQ needs calibration data (--data or --calibration)")
        stats = collect_input_stats(module, names, list(context.calibration),
                                    cancel=context.cancel)
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(producers[name], []).append(name)
        # last layers first: a Linear that is both a producer and an AWQ layer takes its
        # consumers' 1/s before its own codes are made
        for i, (producer, members) in enumerate(reversed(list(groups.items()))):
            context.cancel.check()
            settings = layers[members[0]].quantization
            assert settings is not None
            if any(layers[m].quantization != settings for m in members):
                raise PlanError(f"layer {quote(members[-1])} reads the same input as "
                                f"{quote(members[0])} but its AWQ settings differ; give them "
                                "the same quantization")
            if f"{producer}.weight" in result.quantized:
                raise PlanError(f"layer {quote(members[0])}: AWQ would fold its scale into "
                                f"{quote(producer)}, which is already quantized")
            linears = [module.get_submodule(m) for m in members]
            s, _, _ = search_scales([layer.weight.detach() for layer in linears],
                                    stats[members[0]].xtx[0], stats[members[0]].channel_mean_abs,
                                    settings)
            with torch.no_grad():
                source = module.get_submodule(producer)
                view = s.to(source.weight.dtype)
                if isinstance(source, nn.LayerNorm):
                    source.weight.div_(view)
                else:
                    source.weight.div_(view[:, None])
                if source.bias is not None:
                    source.bias.div_(view)
                for name, layer in zip(members, linears):
                    q = rtn((layer.weight.detach().double() * s[None, :]).float(), settings)
                    layer.weight.copy_(q.dequantize().to(layer.weight.dtype))
                    result.quantized[f"{name}.weight"] = q
            context.progress((i + 1) / len(groups), f"AWQ: {', '.join(members)}")

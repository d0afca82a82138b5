"""The predicted size and metric of any plan, read off the sensitivity curves (no Qt).

Under the allocator's additive assumption a plan's predicted drop is the sum, over the swept
layers, of the cost of the option (sparsity level x bit width) each layer gets; its predicted
size is the fixed bytes plus each option's bytes. Both come from
:func:`engine.allocate.layer_options`, so a plan the allocator made lands exactly on the Pareto
front it was chosen from. Settings the curves do not cover (other pruning methods, N:M, float
formats, low rank) are priced as the nearest covered option, or as uncompressed, and the layer is
listed in :attr:`PlanPrediction.approximate` so the GUI can say the number is rough.

This is logic, not presentation: it belongs in ``engine/allocate.py`` as ``predict_plan`` and
lives here only until that function exists (it calls engine functions only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from engine.allocate import Option, layer_options, predicted_metric
from engine.errors import PlanError
from engine.model import Layer
from engine.plan import LayerPlan, Plan
from engine.sensitivity import BASELINE_LEVEL, LayerSensitivity, Sensitivity

#: Pruning methods whose result the magnitude sparsity curve measures.
MAGNITUDE_METHODS = ("magnitude", "magnitude-global")


@dataclass(frozen=True)
class PlanPrediction:
    bytes: int
    ratio: float
    #: Predicted drop of the primary metric (positive = worse), summed over layers.
    drop: float
    metric: float
    #: Layers whose settings the curves price only roughly.
    approximate: list[str] = field(default_factory=list)


def predict_plan(sens: Sensitivity, plan: Plan, layers: Iterable[Layer]) -> PlanPrediction:
    """Predicted size and primary metric of `plan` on the model whose `layers` are given.

    Raises :class:`PlanError` when the plan does not resolve on these layers.
    """
    resolved = plan.resolve(list(layers))
    total_bytes, drop, approximate = sens.fixed_bytes, 0.0, []
    for layer in sens.layers:
        option, exact = _option_for(sens, layer, resolved.get(layer.name))
        total_bytes += option.bytes
        drop += option.cost
        if not exact:
            approximate.append(layer.name)
    return PlanPrediction(total_bytes, total_bytes / sens.model_bytes, drop,
                          predicted_metric(sens, drop), approximate)


def _option_for(sens: Sensitivity, layer: LayerSensitivity, settings: LayerPlan | None
                ) -> tuple[Option, bool]:
    """The option matching a layer's resolved settings, and whether the match is exact."""
    sparsity, bits, exact = BASELINE_LEVEL["sparsity"], None, True
    if settings is not None:
        if settings.low_rank is not None:
            exact = False
        pruning = settings.pruning
        if pruning is not None:
            if pruning.method in MAGNITUDE_METHODS and pruning.amount is not None:
                sparsity = float(pruning.amount)
            else:
                exact = False
                if pruning.method == "nm":
                    kept, group = pruning.nm
                    sparsity = 1.0 - kept / group
                else:
                    sparsity = float(pruning.amount or 0.0)
        quant = settings.quantization
        if quant is not None:
            if quant.is_float:
                exact = False
            else:
                bits = int(quant.bits)
    options = layer_options(sens, layer)
    if not options:
        raise PlanError(f"layer {layer.name!r}: no options in the sensitivity results")
    candidates = [o for o in options if (o.quantized and o.bits == bits) or (bits is None and not o.quantized)]
    if not candidates:  # a bit width the sweep did not measure: the nearest one it did
        exact = False
        measured = sorted({o.bits for o in options if o.quantized}, key=lambda b: abs(b - (bits or 32)))
        candidates = [o for o in options if o.quantized and measured and o.bits == measured[0]] or options
    best = min(candidates, key=lambda o: abs(o.sparsity - sparsity))
    if abs(best.sparsity - sparsity) > 1e-9:
        exact = False
    return best, exact

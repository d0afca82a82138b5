"""From sensitivity curves and a target to a Plan: a multiple-choice knapsack solved exactly.

Every swept layer gets one *option*: a sparsity level from its sparsity curve combined with a
bit width from its bits curve (or its own float format); where the sweep measured a rank curve,
also a truncated-SVD rank combined with a bit width (both factors quantized alike, unpruned). Under the usual additive assumption an
option's predicted cost is the sparsity curve's drop plus the bits curve's drop at those levels,
and a plan's predicted drop is the sum over its layers. Before adding, each curve's drops are
made non-negative and non-decreasing along the axis: a measured *gain* from compressing is noise
on a finite data set, and more compression is assumed no better than less, so noise cannot
buy budget.

An option's bytes follow the counting rule of :func:`engine.compress.tensor_storage_bytes`
(packed codes, or a bitmask plus packed non-zeros when smaller, plus scales), see
:func:`storage_bytes`. The non-zeros left after pruning *and* quantizing are not measured for
every combination: both remove the smallest magnitudes, so there are at most as many as the
fewer of the two alone leave, and the predicted bytes never undercount the file. A rank option's
factors are counted dense at their shapes (SVD factors have no zeros to speak of).

Targets: a size (bytes, or a fraction of the uncompressed model as compress() reports it) —
minimize the predicted drop; or a largest predicted drop — minimize the size. Sizes are
discretized into `resolution` units (each option rounded *up*), and a dynamic program over
layers x units finds the optimum of the discretized problem; its table also gives the whole
Pareto front of predicted size against predicted metric, which the GUI plots.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import numpy as np

from engine.errors import PlanError
from engine.model import Layer
from engine.plan import ActivationQuant, LayerPlan, LowRank, Plan, Sections, row_length
from engine.sensitivity import (
    BASELINE_LEVEL,
    LayerSensitivity,
    Sensitivity,
    level_sections,
    rank_for_fraction,
)
from engine.storage import scale_overhead, storage_bytes

DEFAULT_RESOLUTION = 4096
#: Weight of the secondary metric when the primary one is the cost: accuracy drops are mostly
#: exactly zero (clamped noise) for mild options, so among plans of equal predicted accuracy
#: the one with the lower predicted loss wins. Small enough never to outweigh a real
#: accuracy difference, large enough to stay above float rounding of the cost sums.
TIE_BREAK = 1e-9
#: Relative precision of the smallest size found for a largest-drop target.
SIZE_SEARCH_TOLERANCE = 1e-3
#: Share of a largest-drop target that int8 activations may use. They buy speed, not bytes, so
#: the size knapsack cannot price them; they get a fixed share, and what they leave unused
#: goes to the weights.
ACTIVATION_SHARE = 0.25
#: With a size target (no drop budget), nodes whose int8 activations alone cost more than this
#: (in primary-metric units: half an accuracy point) stay in float.
KEEP_FLOAT_DROP = 0.005


@dataclass(frozen=True)
class Option:
    """One way to store a layer: sparsity, bits (the float format's own bits = unquantized),
    predicted bytes of its weight and predicted cost."""

    sparsity: float
    bits: int
    bytes: int
    cost: float
    quantized: bool = True
    #: The other metric's drop, which decides between options of equal cost (see TIE_BREAK).
    tiebreak: float = 0.0
    #: The SVD rank the layer is factorized to (None: kept whole), from the rank curve.
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "bits": self.bits if self.quantized else None,
                "rank": self.rank, "bytes": self.bytes, "cost": self.cost}


@dataclass(frozen=True)
class FrontPoint:
    """A Pareto-optimal plan's predicted whole-model size and metric."""

    bytes: int
    ratio: float
    drop: float
    metric: float

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "ratio": self.ratio, "drop": self.drop,
                "metric": self.metric}


@dataclass
class Allocation:
    """The chosen plan with its predictions, and the Pareto front it was chosen from."""

    plan: Plan
    choices: dict[str, Option]
    bytes: int
    ratio: float
    drop: float
    metric: float
    cost_metric: str
    #: What the front is computed from, on first use: a search that allocates many times
    #: (engine.plan_check) never needs it, and it costs as much as the allocation itself.
    sensitivity: Sensitivity = field(repr=False, compare=False)
    secondary: bool = False
    resolution: int = DEFAULT_RESOLUTION
    #: Predicted drop from the nodes whose activations go to int8 (included in `drop`).
    activation_drop: float = 0.0

    @functools.cached_property
    def front(self) -> list[FrontPoint]:
        return pareto_front(self.sensitivity, self.secondary, self.resolution)

    def to_dict(self) -> dict[str, Any]:
        return {
            "predicted": {"bytes": self.bytes, "ratio": self.ratio, "drop": self.drop,
                          "metric": self.metric, "cost_metric": self.cost_metric,
                          "activation_drop": self.activation_drop},
            "choices": {name: option.to_dict() for name, option in self.choices.items()},
            "front": [point.to_dict() for point in self.front],
            "plan": self.plan.to_dict(),
        }


# -- options -----------------------------------------------------------------------------------
def _envelope(drops: np.ndarray) -> np.ndarray:
    return np.maximum.accumulate(np.maximum(drops, 0.0))


def _axis_table(sens: Sensitivity, layer: LayerSensitivity, axis: str, other: str,
                secondary: bool) -> tuple[list[float], list[int], list[int], np.ndarray]:
    """(levels, bytes, non-zeros, envelope drops) of one axis; the baseline alone if unswept."""
    if axis in layer.curves:
        curve = layer.curves[axis]
        return (curve.levels, curve.bytes, curve.nonzero,
                _envelope(sens.drops(layer, axis, secondary)))
    base = layer.curves[other]
    return [BASELINE_LEVEL[axis]], base.bytes[:1], base.nonzero[:1], np.zeros(1)


def layer_options(sens: Sensitivity, layer: LayerSensitivity, secondary: bool = False
                  ) -> list[Option]:
    """Every (sparsity, bits) combination of a layer, and (rank, bits) where a rank curve was
    measured, largest first."""
    if "sparsity" not in layer.curves and "bits" not in layer.curves:
        raise PlanError(f"layer {layer.name!r}: no sparsity or bits curve to allocate from")
    s_levels, _, s_nonzero, s_drops = _axis_table(sens, layer, "sparsity", "bits", secondary)
    b_levels, b_bytes, b_nonzero, b_drops = _axis_table(sens, layer, "bits", "sparsity",
                                                        secondary)
    if not secondary and sens.secondary_metric is not None:
        s_ties = _finite_or_zero(_axis_table(sens, layer, "sparsity", "bits", True)[3])
        b_ties = _finite_or_zero(_axis_table(sens, layer, "bits", "sparsity", True)[3])
    else:
        s_ties, b_ties = np.zeros(len(s_levels)), np.zeros(len(b_levels))
    numel = layer.numel
    options = []
    for j, bits_level in enumerate(b_levels):
        quantized = bits_level != BASELINE_LEVEL["bits"]
        bits = int(bits_level) if quantized else layer.float_bits
        overhead = b_bytes[j] - storage_bytes(numel, b_nonzero[j], bits)
        for i, sparsity in enumerate(s_levels):
            nonzero = min(s_nonzero[i], b_nonzero[j])
            options.append(Option(float(sparsity), bits,
                                  storage_bytes(numel, nonzero, bits, overhead),
                                  float(s_drops[i] + b_drops[j]), quantized,
                                  float(s_ties[i] + b_ties[j])))
    if "rank" in layer.curves:
        options += _rank_options(sens, layer, secondary, b_levels, b_drops, b_ties)
    # A level measured as NaN costs infinity (Sensitivity.drops): never chosen, and not counted
    # among the sizes a plan could reach. The baseline always stays.
    usable = [option for option in options if math.isfinite(option.cost)]
    return sorted(usable, key=lambda o: (-o.bytes, o.cost))


def check_max_drop(max_drop: float) -> None:
    """A largest allowed drop is a finite number, not negative (NaN compares false both ways)."""
    if not 0 <= max_drop < math.inf:
        raise PlanError(f"max drop {max_drop} must be a finite number, not negative")


def _unmeasured_levels(sens: Sensitivity, secondary: bool) -> int:
    """Levels no plan may pick because their drop is not a finite number."""
    return sum(int(np.isinf(sens.drops(layer, axis, secondary)).sum())
               for layer in sens.layers for axis in layer.curves)


def _finite_or_zero(ties: np.ndarray) -> np.ndarray:
    """Tie-break costs with unmeasurable levels as no information rather than infinite."""
    return np.where(np.isfinite(ties), ties, 0.0)


def _rank_options(sens: Sensitivity, layer: LayerSensitivity, secondary: bool,
                  b_levels: list[float], b_drops: np.ndarray, b_ties: np.ndarray) -> list[Option]:
    """(rank, bits) options: the rank curve's drop plus the bits curve's, the factors stored
    at those bits. Ranks that would not shrink the layer (the method keeps it whole) and bit
    widths whose groups do not divide a factor's rows are left out."""
    curve = layer.curves["rank"]
    r_drops = _envelope(sens.drops(layer, "rank", secondary))
    r_ties = (_finite_or_zero(_envelope(sens.drops(layer, "rank", True)))
              if not secondary and sens.secondary_metric is not None else np.zeros(len(r_drops)))
    out_channels, row = layer.shape[0], layer.numel // layer.shape[0]
    options = []
    for i, fraction in enumerate(curve.levels[1:], start=1):
        rank = rank_for_fraction(layer.shape, fraction)
        if rank * (out_channels + row) >= layer.numel:
            continue
        factors = [(rank, *layer.shape[1:]), (out_channels, rank)]
        for j, bits_level in enumerate(b_levels):
            quantized = bits_level != BASELINE_LEVEL["bits"]
            if quantized:
                quant = replace(sens.quantization, bits=int(bits_level))
                if quant.granularity == "group" and any(
                        row_length(shape) % int(quant.group_size or 1) for shape in factors):
                    continue  # plan resolution would refuse these groups
                stored = sum(storage_bytes(math.prod(shape), math.prod(shape), int(bits_level),
                                           scale_overhead(quant, shape)) for shape in factors)
            else:
                stored = curve.bytes[i]
            options.append(Option(0.0, int(bits_level) if quantized else layer.float_bits,
                                  stored, float(r_drops[i] + b_drops[j]), quantized,
                                  float(r_ties[i] + b_ties[j]), rank))
    return options


# -- the dynamic program -------------------------------------------------------------------------
class _Knapsack:
    """Min-cost choice of one option per layer with total rounded-up size <= each capacity."""

    def __init__(self, options: list[list[Option]], unit: float, capacity: int) -> None:
        self.options = options
        self.weights = [np.array([math.ceil(o.bytes / unit) for o in opts]) for opts in options]
        best = np.zeros(capacity + 1)
        self.picks = []
        for opts, weights in zip(options, self.weights):
            new = np.full(capacity + 1, np.inf)
            pick = np.full(capacity + 1, -1, dtype=np.int32)
            # options come largest first, and only a strictly lower cost replaces a choice:
            # equal predictions keep the less compressed option
            for k, (option, weight) in enumerate(zip(opts, weights)):
                if weight > capacity:
                    continue
                cost = option.cost + TIE_BREAK * option.tiebreak
                candidate = best[:capacity + 1 - weight] + cost
                better = candidate < new[weight:]
                new[weight:][better] = candidate[better]
                pick[weight:][better] = k
            best = new
            self.picks.append(pick)
        self.best = best

    def choose(self, capacity: int) -> list[Option]:
        chosen = []
        for layer in reversed(range(len(self.options))):
            k = int(self.picks[layer][capacity])
            chosen.append(self.options[layer][k])
            capacity -= int(self.weights[layer][k])
        return chosen[::-1]


def _options(sens: Sensitivity, secondary: bool) -> list[list[Option]]:
    if not sens.layers:
        raise PlanError("the sensitivity results hold no layers")
    return [layer_options(sens, layer, secondary) for layer in sens.layers]


def _solve(sens: Sensitivity, options: list[list[Option]], budget: int, resolution: int
           ) -> list[Option] | None:
    """Min-cost options with whole-model predicted bytes <= budget, or None if none fit."""
    layer_budget = budget - sens.fixed_bytes
    if layer_budget < sum(min(o.bytes for o in opts) for opts in options):
        return None
    unit = max(layer_budget / resolution, 1.0)
    capacity = int(layer_budget // unit)
    table = _Knapsack(options, unit, capacity)
    return table.choose(capacity) if np.isfinite(table.best[capacity]) else None


# -- public entry points -------------------------------------------------------------------------
def allocate(
    sens: Sensitivity,
    *,
    target_bytes: int | None = None,
    target_ratio: float | None = None,
    max_drop: float | None = None,
    secondary: bool = False,
    resolution: int = DEFAULT_RESOLUTION,
) -> Allocation:
    """The plan predicted best for exactly one target: a size in bytes, a size as a fraction of
    the uncompressed model, or a largest predicted drop (in units of the cost metric: 0.01 is
    one accuracy point). The cost is the primary metric's drop, or with `secondary` the
    secondary metric's (the loss, for exact results with labels)."""
    if sum(x is not None for x in (target_bytes, target_ratio, max_drop)) != 1:
        raise PlanError("give exactly one target: a size in bytes, a size ratio, or a max drop")
    options = _options(sens, secondary)
    smallest = sens.fixed_bytes + sum(min(o.bytes for o in opts) for opts in options)
    if target_ratio is not None:
        if not 0 < target_ratio:
            raise PlanError(f"target size ratio {target_ratio} must be positive")
        target_bytes = int(target_ratio * sens.model_bytes)
    if target_bytes is not None:
        chosen = _solve(sens, options, int(target_bytes), resolution)
        if chosen is None:
            unmeasured = _unmeasured_levels(sens, secondary)
            raise PlanError(
                f"target {target_bytes} bytes ({target_bytes / sens.model_bytes:.4f} of the "
                f"model) is below the smallest these levels allow: {smallest} bytes "
                f"({smallest / sens.model_bytes:.4f})"
                + (f"; {unmeasured} levels measured as NaN or infinite were left out"
                   if unmeasured else ""))
        keep_float, activation_drop = choose_keep_float(sens)
    else:
        assert max_drop is not None
        check_max_drop(max_drop)
        keep_float, activation_drop = choose_keep_float(
            sens, None if secondary else max_drop * ACTIVATION_SHARE)
        chosen = _smallest_within(sens, options, max_drop - (0.0 if secondary else
                                                              activation_drop),
                                  smallest, resolution)
    allocation = _allocation(sens, chosen, secondary, resolution)
    if sens.activations:
        # percentile ranges: measured on the PP-OCRv4 recogniser, minmax lost 2-3 more points
        # (tests/benchmarks/mixed_int8_ocr.py)
        allocation.plan.activation_quant = ActivationQuant(calibration="percentile",
                                                           keep_float=tuple(keep_float))
        allocation.activation_drop = activation_drop
        if not secondary:  # activation drops are measured in the primary metric only
            allocation.drop += activation_drop
            allocation.metric = predicted_metric(sens, allocation.drop, secondary)
    return allocation


#: Operators whose int8 form stores a weight in a quarter of the bytes or runs an int8 kernel
#: (QLinearConv, QLinearMatMul): the only nodes worth quantizing activations for.
INT8_KERNEL_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def choose_keep_float(sens: Sensitivity, budget: float | None = None,
                      threshold: float = KEEP_FLOAT_DROP) -> tuple[list[str], float]:
    """The nodes whose activations stay in float, and the predicted drop of quantizing the
    others (primary-metric units, drops assumed to add up, measured gains counted as zero).

    Nodes without an int8 kernel (Mul, Add, Clip, Softmax, reshapes...) always stay float:
    in int8 they save no bytes and ONNX Runtime runs them between Q/DQ pairs anyway, while
    their rounding adds up in a way one-node-at-a-time drops miss. On the PP-OCRv4 recogniser
    quantizing the 137 such nodes measured harmless alone cost 3 word-accuracy points together,
    and keeping them all float gave 0.956 (fp32 0.971) at 0.28x size and 0.83x latency.

    Of the Conv/MatMul/Gemm nodes, with a `budget` they go to int8 from the least harmful on
    while their summed drop fits; without one, every node whose own drop is above `threshold`
    stays in float. Graph order.
    """
    measured = sens.activation_drops()
    drops = {node.name: max(measured[node.name], 0.0) for node in sens.activations
             if node.op_type in INT8_KERNEL_OPS}
    quantized: set[str] = set()
    used = 0.0
    if budget is None:
        quantized = {name for name, drop in drops.items() if drop <= threshold}
        used = sum(drops[name] for name in quantized)
    else:
        for name, drop in sorted(drops.items(), key=lambda item: item[1]):
            if used + drop > budget:
                break
            quantized.add(name)
            used += drop
    return [node.name for node in sens.activations if node.name not in quantized], used


def _smallest_within(sens: Sensitivity, options: list[list[Option]], max_drop: float,
                     smallest: int, resolution: int) -> list[Option]:
    """Bisect on the size budget for the smallest plan whose predicted drop fits."""
    best = [min(opts, key=lambda o: (o.cost, o.bytes)) for opts in options]  # cheapest plan
    if sum(o.cost for o in best) > max_drop:
        raise PlanError(f"no plan these levels allow predicts a drop of at most {max_drop}")
    low, high = smallest, sens.fixed_bytes + sum(o.bytes for o in best)
    while high - low > max(1, SIZE_SEARCH_TOLERANCE * low):
        middle = (low + high) // 2
        chosen = _solve(sens, options, middle, resolution)
        if chosen is not None and sum(o.cost for o in chosen) <= max_drop:
            best, high = chosen, middle
        else:
            low = middle
    return best


def pareto_front(sens: Sensitivity, secondary: bool = False,
                 resolution: int = DEFAULT_RESOLUTION) -> list[FrontPoint]:
    """Predicted (size, metric) of every Pareto-optimal plan, smallest first: one dynamic
    program over the whole size range, each capacity's plan summed exactly."""
    options = _options(sens, secondary)
    largest = sum(max(o.bytes for o in opts) for opts in options)
    unit = max(largest / resolution, 1.0)
    # room for every option rounded up, so the uncompressed plan is on the front too
    capacity = sum(max(math.ceil(o.bytes / unit) for o in opts) for opts in options)
    table = _Knapsack(options, unit, capacity)
    points: dict[int, float] = {}
    previous = np.inf
    for c in range(capacity + 1):
        if table.best[c] < previous:
            previous = table.best[c]
            chosen = table.choose(c)
            size = sum(o.bytes for o in chosen)
            points[size] = min(points.get(size, np.inf), sum(o.cost for o in chosen))
    front, lowest = [], np.inf
    for size in sorted(points):
        if points[size] < lowest:
            lowest = points[size]
            front.append(_point(sens, sens.fixed_bytes + size, lowest, secondary))
    return front


def _point(sens: Sensitivity, total: int, drop: float, secondary: bool) -> FrontPoint:
    return FrontPoint(total, total / sens.model_bytes, drop,
                      predicted_metric(sens, drop, secondary))


def predicted_metric(sens: Sensitivity, drop: float, secondary: bool = False) -> float:
    if secondary:
        return float(sens.secondary_baseline or 0.0) + drop
    return sens.baseline - drop if sens.higher_is_better else sens.baseline + drop


def _allocation(sens: Sensitivity, chosen: Sequence[Option], secondary: bool,
                resolution: int) -> Allocation:
    choices = {layer.name: option for layer, option in zip(sens.layers, chosen)}
    point = _point(sens, sens.fixed_bytes + sum(o.bytes for o in chosen),
                   sum(o.cost for o in chosen), secondary)
    name = (sens.secondary_metric if secondary else sens.metric) or "metric"
    return Allocation(plan_from_choices(sens, choices), choices, point.bytes, point.ratio,
                      point.drop, point.metric, name, sens, secondary, resolution)


def plan_from_choices(sens: Sensitivity, choices: dict[str, Option]) -> Plan:
    """A plan giving each named layer its option (the sweep's pruning method and quantizer,
    GPTQ/OBS included, as the curves were measured); layers left uncompressed are not
    mentioned."""
    layers: dict[str, Sections] = {}
    for name, option in choices.items():
        sections = dict(level_sections("sparsity", option.sparsity, sens.quantization,
                                       prune_method=sens.pruning_method))
        if option.rank is not None:
            sections["low_rank"] = LowRank(rank=option.rank)
        if option.quantized:
            sections.update(level_sections("bits", option.bits, sens.quantization))
        if sections:
            layers[name] = sections
    return Plan(layers=layers)


def uniform_choices(sens: Sensitivity, sparsity: float, bits: int | None) -> dict[str, Option]:
    """Every layer at the same sparsity and bits (None = float): the uniform baseline."""
    choices = {}
    for layer in sens.layers:
        matching = [o for o in layer_options(sens, layer) if o.rank is None
                    and o.sparsity == sparsity and (o.bits == bits if bits else not o.quantized)]
        if not matching:
            raise PlanError(f"layer {layer.name!r} has no level sparsity {sparsity}, bits {bits}")
        choices[layer.name] = matching[0]
    return choices


def predicted_bytes(sens: Sensitivity, choices: dict[str, Option]) -> int:
    return sens.fixed_bytes + sum(o.bytes for o in choices.values())


# -- any plan, priced by the curves -----------------------------------------------------------
#: Pruning methods whose result the magnitude sparsity curve measures.
MAGNITUDE_METHODS = ("magnitude", "magnitude-global")


@dataclass(frozen=True)
class CurvePrediction:
    """A plan's size and metric as the sensitivity curves predict them."""

    bytes: int
    ratio: float
    #: Predicted drop of the primary metric (positive = worse), summed over layers.
    drop: float
    metric: float
    #: Layers whose settings the curves price only roughly.
    approximate: list[str] = field(default_factory=list)


def predict_plan(sens: Sensitivity, plan: Plan, layers: Iterable[Layer]) -> CurvePrediction:
    """Predicted size and primary metric of any `plan` (hand-edited too) on the model whose
    `layers` are given, read off the curves under the additive assumption, so a plan the
    allocator made lands exactly on its Pareto front. Settings the curves do not cover (other
    pruning methods, N:M, float formats, low rank) are priced as the nearest covered option, or
    as uncompressed, and the layer is listed in `approximate`.

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
    return CurvePrediction(total_bytes, total_bytes / sens.model_bytes, drop,
                          predicted_metric(sens, drop), approximate)


def _option_for(sens: Sensitivity, layer: LayerSensitivity, settings: LayerPlan | None
                ) -> tuple[Option, bool]:
    """The option matching a layer's resolved settings, and whether the match is exact."""
    sparsity, bits, rank, exact = BASELINE_LEVEL["sparsity"], None, None, True
    if settings is not None:
        if settings.low_rank is not None:
            rank = settings.low_rank.rank  # None (an energy-chosen rank): not on any curve
            exact = rank is not None and settings.pruning is None
        pruning = settings.pruning
        measured_pruning = (sens.pruning_method,) if sens.pruning_method != "magnitude" \
            else MAGNITUDE_METHODS
        if pruning is not None:
            if pruning.method in measured_pruning and pruning.amount is not None \
                    and not pruning.is_nm:
                sparsity = float(pruning.amount)
            else:
                exact = False
                if pruning.is_nm:
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
                if quant.method != sens.quantization.method:
                    exact = False  # the curves measured another quantizer
    options = layer_options(sens, layer)
    if not options:
        raise PlanError(f"layer {layer.name!r}: no options in the sensitivity results")
    ranked = [o for o in options if rank is not None and o.rank == rank]
    if rank is not None and not ranked:
        exact = False  # a rank the sweep did not measure: priced as the layer kept whole
    pool = ranked if ranked and settings is not None and settings.pruning is None else \
        [o for o in options if o.rank is None]
    candidates = [o for o in pool if (o.quantized and o.bits == bits) or (bits is None and not o.quantized)]
    if not candidates:  # a bit width the sweep did not measure: the nearest one it did
        exact = False
        measured = sorted({o.bits for o in pool if o.quantized}, key=lambda b: abs(b - (bits or 32)))
        candidates = [o for o in pool if o.quantized and measured and o.bits == measured[0]] or pool
    best = min(candidates, key=lambda o: abs(o.sparsity - sparsity))
    if abs(best.sparsity - sparsity) > 1e-9:
        exact = False
    return best, exact


_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
          "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str) -> tuple[int | None, float | None]:
    """'0.25' or '1/16' -> a ratio of the uncompressed size; '200000', '180KiB', '1.5MB' ->
    bytes. Returns (bytes, ratio), one of them None."""
    cleaned = text.strip().lower().replace(" ", "")
    if "/" in cleaned:
        top, _, bottom = cleaned.partition("/")
        try:
            ratio = float(top) / float(bottom)
        except (ValueError, ZeroDivisionError):
            raise PlanError(f"not a size: {text!r}") from None
        return None, ratio
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)([a-z]*)", cleaned)
    if not match or match.group(2) not in _UNITS:
        raise PlanError(f"not a size: {text!r} (use a ratio such as 0.25 or 1/16, or bytes "
                        "such as 200000 or 180KiB)")
    value, unit = float(match.group(1)), match.group(2)
    if not unit and value <= 1:
        return None, value
    return int(value * _UNITS[unit]), None

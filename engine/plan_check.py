"""Allocation checked by measurement: a `--max-drop` the compressed model really keeps.

The allocator predicts a plan's drop as the sum of its layers' drops, each measured with only
that layer compressed. Compressing several layers at once usually costs more than the sum (on
the demo a predicted 2-point drop measured 3.5), so a plan chosen for a largest drop can break
it. Here every candidate plan is applied with :func:`engine.compress.compress` and evaluated on
the user's data, and the predicted-drop budget handed to the allocator is bisected until the
*measured* drop fits: the smallest plan found whose measured drop is within the limit wins.

Only what evaluation can measure is checked: accuracy and agreement (the exact method's
primary metrics), loss and KL divergence (its secondary ones, and the fast estimate's loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.allocate import Allocation, allocate, check_max_drop
from engine.compress import compress
from engine.data import DataSource
from engine.errors import PlanError
from engine.evaluate import Metrics, TorchRunner, evaluate
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress, sub_progress
from engine.model import Model
from engine.plan import Plan
from engine.sensitivity import Sensitivity

#: Metrics evaluation reports, and whether higher is better.
MEASURABLE = {"accuracy": True, "agreement": True, "loss": False, "kl_divergence": False}
#: Allocations tried by default for a largest drop: the first at the limit, then bisection.
DEFAULT_TRIES = 6
#: Relative width below which the bisection of the predicted-drop budget stops.
BUDGET_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Trial:
    """One allocation and what it measured."""

    #: The predicted-drop budget the allocator was given.
    budget: float
    allocation: Allocation
    #: Bytes compress() reports for the plan (the predicted bytes never undercount them).
    bytes: int
    metric: float
    drop: float

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "predicted_drop": self.allocation.drop,
                "predicted_bytes": self.allocation.bytes, "bytes": self.bytes,
                "metric": self.metric, "drop": self.drop}


@dataclass
class CheckedAllocation:
    """The chosen trial, the measured baseline, and every trial made on the way."""

    chosen: Trial
    metric_name: str
    baseline: float
    data: str
    trials: list[Trial] = field(default_factory=list)

    @property
    def plan(self) -> Plan:
        return self.chosen.allocation.plan

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric_name, "baseline": self.baseline, "data": self.data,
                "chosen": self.chosen.to_dict(), "trials": [t.to_dict() for t in self.trials]}


class _Meter:
    """Measures plans on one data set: the baseline once, then each plan's metric and drop."""

    def __init__(self, sens: Sensitivity, model: Model, data: DataSource, secondary: bool,
                 cancel: CancelToken) -> None:
        name = sens.secondary_metric if secondary else sens.metric
        if name not in MEASURABLE:
            raise PlanError(f"{sens.method} results predict {name!r}, which evaluation cannot "
                            "measure; use exact or fast results to check a plan")
        self.sens, self.model, self.data, self.cancel = sens, model, data, cancel
        self.name, self.higher_is_better = str(name), MEASURABLE[str(name)]
        self.reference = TorchRunner(model.require_module("checking a plan"))
        self.baseline = self._value(self._evaluate(self.reference))

    def _evaluate(self, runner: TorchRunner) -> Metrics:
        needs_reference = self.name in ("agreement", "kl_divergence")
        return evaluate(runner, self.data, reference=self.reference if needs_reference else None,
                        cancel=self.cancel)

    def _value(self, metrics: Metrics) -> float:
        value = getattr(metrics, self.name)
        if value is None:
            raise PlanError(f"{self.data.describe()} cannot measure {self.name} (it needs "
                            "labels); check with labelled data")
        return float(value)

    def trial(self, budget: float, allocation: Allocation, progress: Progress) -> Trial:
        compressed, report = compress(self.model, allocation.plan, measure=False,
                                      progress=progress, cancel=self.cancel)
        value = self._value(self._evaluate(TorchRunner(compressed.module)))
        drop = self.baseline - value if self.higher_is_better else value - self.baseline
        return Trial(budget, allocation, report.bytes_after, value, drop)


def check_allocation(sens: Sensitivity, model: Model, data: DataSource,
                     allocation: Allocation, *, secondary: bool = False,
                     progress: Progress = no_progress,
                     cancel: CancelToken = NEVER_CANCELLED) -> CheckedAllocation:
    """Measure one allocation (e.g. one made for a target size) on `data`."""
    meter = _Meter(sens, model, data, secondary, cancel)
    trial = meter.trial(allocation.drop, allocation, progress)
    return CheckedAllocation(trial, meter.name, meter.baseline, data.describe(), [trial])


def allocate_within_measured_drop(
    sens: Sensitivity,
    model: Model,
    data: DataSource,
    max_drop: float,
    *,
    secondary: bool = False,
    tries: int = DEFAULT_TRIES,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> CheckedAllocation:
    """The smallest plan found whose drop *measured* on `data` is at most `max_drop`.

    The first try is the allocation for a predicted drop of `max_drop`; when it measures
    within the limit it is the answer. Otherwise the predicted-drop budget is bisected below
    that plan's predicted drop (a smaller budget gives a larger, gentler plan) until `tries`
    distinct plans were measured, keeping the smallest plan that fits. If none fits, the plan
    predicted to lose nothing is tried last; a PlanError names the closest miss when even that
    one breaks the limit.
    """
    check_max_drop(max_drop)
    if tries < 1:
        raise PlanError("at least one try is needed")
    meter = _Meter(sens, model, data, secondary, cancel)
    trials: list[Trial] = []

    def attempt(budget: float) -> Trial:
        """The allocation for `budget`, measured unless the same plan was measured already."""
        allocation = allocate(sens, max_drop=budget, secondary=secondary)
        for earlier in trials:
            if earlier.allocation.plan == allocation.plan:
                return earlier
        step = sub_progress(progress, len(trials) / (tries + 1), (len(trials) + 1) / (tries + 1))
        step(0.0, f"measuring the plan for a predicted drop of {allocation.drop:.4g}")
        trial = meter.trial(budget, allocation, step)
        trials.append(trial)
        return trial

    def fits(trial: Trial) -> bool:
        return trial.drop <= max_drop

    best = attempt(max_drop)
    if not fits(best):
        found: Trial | None = None
        # Budgets from a plan's predicted drop up give that plan (or a smaller one, which is
        # assumed to measure no better), so a failed plan's drop bounds the search from above.
        low, high = 0.0, _below(best.allocation.drop)
        for _ in range(4 * tries):  # repeats of measured plans cost nothing; this only bounds
            if len(trials) >= tries or high - low <= BUDGET_TOLERANCE * max(max_drop, 1e-12):
                break
            middle = (low + high) / 2
            trial = attempt(middle)
            if fits(trial):
                low = middle
                if found is None or trial.bytes < found.bytes:
                    found = trial
            else:
                high = _below(min(middle, trial.allocation.drop))
        if found is None:
            found = attempt(0.0)
            if not fits(found):
                closest = min(trials, key=lambda t: t.drop)
                raise PlanError(
                    f"no plan measured within a drop of {max_drop:.4g} {meter.name} on "
                    f"{data.describe()}: the closest lost {closest.drop:.4g} (predicted "
                    f"{closest.allocation.drop:.4g})")
        best = found
    progress(1.0, f"measured drop {best.drop:.4g} within {max_drop:.4g} after {len(trials)} "
                  "tries")
    return CheckedAllocation(best, meter.name, meter.baseline, data.describe(), trials)


def _below(value: float) -> float:
    """The largest budget that excludes a plan predicted to lose `value`."""
    return max(0.0, value - BUDGET_TOLERANCE * max(abs(value), 1e-12))

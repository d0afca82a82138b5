"""The use cases, written once: inspect, sweep, allocate (and check), compress, export.

The CLI commands (engine/commands/) and the app's jobs (gui/) both call these functions, so a
plan or a report made from the same inputs is the same whichever face made it. Each takes one
:class:`~engine.data.DataSpec` for its data, a ``progress(fraction, message)`` callback and a
cancel token (engine.jobs), and where there is something to watch, an ``on_event`` callback
that receives typed events (:class:`RecoveryStep`, :class:`Note`); nobody parses log text.
Nothing here knows about threads or Qt: the app runs these on its workers, the CLI directly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

from engine.backends.base import RUN
from engine.data import DataSource, DataSpec, OpenedData
from engine.errors import SlimscopeError
from engine.formats.guard import quote
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress
from engine.model import Model
from engine.plan import Plan

if TYPE_CHECKING:
    from engine.allocate import Allocation
    from engine.compress import CompressionReport
    from engine.compressed import CompressedModel
    from engine.export import ExportResult
    from engine.finetune import StepReport
    from engine.plan_check import CheckedAllocation
    from engine.safe_write import Input
    from engine.sensitivity import Sensitivity, SweepSettings


# -- events -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecoveryStep:
    """One recovery fine-tuning update, for live curves: `step` of `total`, the loss, the
    learning rate used, the metric on the steps that evaluate (None on the others), and the
    sparsity of the targeted weights when L1 or gradual pruning is on."""

    step: int
    total: int
    loss: float
    lr: float
    metric: float | None = None
    sparsity: float | None = None

    @classmethod
    def of(cls, report: "StepReport") -> "RecoveryStep":
        return cls(report.step, report.total, report.loss, report.lr, report.metric,
                   report.sparsity)


@dataclass(frozen=True)
class Note:
    """Something the user should know that is not an error, e.g. non-finite weights."""

    message: str


Event = Union[RecoveryStep, Note]
OnEvent = Callable[[Event], None]


def no_events(_event: Event) -> None:
    """An event callback that ignores everything, for callers that don't watch."""


# -- which model is the demo --------------------------------------------------------------------
#: Data the demo model's sensitivity is measured on when none is named, by method: the held-out
#: split for the exact metric, the calibration split for the estimate.
SWEEP_DEMO_DATA = {"exact": "demo", "fast": "demo:calibration"}


def is_demo(model: Model | Path | str) -> bool:
    """Whether `model` is the bundled demo, the one model whose data comes with it."""
    from engine.demo import DEMO_MODEL

    path = Path(model.path if isinstance(model, Model) else model)
    try:
        return path.resolve() == Path(DEMO_MODEL).resolve()
    except OSError:
        return False


# -- inspect ------------------------------------------------------------------------------------
def inspect(model: Model, *, on_event: OnEvent = no_events) -> dict[str, Any]:
    """Every layer with its shape, size and statistics, as plain data; non-finite weights
    (NaN/Inf) are listed under ``non_finite`` and announced as a :class:`Note`."""
    from engine.stats import model_report

    report = model_report(model)
    # from the statistics just computed: model.non_finite() would read every weight again
    bad = {layer["name"]: layer["stats"]["non_finite"] for layer in report["layers"]
           if layer.get("stats", {}).get("non_finite")}
    report["non_finite"] = bad
    if bad:
        where = ", ".join(f"{name} ({count})" for name, count in list(bad.items())[:5])
        on_event(Note(f"non-finite weights (NaN/Inf) in {where}"))
    return report


# -- sensitivity --------------------------------------------------------------------------------
def sweep(model: Model, data: DataSpec, method: str = "exact",
          settings: "SweepSettings | None" = None, *, progress: Progress = no_progress,
          cancel: CancelToken = NEVER_CANCELLED) -> "Sensitivity":
    """Per-layer sensitivity of `model` on `data.evaluation` (at most `data.limit` samples).

    The demo model measures on its own data when none is named; the data-free method needs
    none and runs on every model, the others need a model that runs.
    """
    from engine.sensitivity import SweepSettings, sweep as sweep_model

    (settings or SweepSettings()).check_methods()  # before any data is opened, every backend
    source: DataSource | None = None
    if method != "datafree":
        reason = model.why_not(RUN)
        if reason is not None:
            raise SlimscopeError(f"the {method} method cannot run {model.path.name}: {reason}; "
                                 "the datafree method needs only the weights")
        spec = data.evaluation or (SWEEP_DEMO_DATA.get(method) if is_demo(model) else None)
        if spec is None:
            raise SlimscopeError(f"the {method} method needs data (or use the datafree method, "
                                 "which needs none)")
        progress(0.0, f"opening {spec}")
        source = replace(data, evaluation=spec, calibration=None, train=None
                         ).open(model.inputs).evaluation
        assert source is not None
        progress(0.0, source.describe())
    return sweep_model(model, source, method, settings, progress=progress, cancel=cancel)


def check_fits(sens: "Sensitivity", model: Model) -> None:
    """Refuse results measured on another model: every layer must exist with the same shape."""
    names = set(model.layer_names())
    missing = [layer.name for layer in sens.layers if layer.name not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SlimscopeError(f"these sensitivity results are for another model: "
                             f"{quote(model.path.name)} has no layer {quote(missing[0])}{more}")
    for layer in sens.layers:
        shape = tuple(model.layer(layer.name).shape)
        if shape != tuple(layer.shape):
            raise SlimscopeError(f"these sensitivity results are for another model: layer "
                                 f"{quote(layer.name)} is {shape} in {quote(model.path.name)} "
                                 f"but {tuple(layer.shape)} in the results")


# -- allocation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Exactly one goal for allocation: a size in bytes, a size as a fraction of the
    uncompressed model, or a largest drop of the cost metric (0.01 = one accuracy point)."""

    target_bytes: int | None = None
    target_ratio: float | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        given = [value for value in (self.target_bytes, self.target_ratio, self.max_drop)
                 if value is not None]
        if len(given) != 1:
            raise SlimscopeError("give exactly one target: a size, a fraction of the size, or "
                                 "a largest drop")

    @classmethod
    def size(cls, text: str) -> "Target":
        """A size as typed: a fraction ('0.25', '1/16') or bytes ('200000', '180KiB')."""
        from engine.allocate import parse_size

        size, ratio = parse_size(text)
        return cls(target_bytes=size, target_ratio=ratio)

    def kwargs(self) -> dict[str, Any]:
        """The keyword engine.allocate.allocate takes for this target."""
        return {key: value for key, value in (("target_bytes", self.target_bytes),
                                              ("target_ratio", self.target_ratio),
                                              ("max_drop", self.max_drop)) if value is not None}


@dataclass
class PlanOutcome:
    """An allocation, and what measuring it found when it was checked on data."""

    allocation: "Allocation"
    checked: "CheckedAllocation | None" = None

    @property
    def plan(self) -> Plan:
        return self.allocation.plan

    def to_dict(self) -> dict[str, Any]:
        """The report: choices, predictions, the Pareto front, and the measured tries."""
        report = self.allocation.to_dict()
        if self.checked is not None:
            report["checked"] = self.checked.to_dict()
        return report


def allocate_plan(sens: "Sensitivity", model: Model | None, target: Target, *,
                  check: DataSpec | None = None, secondary: bool = False, tries: int | None = None,
                  progress: Progress = no_progress,
                  cancel: CancelToken = NEVER_CANCELLED) -> PlanOutcome:
    """The plan predicted best for `target`, from sensitivity results that must fit `model`.

    With `check` naming evaluation data, plans are compressed and measured there: a size
    target reports the measured metric, and a largest drop is searched until the *measured*
    drop fits (engine.plan_check), at most `tries` plans.
    """
    from engine.allocate import allocate
    from engine.plan_check import DEFAULT_TRIES, allocate_within_measured_drop, check_allocation

    if model is not None:
        check_fits(sens, model)
    data = None
    if check is not None and check.evaluation:
        if model is None:
            raise SlimscopeError("checking a plan by measuring needs the model")
        progress(0.0, f"opening {check.evaluation}")
        data = replace(check, calibration=None, train=None).open(model.inputs).evaluation
    if data is None:
        return PlanOutcome(allocate(sens, **target.kwargs(), secondary=secondary))
    assert model is not None
    if target.max_drop is not None:
        checked = allocate_within_measured_drop(
            sens, model, data, target.max_drop, secondary=secondary,
            tries=tries or DEFAULT_TRIES, progress=progress, cancel=cancel)
        return PlanOutcome(checked.chosen.allocation, checked)
    allocation = allocate(sens, **target.kwargs(), secondary=secondary)
    return PlanOutcome(allocation, check_allocation(sens, model, data, allocation,
                                                    secondary=secondary, progress=progress,
                                                    cancel=cancel))


# -- compression --------------------------------------------------------------------------------
@dataclass
class CompressionOutcome:
    """One finished compression: what it was made from and what it gave."""

    model: Model
    #: The plan as plain data, exactly as it was when the compression started.
    plan: dict[str, Any]
    data: DataSpec
    compressed: "CompressedModel"
    report: "CompressionReport"
    #: Recovery steps as they were reported, possibly empty.
    history: list[RecoveryStep] = field(default_factory=list)
    #: The sources `data` named, opened, for an export that follows at once; None to reopen.
    opened: OpenedData | None = field(default=None, repr=False, compare=False)


def compress(model: Model, plan: Plan | Mapping[str, Any], data: DataSpec, *,
             measure: bool = True, progress: Progress = no_progress,
             cancel: CancelToken = NEVER_CANCELLED,
             on_event: OnEvent = no_events) -> CompressionOutcome:
    """Apply `plan` to a copy of `model` and report what it did, measured on `data`.

    `data` is taken as given (call ``data.effective(is_demo(model))`` for the demo's
    defaults). Every recovery update arrives at `on_event` as a :class:`RecoveryStep`. The
    loaded model is never modified, so a cancel or a failure leaves it as it was.
    """
    from engine.compress import compress as compress_model

    plan_data = plan.to_dict() if isinstance(plan, Plan) else copy.deepcopy(dict(plan))
    parsed = Plan.from_dict(plan_data)
    progress(0.0, "opening the data")
    opened = data.open(model.inputs)
    history: list[RecoveryStep] = []

    def on_step(report: "StepReport") -> None:
        step = RecoveryStep.of(report)
        history.append(step)
        on_event(step)

    compressed, report = compress_model(
        model, parsed, opened.evaluation, calibration=opened.calibration,
        train_data=opened.train, measure=measure, progress=progress, cancel=cancel,
        on_step=on_step)
    return CompressionOutcome(model, plan_data, data, compressed, report, history, opened)


def export(outcome: CompressionOutcome, destination: str | Path, *, format: str | None = None,
           keep_unverified: bool = False, measure: bool = True, inputs: Sequence["Input"] = (),
           progress: Progress = no_progress,
           cancel: CancelToken = NEVER_CANCELLED) -> "ExportResult":
    """Write `outcome`'s model to `destination`, reload it with its users' runtime, and verify.

    Verification runs on the compression's evaluation data (synthetic inputs without it) and
    static int8 calibrates on its calibration data. The model, the data and `inputs` (e.g. the
    plan file) are never overwritten.
    """
    from engine.export import export as export_model

    opened = outcome.opened
    if opened is None:
        opened = replace(outcome.data, train=None).open(outcome.model.inputs)
    read = [("model", outcome.model.path), *outcome.data.read_inputs(), *inputs]
    return export_model(outcome.compressed, outcome.model, destination, format=format,
                        data=opened.evaluation, calibration=opened.calibration,
                        keep_unverified=keep_unverified, measure=measure, inputs=read,
                        progress=progress, cancel=cancel)

"""The Qt face of the application state: the model, its statistics, the selection, the plan and results.

The state itself is Qt-free (:class:`engine.app_state.AppState`, kept as :attr:`Session.state`);
the session's signals are its fields' changes, re-emitted on the GUI thread by the one bridge
(:class:`gui.state_bridge.StateBridge`). Every background job runs through the session's
:class:`gui.job_service.JobService` (:attr:`Session.jobs`), one current job per slot.
Panels take the session in ``__init__``, connect to its signals and write back only through
its setters, so a change made in one panel reaches every other without panels knowing each
other. The plan lives in :attr:`Session.plan_document` (every edit goes through it); the
session re-resolves it against the model after each change and publishes the per-layer
settings and predicted sizes as one :class:`PlanState`. Statistics are computed on one background thread, never on the GUI thread (a big model
would freeze the window): one thread because format adapters' weight getters need not be
thread-safe, and because a queue lets the selected layer overtake the sweep over all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from PySide6.QtCore import QObject, QThreadPool, Signal

from engine import workflows
from engine.app_state import AppState
from engine.data import DataSpec
from engine.errors import PlanError
from engine.jobs import CancelToken, Progress
from engine.model import Layer, Model
from engine.plan import LayerPlan, Plan
from engine.size_prediction import PlanPrediction, SizePredictor
from engine.stats import DEFAULT_BINS, Histogram, LayerStats, StatsCache

from gui.job_service import JobService
from gui.plan_document import PlanDocument
from gui.state_bridge import StateBridge
from gui.workers import Job, one_line

#: Histogram bins: enough to show shape on big layers, few enough to not look like noise on small.
MIN_BINS, MAX_BINS = 24, DEFAULT_BINS


def bins_for(count: int) -> int:
    """Rice's rule (2·n^⅓) clamped to [MIN_BINS, MAX_BINS]: 288 weights get 24 bins, 1M get 128."""
    return int(min(MAX_BINS, max(MIN_BINS, round(2 * count ** (1 / 3)))))


#: Queue priorities: the selected layer jumps ahead of the background sweep.
SELECTED_PRIORITY = 10
SWEEP_PRIORITY = 0


#: The data compression uses: the engine's one data-spec type (CLI and app alike), its
#: defaults the CLI's (see DataSpec.effective).
CompressionData = DataSpec


class MetricPrediction(NamedTuple):
    """What a sensitivity-based predictor expects a plan to score (e.g. accuracy 0.981)."""

    name: str
    value: float
    baseline: float | None = None
    #: True when some layers' settings are priced only roughly.
    approximate: bool = False


#: Given the plan (already known to resolve) and the model, the predicted metric, or None when it
#: cannot say; e.g. read off sensitivity curves.
MetricPredictor = Callable[[Plan, Model], "MetricPrediction | None"]


@dataclass
class PlanState:
    """The current plan resolved against the current model: what each layer gets and weighs."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    #: The engine's one-line PlanError when the plan does not fit the model, else None.
    error: str | None = None
    prediction: PlanPrediction | None = None
    metric: MetricPrediction | None = None


#: One finished compression (engine.workflows makes it for the CLI and the app alike).
CompressionOutcome = workflows.CompressionOutcome


#: The background sweep works out statistics a batch of layers per job, up to this many
#: layers or weights: one job (a QObject, three connections) per layer took the GUI thread
#: 6 s for 10k layers and never finished for 300k.
SWEEP_BATCH_LAYERS = 1024
SWEEP_BATCH_WEIGHTS = 4 << 20


@dataclass(frozen=True, eq=False)
class _StatsRequest:
    """What a stats job was for: the cache it fills (one per model) and its layers."""

    cache: StatsCache
    names: tuple[str, ...]
    histogram: bool = False


def _sweep_batches(layers: list[Layer]) -> list[list[Layer]]:
    """`layers` in order, cut where a batch reaches SWEEP_BATCH_LAYERS or _WEIGHTS."""
    batches: list[list[Layer]] = []
    batch: list[Layer] = []
    weights = 0
    for layer in layers:
        batch.append(layer)
        weights += layer.params
        if len(batch) >= SWEEP_BATCH_LAYERS or weights >= SWEEP_BATCH_WEIGHTS:
            batches.append(batch)
            batch, weights = [], 0
    if batch:
        batches.append(batch)
    return batches


class Session(QObject):
    """Observable state shared by all panels; see the module docstring."""

    #: The model was replaced (None when closed); emitted after the new stats cache exists.
    model_changed = Signal(object)
    #: The selected layer's name, "" for none.
    layer_selected = Signal(str)
    #: `stats.stats(name)` is now cached for every name of the list (a batch, in table order).
    layers_stats_ready = Signal(list)
    #: `stats.stats(name)` and `stats.histogram(name)` are now cached.
    layer_histogram_ready = Signal(str)
    #: Computing a layer's statistics failed: name, one-line message.
    layer_failed = Signal(str, str)
    #: Every selected layer's name (the current one first); may be empty.
    layers_selected = Signal(list)
    #: The plan or the model changed and :attr:`plan_state` is fresh.
    plan_state_changed = Signal(object)
    #: A compression finished for the current model (a CompressionOutcome), or None when cleared.
    result_changed = Signal(object)
    #: The data choice changed (a CompressionData).
    data_changed = Signal(object)
    #: A panel's plan edit was refused: the engine's one-line PlanError, for the editor to show.
    plan_rejected = Signal(str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        #: The Qt-free state; model, selection, plan, results, data and jobs live there.
        self.state = AppState()
        self.bridge = StateBridge(self.state, self)
        self.bridge.result_changed.connect(self.result_changed)
        self.bridge.data_changed.connect(self.data_changed)
        self.bridge.model_changed.connect(self.model_changed)
        self.bridge.selected_layer_changed.connect(self.layer_selected)
        self.bridge.selected_layers_changed.connect(self.layers_selected)
        #: Every background job of the window (load, compress, sensitivity, …), one per slot.
        self.jobs = JobService(self.state, self)
        self.stats: StatsCache | None = None
        self.plan_document = PlanDocument(self)
        self.plan_document.validator = self._check_plan
        self.plan_document.changed.connect(self._on_plan_edited)
        self.state.plan = self.plan_document.to_dict()  # before anyone listens: no event
        self.plan_state = PlanState()
        self.metric_predictor: MetricPredictor | None = None
        self._size_predictor: SizePredictor | None = None
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._jobs: set[Job] = set()
        #: The background sweep's jobs still to finish: the plan is re-priced once they all
        #: have (a histogram job finishing must not re-price 300k layers).
        self._sweep_jobs: set[Job] = set()
        self._histogram_pending: set[tuple[StatsCache, str]] = set()

    # -- the state's fields, read here for the panels' convenience -----------------------------
    @property
    def model(self) -> Model | None:
        return self.state.model

    @property
    def selected_layer(self) -> str:
        return self.state.selected_layer

    @property
    def selected_layers(self) -> list[str]:
        return self.state.selected_layers

    @property
    def result(self) -> CompressionOutcome | None:
        return self.state.result

    @property
    def data(self) -> CompressionData:
        return self.state.data

    # -- setters ------------------------------------------------------------------------------
    def set_model(self, model: Model | None, *, sweep: bool = True) -> None:
        """Replace the model; optionally start filling every layer's statistics in the background.

        What belongs to one model is reset in one place, AppState.reset_for_model."""
        self._cancel_jobs()
        self.stats = StatsCache(model) if model is not None else None
        self._size_predictor = SizePredictor(model) if model is not None else None
        self._histogram_pending.clear()
        self.state.reset_for_model(model)
        self.refresh_plan_state()
        if model is not None and sweep:
            self._start_sweep()

    def select_layer(self, name: str) -> None:
        """Make `name` the current layer ("" for none); a no-op when it already is."""
        if name == self.selected_layer:
            return
        if name:
            if self.model is None:
                raise KeyError(f"no layer named {name!r}: no model is loaded")
            self.model.layer(name)  # raises KeyError for unknown names
        self.state.set("selected_layer", name)
        if name not in self.selected_layers[:1]:
            self.select_layers([name] if name else [])

    def select_layers(self, names: list[str]) -> None:
        """Select several layers (the first becomes current); plan edits apply to all of them."""
        names = list(dict.fromkeys(names))
        if names == self.selected_layers:
            return
        for name in names:
            if self.model is None:
                raise KeyError(f"no layer named {name!r}: no model is loaded")
            self.model.layer(name)
        current = names[0] if names else ""
        # one update: listeners of either field see both already changed
        self.state.update(selected_layer=current, selected_layers=names)

    # -- plan ------------------------------------------------------------------------------------
    def _on_plan_edited(self) -> None:
        self.state.set("plan", self.plan_document.to_dict())
        self.refresh_plan_state()

    def _check_plan(self, plan: Plan) -> None:
        """Edits must resolve against the model, unless the plan already did not (a plan made for
        another model must stay editable until it fits)."""
        if self.model is not None and self.plan_state.error is None:
            plan.resolve(self.model.layers)

    def refresh_plan_state(self) -> None:
        """Re-resolve the plan, re-predict sizes and metric, and tell the panels."""
        state = PlanState()
        model = self.model
        if model is not None:
            try:
                state.layers = self.plan_document.plan.resolve(model.layers)
            except PlanError as exc:
                state.error = str(exc)
        if model is not None and state.error is None and self._size_predictor is not None:
            sparsity = {name: s.sparsity for name in model.layer_names()
                        if (s := self.cached_stats(name)) is not None}
            state.prediction = self._size_predictor.predict(state.layers, sparsity)
            if self.metric_predictor is not None:
                try:
                    state.metric = self.metric_predictor(self.plan_document.plan, model)
                except PlanError:
                    state.metric = None  # e.g. curves measured on another model
        self.plan_state = state
        self.plan_state_changed.emit(state)

    def set_metric_predictor(self, predictor: MetricPredictor | None) -> None:
        """Install (or remove) what predicts the plan's metric, e.g. from sensitivity curves."""
        self.metric_predictor = predictor
        self.refresh_plan_state()

    # -- data and results ----------------------------------------------------------------------
    def model_is_demo(self) -> bool:
        return self.model is not None and workflows.is_demo(self.model)

    def effective_data(self) -> CompressionData:
        """The data compression will use now: the user's choice with the CLI's defaults filled in."""
        return self.data.effective(self.model_is_demo())

    def set_data(self, choice: CompressionData) -> None:
        self.state.set("data", choice)

    def set_result(self, outcome: CompressionOutcome | None) -> None:
        """Show `outcome`; one made from a model that is no longer loaded is dropped."""
        if outcome is not None and outcome.model is not self.model:
            return
        self.state.set("result", outcome, force=outcome is not None)

    # -- statistics -----------------------------------------------------------------------------
    def weight_count(self, name: str) -> int:
        """Elements in the layer's weight tensor (its params may also count a bias)."""
        assert self.model is not None
        return self.model.tensors.numel(self.model.layer(name).weight_key)

    def cached_stats(self, name: str) -> LayerStats | None:
        """The layer's statistics if already computed, else None; never computes."""
        if self.stats is None:
            return None
        return self.stats.cached_stats(name)

    def cached_histogram(self, name: str) -> Histogram | None:
        """The layer's histogram (at :func:`bins_for` bins) if already computed, else None; never computes."""
        if self.stats is None or self.model is None:
            return None
        bins = bins_for(self.weight_count(name))
        return self.stats.cached_histogram(name, bins)

    def request_histogram(self, name: str) -> None:
        """Make sure `name`'s statistics and histogram exist; `layer_histogram_ready` follows.

        The work runs on the stats thread, ahead of the background sweep; never on the GUI
        thread, where a 100M-weight layer would freeze the window for seconds.
        """
        model, cache = self.model, self.stats
        if model is None or cache is None or (cache, name) in self._histogram_pending:
            return
        bins = bins_for(self.weight_count(name))
        self._histogram_pending.add((cache, name))

        def body(progress: Progress, cancel: CancelToken) -> dict[str, str]:
            cache.stats(name)
            cache.histogram(name, bins)
            return {}

        request = _StatsRequest(cache, (name,), histogram=True)
        self._start(Job(body, f"histogram {name}", request), SELECTED_PRIORITY)

    def _start_sweep(self) -> None:
        """Jobs of a batch of layers each, queued behind any selected layer's histogram.

        A layer that fails is reported alone (`layer_failed`); the rest of its batch goes on.
        """
        cache = self.stats
        assert self.model is not None and cache is not None
        for batch in _sweep_batches(self.model.layers):

            def body(progress: Progress, cancel: CancelToken,
                     batch: list[Layer] = batch) -> dict[str, str]:
                failures: dict[str, str] = {}
                try:
                    cache.prefetch(batch)  # small layers worked out many at a time
                except Exception:  # noqa: BLE001 - the layers are retried one by one below
                    pass
                for layer in batch:
                    cancel.check()
                    try:
                        cache.stats(layer.name)
                    except Exception as exc:  # noqa: BLE001 - one bad layer, not the batch
                        failures[layer.name] = one_line(exc)
                return failures

            names = tuple(layer.name for layer in batch)
            job = Job(body, f"stats {names[0]} (+{len(names) - 1})", _StatsRequest(cache, names))
            self._sweep_jobs.add(job)
            self._start(job, SWEEP_PRIORITY)

    def _start(self, job: Job, priority: int) -> None:
        self._jobs.add(job)
        job.succeeded.connect(self._on_job_succeeded)
        job.failed.connect(self._on_job_failed)
        job.done.connect(self._on_job_done)
        job.start(self._pool, priority)

    def _request_of(self) -> "_StatsRequest | None":
        """The finished job's request, if it still concerns the current model."""
        job = self.sender()
        request = getattr(job, "context", None)
        if isinstance(request, _StatsRequest) and request.cache is self.stats:
            return request
        return None  # results for a model since replaced are dropped

    def _on_job_succeeded(self, failures: dict[str, str]) -> None:
        request = self._request_of()
        if request is None:
            return
        ready = [name for name in request.names if name not in failures]
        if ready:
            self.layers_stats_ready.emit(ready)
        for name, message in failures.items():
            self.layer_failed.emit(name, message)
        if request.histogram and ready:
            self.layer_histogram_ready.emit(request.names[0])

    def _on_job_failed(self, message: str, _details: str, _exc: object) -> None:
        request = self._request_of()
        if request is not None:
            for name in request.names:
                self.layer_failed.emit(name, message)

    def _on_job_done(self) -> None:
        job = self.sender()
        self._jobs.discard(job)
        request = getattr(job, "context", None)
        if isinstance(request, _StatsRequest) and request.histogram:
            self._histogram_pending.discard((request.cache, request.names[0]))
        if job in self._sweep_jobs:
            self._sweep_jobs.discard(job)
            if not self._sweep_jobs and isinstance(request, _StatsRequest) \
                    and request.cache is self.stats:
                self.refresh_plan_state()  # sparsities are known now: kept zeros store smaller

    def _cancel_jobs(self) -> None:
        for job in self._jobs:
            job.cancel()
        self._jobs.clear()
        self._sweep_jobs.clear()

    @property
    def busy(self) -> bool:
        """True while statistics are still being computed in the background."""
        return bool(self._jobs)

    def shutdown(self, timeout_ms: int = 5000) -> bool:
        """Cancel background work and wait for the stats thread; call before the app exits."""
        self._cancel_jobs()
        return self._pool.waitForDone(timeout_ms)

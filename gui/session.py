"""The GUI's one shared state: the loaded model, its statistics cache and the selected layer.

Panels take the session in ``__init__``, connect to its signals and write back only through
its setters, so a change made in one panel reaches every other without panels knowing each
other. Statistics are computed on one background thread, never on the GUI thread (a big model
would freeze the window): one thread because format adapters' weight getters need not be
thread-safe, and because a queue lets the selected layer overtake the sweep over all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QObject, QThreadPool, Signal

from engine.jobs import CancelToken, Progress
from engine.model import Model
from engine.stats import DEFAULT_BINS, Histogram, LayerStats, StatsCache

from gui.workers import Job

#: Histogram bins: enough to show shape on big layers, few enough to not look like noise on small.
MIN_BINS, MAX_BINS = 24, DEFAULT_BINS


def bins_for(count: int) -> int:
    """Rice's rule (2·n^⅓) clamped to [MIN_BINS, MAX_BINS]: 288 weights get 24 bins, 1M get 128."""
    return int(min(MAX_BINS, max(MIN_BINS, round(2 * count ** (1 / 3)))))


#: Queue priorities: the selected layer jumps ahead of the background sweep.
SELECTED_PRIORITY = 10
SWEEP_PRIORITY = 0


@dataclass(frozen=True, eq=False)
class _StatsRequest:
    """What a stats job was for: the cache it fills (one per model) and the layer."""

    cache: StatsCache
    name: str
    histogram: bool = False


class Session(QObject):
    """Observable state shared by all panels; see the module docstring."""

    #: The model was replaced (None when closed); emitted after the new stats cache exists.
    model_changed = Signal(object)
    #: The selected layer's name, "" for none.
    layer_selected = Signal(str)
    #: `stats.stats(name)` is now cached.
    layer_stats_ready = Signal(str)
    #: `stats.stats(name)` and `stats.histogram(name)` are now cached.
    layer_histogram_ready = Signal(str)
    #: Computing a layer's statistics failed: name, one-line message.
    layer_failed = Signal(str, str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.model: Model | None = None
        self.stats: StatsCache | None = None
        self.selected_layer = ""
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._jobs: set[Job] = set()
        self._histogram_pending: set[tuple[StatsCache, str]] = set()

    # -- setters ------------------------------------------------------------------------------
    def set_model(self, model: Model | None, *, sweep: bool = True) -> None:
        """Replace the model; optionally start filling every layer's statistics in the background."""
        self._cancel_jobs()
        self.model = model
        self.stats = StatsCache(model) if model is not None else None
        self.selected_layer = ""
        self._histogram_pending.clear()
        self.model_changed.emit(model)
        self.layer_selected.emit("")
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
        self.selected_layer = name
        self.layer_selected.emit(name)

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

        def body(progress: Progress, cancel: CancelToken) -> str:
            cache.stats(name)
            cache.histogram(name, bins)
            return name

        self._start(Job(body, f"histogram {name}", _StatsRequest(cache, name, histogram=True)), SELECTED_PRIORITY)

    def _start_sweep(self) -> None:
        """One queued job per layer, so a selected layer can overtake the rest."""
        cache = self.stats
        assert self.model is not None and cache is not None
        for layer in self.model.layers:

            def body(progress: Progress, cancel: CancelToken, name: str = layer.name) -> str:
                cache.stats(name)
                return name

            self._start(Job(body, f"stats {layer.name}", _StatsRequest(cache, layer.name)), SWEEP_PRIORITY)

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

    def _on_job_succeeded(self, _result: object) -> None:
        request = self._request_of()
        if request is not None:
            self.layer_stats_ready.emit(request.name)
            if request.histogram:
                self.layer_histogram_ready.emit(request.name)

    def _on_job_failed(self, message: str, _details: str, _exc: object) -> None:
        request = self._request_of()
        if request is not None:
            self.layer_failed.emit(request.name, message)

    def _on_job_done(self) -> None:
        job = self.sender()
        self._jobs.discard(job)
        request = getattr(job, "context", None)
        if isinstance(request, _StatsRequest) and request.histogram:
            self._histogram_pending.discard((request.cache, request.name))

    def _cancel_jobs(self) -> None:
        for job in self._jobs:
            job.cancel()
        self._jobs.clear()

    @property
    def busy(self) -> bool:
        """True while statistics are still being computed in the background."""
        return bool(self._jobs)

    def shutdown(self, timeout_ms: int = 5000) -> bool:
        """Cancel background work and wait for the stats thread; call before the app exits."""
        self._cancel_jobs()
        return self._pool.waitForDone(timeout_ms)

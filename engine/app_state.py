"""The application's one state, observable and free of Qt (napari's ViewerModel is the model).

Everything the app shows about "what is open and what is going on" lives here: the model, the
selected layers, the plan (as plain data), the sensitivity results, the data spec, the current
compression result and which jobs run in which slot. Observers subscribe per field and hear
about every change; the Qt face listens through one thin bridge (gui.state_bridge), the engine
and tests listen directly. No Qt here (tests/gui/test_no_qt_in_engine.py), so the state can be
driven and tested without a display.

:meth:`AppState.reset_for_model` is the one place that says what belongs to one model: opening
another model clears exactly :data:`PER_MODEL_FIELDS`, so nothing leaks from one model into the
next. The plan is deliberately not among them: the window asks Keep / Discard when it does not
fit the new model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from engine.data import DataSpec

#: Every field, in the order :meth:`AppState.reset_for_model` announces them.
#: Results go before the model, so views rebuilt for the new model never see the old ones.
FIELDS = ("result", "data", "sensitivity", "model", "selected_layer", "selected_layers", "plan", "jobs")

#: What belongs to one model, with the value a fresh model starts from (a factory, so lists and
#: specs are never shared between two models).
PER_MODEL_DEFAULTS: dict[str, Callable[[], Any]] = {
    "result": lambda: None,
    "data": DataSpec,  # data chosen for one model rarely fits the next
    "selected_layer": str,
    "selected_layers": list,
    "sensitivity": lambda: None,
}
PER_MODEL_FIELDS = tuple(PER_MODEL_DEFAULTS)

#: Values compared by equality; anything else (a model, a result) counts as changed only when
#: it is another object: equality of a model would compare tensors.
_VALUE_TYPES = (str, int, float, bool, tuple, list, dict, DataSpec)

Listener = Callable[[Any], None]


@dataclass(frozen=True)
class Change:
    """One announced change, for listeners of every field (:meth:`AppState.subscribe_all`)."""

    field: str
    value: Any
    old: Any


class AppState:
    """See the module docstring. Read fields as attributes; write them with :meth:`set`."""

    def __init__(self) -> None:
        self.model: Any = None
        self.selected_layer: str = ""
        self.selected_layers: list[str] = []
        #: The plan document's plain data (engine.plan.Plan.to_dict()).
        self.plan: dict[str, Any] = {}
        self.sensitivity: Any = None
        self.data: DataSpec = DataSpec()
        self.result: Any = None
        #: Slot name -> what runs there (the job's name); a slot is absent when idle.
        self.jobs: dict[str, str] = {}
        self._listeners: dict[str, list[Listener]] = {name: [] for name in FIELDS}
        self._all: list[Callable[[Change], None]] = []

    # -- observing ------------------------------------------------------------------------------
    def subscribe(self, field: str, callback: Listener) -> Callable[[], None]:
        """Call ``callback(new_value)`` after every change of `field`; returns the unsubscriber."""
        listeners = self._listeners[_known(field)]
        listeners.append(callback)
        return lambda: listeners.remove(callback) if callback in listeners else None

    def subscribe_all(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Call ``callback(Change)`` after every change of any field (the Qt bridge uses this)."""
        self._all.append(callback)
        return lambda: self._all.remove(callback) if callback in self._all else None

    # -- changing -------------------------------------------------------------------------------
    def set(self, field: str, value: Any, *, force: bool = False) -> bool:
        """Set `field`; listeners hear of it when the value changed (or with `force`).

        Returns whether it was announced."""
        old = getattr(self, _known(field))
        if not force and _same(old, value):
            return False
        setattr(self, field, value)
        self._announce(field, value, old)
        return True

    def update(self, **values: Any) -> list[str]:
        """Set several fields at once; listeners are told only after all are set, so none of
        them sees a half-made state. Returns the fields announced."""
        changed = []
        olds = {}
        for field, value in values.items():
            old = getattr(self, _known(field))
            if not _same(old, value):
                olds[field] = old
                setattr(self, field, value)
                changed.append(field)
        ordered = [field for field in FIELDS if field in changed]
        for field in ordered:
            self._announce(field, getattr(self, field), olds[field])
        return ordered

    def reset_for_model(self, model: Any) -> list[str]:
        """Make `model` current and every per-model field (:data:`PER_MODEL_FIELDS`) fresh.

        The model is announced even when it is the same object (re-opened: views rebuild);
        other fields only when they changed. Returns the fields announced, in order."""
        fresh = {field: make() for field, make in PER_MODEL_DEFAULTS.items()}
        olds = {field: getattr(self, field) for field in (*fresh, "model")}
        for field, value in fresh.items():
            setattr(self, field, value)
        self.model = model
        announced = []
        for field in FIELDS:
            if field == "model" or (field in fresh and not _same(olds[field], fresh[field])):
                announced.append(field)
                self._announce(field, getattr(self, field), olds[field])
        return announced

    def set_job(self, slot: str, name: str | None) -> None:
        """Record that `name` runs in `slot` (None: the slot is idle)."""
        jobs = dict(self.jobs)
        if name is None:
            jobs.pop(slot, None)
        else:
            jobs[slot] = name
        self.set("jobs", jobs)

    def _announce(self, field: str, value: Any, old: Any) -> None:
        for callback in list(self._listeners[field]):
            callback(value)
        change = Change(field, value, old)
        for callback in list(self._all):
            callback(change)


def _known(field: str) -> str:
    if field not in FIELDS:
        raise KeyError(f"the application state has no field {field!r}; it has {', '.join(FIELDS)}")
    return field


def _same(old: Any, new: Any) -> bool:
    if old is new:
        return True
    if isinstance(new, _VALUE_TYPES) and type(old) is type(new):
        return bool(old == new)
    return False

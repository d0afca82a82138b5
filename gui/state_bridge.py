"""The one place the Qt face hears the application state (engine.app_state) from.

:class:`StateBridge` subscribes to every change of an :class:`~engine.app_state.AppState` and
re-emits it as a Qt signal on the GUI thread: directly when the change happens there (so the
order of a model reset is kept), queued when a worker thread changed the state. Widgets connect
to these signals and never to the state's Python callbacks, so a widget destroyed by Qt simply
stops hearing (Qt drops the connection), as with every other signal.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QObject, Signal

from engine.app_state import AppState, Change


class StateBridge(QObject):
    """Qt signals for an AppState's fields; see the module docstring."""

    #: Any field: its name and new value.
    changed = Signal(str, object)
    model_changed = Signal(object)
    selected_layer_changed = Signal(str)
    selected_layers_changed = Signal(list)
    plan_changed = Signal(object)
    sensitivity_changed = Signal(object)
    data_changed = Signal(object)
    result_changed = Signal(object)
    jobs_changed = Signal(object)
    #: Every change, on its way to the GUI thread (queued only when made off it).
    _relay = Signal(object)

    def __init__(self, state: AppState, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self._relay.connect(self._deliver)
        self._unsubscribe = state.subscribe_all(self._on_change)

    def _on_change(self, change: Change) -> None:
        # An automatic connection: a direct call on the GUI thread, queued from any other.
        self._relay.emit(change)

    def _deliver(self, change: Change) -> None:
        signal: Any = getattr(self, f"{change.field}_changed")
        signal.emit(change.value)
        self.changed.emit(change.field, change.value)

    def detach(self) -> None:
        """Stop listening (the state may outlive this bridge)."""
        self._unsubscribe()

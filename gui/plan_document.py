"""The one place every plan edit in the app goes through, and the undo stack that records them.

Panels never change a :class:`~engine.plan.Plan` themselves: they call :meth:`set_layers`,
:meth:`clear_layers` or :meth:`replace`, each of which pushes one undoable command and emits
:attr:`changed` once. Each command stores the plan as plain data before and after, so undo and
redo restore it exactly, and the file saved from here replays identically in the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QUndoCommand, QUndoStack

from engine.errors import PlanError
from engine.model import Layer
from engine.plan import SECTIONS, LayerPlan, Plan

#: A section value in the plan's plain-data form: a dict of fields, None (technique off).
SectionData = Mapping[str, Any] | None


class _PlanChange(QUndoCommand):
    """Swap between two plain-data plans; merging is off so every edit is its own step."""

    def __init__(self, document: "PlanDocument", before: dict, after: dict, text: str) -> None:
        super().__init__(text)
        self._document, self._before, self._after = document, before, after

    def redo(self) -> None:
        self._document._install(self._after)

    def undo(self) -> None:
        self._document._install(self._before)


class PlanDocument(QObject):
    """The current plan, its file, and its undo history."""

    #: Emitted after every change, including undo/redo and loading a file.
    changed = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.undo_stack = QUndoStack(self)
        self._plan = Plan()
        self.path: Path | None = None
        #: Extra check every edit must pass before it reaches the stack (e.g. resolving against
        #: the loaded model's layers); raises PlanError with the one line the user sees.
        self.validator: Callable[[Plan], None] | None = None

    # -- reading ---------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The current plan. Treat it as read-only: edits go through this document."""
        return self._plan

    def to_dict(self) -> dict[str, Any]:
        return self._plan.to_dict()

    def resolve(self, layers: Iterable[Layer]) -> tuple[dict[str, LayerPlan], str | None]:
        """Each layer's effective settings, or ({}, the one-line error) when the plan is invalid."""
        try:
            return self._plan.resolve(list(layers)), None
        except PlanError as exc:
            return {}, str(exc)

    def layer_sections(self, name: str) -> dict[str, Any] | str | None:
        """The exact-name override for `name` as plain data ("keep", a dict), or None if none."""
        if name not in self._plan.layers:  # asked for every row of the table: no to_dict()
            return None
        return self.to_dict().get("layers", {}).get(name)

    # -- editing (each call is one undo step) -------------------------------------------------
    def set_layers(self, names: Iterable[str], sections: Mapping[str, SectionData] | str,
                   text: str | None = None) -> None:
        """Give `names` exact-name overrides: merge `sections` into each, or "keep" for all off.

        `sections` maps "pruning" / "quantization" / "low_rank" to a dict of fields, or to None
        to switch that technique off for these layers.
        """
        self.set_layer_sections({name: sections for name in names}, text)

    def set_layer_sections(self, edits: Mapping[str, Mapping[str, SectionData] | str],
                           text: str | None = None) -> None:
        """Like :meth:`set_layers` with settings per layer, still as one undo step (a bulk edit
        where some layers take only some of the sections)."""
        if not edits:
            return
        data = self.to_dict()
        table = data.setdefault("layers", {})
        for name, sections in edits.items():
            if sections == "keep":
                table[name] = "keep"
                continue
            current = table.get(name)
            # a kept layer stays off in the sections this edit does not name
            merged: dict[str, Any] = (dict.fromkeys(SECTIONS) if current == "keep"
                                      else dict(current or {}))
            for key, value in sections.items():
                if key not in SECTIONS:
                    raise PlanError(f"layer {name!r}: unknown plan section {key!r}")
                merged[key] = None if value is None else dict(value)
            table[name] = merged
        count = len(edits)
        label = text or f"Edit {count} layer{'s' if count > 1 else ''}"
        self._push(data, label)

    def clear_layers(self, names: Iterable[str], text: str | None = None) -> None:
        """Remove the exact-name overrides of `names`, so they follow defaults again."""
        names = [n for n in names]
        data = self.to_dict()
        table = data.get("layers", {})
        removed = [n for n in names if table.pop(n, None) is not None]
        if not removed:
            return
        if not table:
            data.pop("layers", None)
        self._push(data, text or f"Reset {len(removed)} layer{'s' if len(removed) > 1 else ''}")

    def set_defaults(self, sections: Mapping[str, SectionData], text: str = "Edit defaults"
                     ) -> None:
        data = self.to_dict()
        defaults = dict(data.get("defaults") or {})
        for key, value in sections.items():
            if value is None:
                defaults.pop(key, None)
            else:
                defaults[key] = dict(value)
        data["defaults"] = defaults
        self._push(data, text)

    def replace(self, plan: Plan | Mapping[str, Any], text: str = "Replace plan") -> None:
        """Swap in a whole plan (e.g. from automatic allocation), as one undo step."""
        data = plan.to_dict() if isinstance(plan, Plan) else dict(plan)
        Plan.from_dict(data)  # reject invalid data before it reaches the stack
        self._push(data, text)

    # -- files -------------------------------------------------------------------------------
    def load(self, path: str | Path) -> None:
        """Read a plan file; loading is itself undoable."""
        plan = Plan.load(path)
        self._push(plan.to_dict(), f"Load {Path(path).name}")
        self.path = Path(path)

    def save(self, path: str | Path | None = None) -> Path:
        target = Path(path) if path is not None else self.path
        if target is None:
            raise PlanError("the plan has no file name yet; choose one with Save As")
        self._plan.save(target)
        self.path = target
        self.undo_stack.setClean()
        return target

    # -- internals ---------------------------------------------------------------------------
    def _push(self, after: dict[str, Any], text: str) -> None:
        before = self.to_dict()
        if before == after:
            return
        plan = Plan.from_dict(after)  # a PlanError here leaves the plan and the stack untouched
        if self.validator is not None:
            self.validator(plan)
        self.undo_stack.push(_PlanChange(self, before, after, text))

    def _install(self, data: dict[str, Any]) -> None:
        self._plan = Plan.from_dict(data)
        self.changed.emit()

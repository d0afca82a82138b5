"""The model summary strip: what the file is, how big, what Slimscope can do with it, and what
the current plan is predicted to make of it."""

from __future__ import annotations

import html
import sys

from PySide6.QtCore import QEvent, Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QHBoxLayout, QLabel, QVBoxLayout, QWidget

from engine.backends.base import RUN
from engine.model import Model, TensorSpec

from gui.capabilities import backend_summary
from gui.session import PlanState, Session
from gui.text import human_bytes, human_count
from gui.theme import BAD, BADGE_COLORS, GOOD, WARNING, look_of, status_color


def _spec_text(spec: TensorSpec) -> str:
    dims = "×".join("?" if d is None else str(d) for d in spec.shape)
    return f"{spec.name} [{dims}]"


def summary_facts(model: Model) -> list[str]:
    """The summary line's parts, in reading order; unknown figures are left out, not guessed."""
    facts = [
        f"{human_count(model.params)} params",
        f"{human_bytes(model.nbytes)} weights",
    ]
    if model.file_bytes:
        facts.append(f"{human_bytes(model.file_bytes)} file")
    if model.macs is not None:
        facts.append(f"{human_count(model.macs)} MACs")
    facts.append(f"{len(model.layers)} layers")
    if model.inputs:
        facts.append("in: " + ", ".join(_spec_text(spec) for spec in model.inputs))
    return facts


def capability_notes(model: Model) -> list[str]:
    """The adapter's notes; what the file can and cannot do is the badge's (its backend's)."""
    return list(model.notes)


class ModelSummary(QWidget):
    """A title, a facts line and the file's notes; hidden parts shrink away."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.name_label = QLabel()
        font = self.name_label.font()
        font.setPointSizeF(font.pointSizeF() * 1.25)
        font.setBold(True)
        self.name_label.setFont(font)
        self.name_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.format_badge = QLabel()
        self.format_badge.setObjectName("format-badge")
        self.format_badge.setToolTip("File format, detected from the file's content")
        self.capability_badge = QLabel()
        self.capability_badge.setObjectName("capability-badge")
        self.facts_label = QLabel()
        self.facts_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.plan_label = QLabel()
        self.plan_label.setObjectName("plan-totals")
        self.plan_label.setTextFormat(Qt.TextFormat.RichText)
        self.plan_label.setToolTip("Predicted from the plan without compressing; Compression › Run measures it")
        self.notes_label = QLabel()
        self.notes_label.setWordWrap(True)
        self.notes_label.setTextFormat(Qt.TextFormat.RichText)
        self.notes_label.setForegroundRole(QPalette.ColorRole.PlaceholderText)

        top = QHBoxLayout()
        top.setSpacing(10)
        top.addWidget(self.name_label)
        top.addWidget(self.format_badge)
        top.addWidget(self.capability_badge)
        top.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 6)
        layout.setSpacing(3)
        layout.addLayout(top)
        layout.addWidget(self.facts_label)
        layout.addWidget(self.plan_label)
        layout.addWidget(self.notes_label)
        self._style_badge()
        session.model_changed.connect(self.show_model)
        session.plan_state_changed.connect(self.show_plan)
        self.show_model(session.model)
        self.show_plan(session.plan_state)

    def _style_badge(self) -> None:
        palette = self.palette()
        badge = "border-radius: 4px; padding: 1px 7px;"
        self.format_badge.setStyleSheet(
            f"color: {palette.color(QPalette.ColorRole.HighlightedText).name()};"
            f" background: {palette.color(QPalette.ColorRole.Highlight).name()}; {badge}"
        )
        colors = BADGE_COLORS[look_of(palette)]
        self._badge_css = {runs: f"color: {colors[meaning][0]}; background: {colors[meaning][1]}; {badge}"
                           for runs, meaning in ((True, GOOD), (False, WARNING))}
        model = self.session.model if hasattr(self, "session") else None
        if model is not None:
            self.capability_badge.setStyleSheet(self._badge_css[model.can(RUN)])

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange and hasattr(self, "capability_badge"):
            self._style_badge()  # the badges' colours follow the look
            self.show_plan(self.session.plan_state)

    def show_model(self, model: Model | None) -> None:
        if model is None:
            self.name_label.setText("No model loaded")
            self.format_badge.hide()
            self.capability_badge.hide()
            self.facts_label.setText("Open a file with File › Open, or drop it on this window.")
            self.notes_label.hide()
            return
        self.name_label.setText(model.path.name)
        self.name_label.setToolTip(str(model.path))
        self.format_badge.setText(model.format)
        self.format_badge.show()
        badge, tip = backend_summary(model)
        self.capability_badge.setText(badge)
        self.capability_badge.setToolTip(tip)
        self.capability_badge.setStyleSheet(self._badge_css[model.can(RUN)])
        self.capability_badge.show()
        self.facts_label.setText("  ·  ".join(summary_facts(model)))
        notes = capability_notes(model)
        self.notes_label.setText("<br>".join("• " + html.escape(note, quote=False) for note in notes))
        self.notes_label.setVisible(bool(notes))

    def show_plan(self, state: PlanState) -> None:
        """Plan totals: layers it changes, predicted size and ratio (or why it does not fit)."""
        if self.session.model is None:
            self.plan_label.hide()
            return
        if state.error:
            self.plan_label.setText(f"<span style='color:{status_color(BAD, self.palette())}'>Plan does not fit: "
                                    f"{html.escape(state.error)}</span>")
        elif state.prediction is not None:
            prediction = state.prediction
            changed = sum(1 for layer_plan in state.layers.values() if not layer_plan.keep)
            text = (f"Plan: {changed} of {len(state.layers)} layers compressed  ·  predicted "
                    f"<b>{human_bytes(prediction.bytes_after)}</b> ({prediction.ratio:.3f}×)")
            if state.metric is not None:
                text += f"  ·  {html.escape(state.metric.name)} ≈ {state.metric.value:.4f}"
            self.plan_label.setText(text)
        self.plan_label.show()

    def text(self) -> str:
        """Everything the strip says, as plain text (for tests and accessibility)."""
        parts = [self.name_label.text(), self.format_badge.text(), self.capability_badge.text(), self.facts_label.text()]
        if self.plan_label.isVisible() or self.plan_label.text():
            parts.append(self.plan_label.text())
        if self.notes_label.isVisible() or self.notes_label.text():
            parts.append(self.notes_label.text().replace("<br>", "\n"))
        return "\n".join(parts)


def _main(argv: list[str]) -> int:
    from gui.preview import preview

    return preview(lambda session: ModelSummary(session), argv, title="Model summary")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

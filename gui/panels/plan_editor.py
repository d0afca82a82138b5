"""The plan editor: what happens to the selected layers, the defaults, and recovery fine-tuning.

Every control writes through the session's :class:`~gui.plan_document.PlanDocument` (one undo
step per edit) and is then redrawn from the resolved plan, never from its own state, so undo,
a loaded file or an automatic allocation show up here the same way as a click. A value the
engine refuses leaves the plan untouched and shows the engine's one-line :class:`PlanError`
under the controls. The footer predicts the compressed size (and the metric, when a predictor
from sensitivity results is installed) as the user edits.

Each method carries a one-line explanation under its combo box: the error-compensating ones
(OBS pruning, GPTQ with act-order and damping) and bias correction read calibration data
through hooks on a torch module, so a model without one offers them disabled, with the
engine's reason.

Run alone: ``python -m gui.panels.plan_editor MODEL [--layer NAME] [--screenshot PNG]``.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from PySide6.QtCore import QEvent, QSignalBlocker, Qt, Signal
from PySide6.QtGui import QFont, QPalette
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListView,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QStyle,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from engine.errors import PlanError
from engine.model import Model
from engine.finetune import OPTIMIZERS, RecoveryConfig
from engine.plan import (BIAS_CORRECTION, DEFAULT_DAMPING, GRANULARITIES, PRUNING_METHODS,
                         QUANTIZATION_METHODS, RANGE_METHODS, SECTIONS, STATISTICS_METHODS,
                         LayerPlan, Plan, Quantization)
from engine.schedules import OPTIONS as SCHEDULES

from gui import capabilities
from gui.plan_view import action_text, section_applies
from gui.session import PlanState, Session
from gui.theme import BAD, WARNING, status_color
from gui.text import human_bytes

SectionData = dict[str, Any] | None

METHOD_LABELS = {
    "magnitude": "Magnitude (per layer)",
    "magnitude-global": "Magnitude (global threshold)",
    "gradient": "Gradient",
    "taylor": "Taylor",
    "nm": "N:M semi-structured",
    "structured": "Channels (structured)",
    "obs": "OBS (compensated)",
}
#: One line per pruning method, shown under the method while it is selected.
METHOD_NOTES = {
    "magnitude": "Remove each layer's smallest weights",
    "magnitude-global": "Remove the smallest weights of all layers, by one threshold",
    "gradient": "Remove the weights with the smallest gradients on calibration data",
    "taylor": "Remove the weights with the smallest |weight × gradient| on calibration data",
    "nm": "Keep at most N non-zeros in every M inputs (sparse tensor cores)",
    "structured": "Remove whole output channels: the layer itself gets smaller",
    "obs": "OBS: prune and compensate the remaining weights from calibration data",
}
QUANT_METHOD_LABELS = {"rtn": "Round to nearest", "gptq": "GPTQ (compensated)",
                       "awq": "AWQ (activation-aware)"}
QUANT_METHOD_NOTES = {
    "rtn": "Round each weight to its nearest code",
    "gptq": "GPTQ: quantize column by column, compensating the error from calibration data",
    "awq": "AWQ: scale each input channel by its activation size before rounding (calibration data)",
}
BIAS_NOTE = "Shift the bias so the layer's mean output on calibration data stays the same"
#: What the error-compensating methods need: layer inputs on calibration data (torch hooks or
#: ONNX Runtime's intermediate outputs); bias correction is built for torch modules only.
STATISTICS_NEED = capabilities.STATISTICS_NEED
BIAS_NEED = capabilities.BIAS_NEED
BIT_CHOICES = ("8", "7", "6", "5", "4", "3", "2", "fp16", "bf16")
NM_PATTERNS = ("2:4", "1:4", "4:8", "1:2")
#: The pattern choice that makes OBS prune by an amount instead (hidden for plain N:M).
UNSTRUCTURED = "unstructured"
SECTION_LABELS = {"pruning": "pruning", "quantization": "quantization", "low_rank": "low rank"}

#: Whole-layer choices offered in the table's "planned action" cell: label, sections.
Q8 = {"bits": 8, "symmetric": True, "granularity": "per-channel", "range": "minmax"}
PRESETS: tuple[tuple[str, dict[str, SectionData] | str], ...] = (
    ("keep", "keep"),
    ("int8/ch", {"pruning": None, "quantization": Q8, "low_rank": None}),
    ("prune 50% · int8/ch", {"pruning": {"method": "magnitude", "amount": 0.5}, "quantization": Q8,
                             "low_rank": None}),
    ("prune 75% · int8/ch", {"pruning": {"method": "magnitude", "amount": 0.75}, "quantization": Q8,
                             "low_rank": None}),
    ("2:4 · int8/ch", {"pruning": {"method": "nm", "pattern": "2:4"}, "quantization": Q8,
                       "low_rank": None}),
    ("int4 g32", {"pruning": None, "low_rank": None, "quantization": {
        "bits": 4, "symmetric": True, "granularity": "group", "group_size": 32, "range": "mse"}}),
    ("fp16", {"pruning": None, "quantization": {"bits": "fp16"}, "low_rank": None}),
)
FOLLOW_DEFAULTS = "follow defaults"


def describe_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{len(names)} layers"


def _section_dicts(layer_plan: LayerPlan | None) -> dict[str, Any]:
    """The resolved layer's sections as plan data, with its bias-correction switch."""
    if layer_plan is None:
        return dict.fromkeys(SECTIONS)
    data: dict[str, Any] = {key: (None if (section := getattr(layer_plan, key)) is None
                                  else section.to_dict()) for key in SECTIONS}
    data[BIAS_CORRECTION] = layer_plan.bias_correction
    return data


class SectionsForm(QWidget):
    """Controls for the three plan sections; emits ``edited(key, data or None)`` per change.

    :meth:`show_sections` redraws without emitting, so a redraw never echoes back as an edit.
    """

    edited = Signal(str, object)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._updating = False
        #: Section key -> the engine's why-not line, for sections the model cannot do.
        self.blocked: dict[str, str] = {}

        self.prune_box = self._box("Prune", "Remove weights: they become exact zeros")
        self.method_combo = QComboBox()
        for method in PRUNING_METHODS:
            self.method_combo.addItem(METHOD_LABELS.get(method, method), method)
        self.amount_spin = self._spin(0.0, 99.0, 5.0, " %", decimals=1)
        self.amount_spin.setValue(50.0)
        self.amount_spin.setToolTip("Fraction of weights removed (channels, for the structured method)")
        self.pattern_combo = QComboBox(editable=True)
        self.pattern_combo.addItems((UNSTRUCTURED, *NM_PATTERNS))
        self.pattern_combo.setCurrentIndex(0)  # plain N:M moves on to "2:4" (see _update_rows)
        self.pattern_combo.setToolTip("Keep at most N non-zeros in every M consecutive inputs "
                                      f"(OBS: “{UNSTRUCTURED}” prunes by the amount instead)")
        for index, method in enumerate(PRUNING_METHODS):
            self.method_combo.setItemData(index, METHOD_NOTES.get(method, ""), Qt.ItemDataRole.WhatsThisRole)
        self.method_note = self._note()
        self.prune_form = QFormLayout(self.prune_box)
        self.prune_form.addRow("Method", self.method_combo)
        self.prune_form.addRow(self.method_note)
        self.prune_form.addRow("Amount", self.amount_spin)
        self.prune_form.addRow("Pattern N:M", self.pattern_combo)

        self.quant_box = self._box("Quantize weights", "Store weights as low-bit integer codes or 16-bit floats")
        self.quant_method_combo = QComboBox()
        for method in QUANTIZATION_METHODS:
            self.quant_method_combo.addItem(QUANT_METHOD_LABELS.get(method, method), method)
            self.quant_method_combo.setItemData(self.quant_method_combo.count() - 1,
                                                QUANT_METHOD_NOTES.get(method, ""),
                                                Qt.ItemDataRole.WhatsThisRole)
        self.quant_method_note = self._note()
        self.act_order_check = QCheckBox("Act-order (busiest inputs first)")
        self.act_order_check.setToolTip("GPTQ rounds the columns whose inputs are largest first, "
                                        "while the most columns are left to compensate")
        self.damping_spin = self._spin(0.01, 100.0, 0.5, " %", decimals=2)
        self.damping_spin.setValue(100 * DEFAULT_DAMPING)
        self.damping_spin.setToolTip("Added to the Hessian's diagonal, as a share of its mean: "
                                     "more is steadier, less is more exact")
        self.bits_combo = QComboBox()
        for choice in BIT_CHOICES:
            self.bits_combo.addItem(f"{choice} bits" if choice.isdigit() else choice, choice)
        self.granularity_combo = QComboBox()
        self.granularity_combo.addItems(GRANULARITIES)
        self.granularity_combo.setCurrentText(Quantization().granularity)
        self.granularity_combo.setToolTip("One scale for the tensor, per output channel, or per group of inputs")
        self.group_spin = QSpinBox(minimum=1, maximum=65536, value=32)
        self.group_spin.setKeyboardTracking(False)
        self.group_spin.setToolTip("Inputs sharing one scale; must divide the layer's row length")
        self.symmetric_check = QCheckBox("Symmetric (zero point 0)")
        self.symmetric_check.setChecked(Quantization().symmetric)
        self.range_combo = QComboBox()
        self.range_combo.addItems(RANGE_METHODS)
        self.range_combo.setToolTip("minmax: each scale covers its extremes; mse: clip outliers for finer steps")
        self.quant_form = QFormLayout(self.quant_box)
        self.quant_form.addRow("Method", self.quant_method_combo)
        self.quant_form.addRow(self.quant_method_note)
        self.quant_form.addRow("Bits", self.bits_combo)
        self.quant_form.addRow("Granularity", self.granularity_combo)
        self.quant_form.addRow("Group size", self.group_spin)
        self.quant_form.addRow("", self.symmetric_check)
        self.quant_form.addRow("Range", self.range_combo)
        self.quant_form.addRow("", self.act_order_check)
        self.quant_form.addRow("Damping", self.damping_spin)

        self.rank_box = self._box("Low rank", "Split the layer into two thinner ones by truncated SVD")
        self.rank_mode = QComboBox()
        self.rank_mode.addItem("Fixed rank", "rank")
        self.rank_mode.addItem("Keep energy", "energy")
        self.rank_spin = QSpinBox(minimum=1, maximum=1_000_000, value=32)
        self.rank_spin.setKeyboardTracking(False)
        self.energy_spin = self._spin(1.0, 100.0, 1.0, " %", decimals=1)
        self.energy_spin.setValue(90.0)
        self.energy_spin.setToolTip("Smallest rank keeping this share of the squared singular values")
        self.rank_form = QFormLayout(self.rank_box)
        self.rank_form.addRow("Mode", self.rank_mode)
        self.rank_form.addRow("Rank", self.rank_spin)
        self.rank_form.addRow("Energy", self.energy_spin)

        for form in (self.prune_form, self.quant_form, self.rank_form):
            form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.bias_check = QCheckBox("Bias correction")
        self.bias_check.setToolTip(f"{BIAS_NOTE}, after pruning or quantization (needs calibration data)")
        self.bias_note = self._note(BIAS_NOTE)
        bias_box = QWidget()
        bias_layout = QVBoxLayout(bias_box)
        bias_layout.setContentsMargins(10, 2, 0, 0)
        bias_layout.setSpacing(0)
        bias_layout.addWidget(self.bias_check)
        bias_layout.addWidget(self.bias_note)
        self._bias_tip = self.bias_check.toolTip()

        for combo in (self.method_combo, self.pattern_combo, self.bits_combo, self.granularity_combo,
                      self.range_combo, self.rank_mode, self.quant_method_combo):
            # Every item readable: the dock is held as wide as the longest one ("Magnitude (per
            # layer)" was cut to "Magnitude" when the combos could shrink to 8 characters).
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for box in (self.prune_box, self.quant_box, self.rank_box):
            layout.addWidget(box)
        layout.addWidget(bias_box)

        self._connect("pruning", self.prune_box.toggled, self.method_combo.currentIndexChanged,
                      self.amount_spin.valueChanged, self.pattern_combo.currentTextChanged)
        self._connect("quantization", self.quant_box.toggled, self.bits_combo.currentIndexChanged,
                      self.granularity_combo.currentIndexChanged, self.group_spin.valueChanged,
                      self.symmetric_check.toggled, self.range_combo.currentIndexChanged,
                      self.quant_method_combo.currentIndexChanged, self.act_order_check.toggled,
                      self.damping_spin.valueChanged)
        self._connect("low_rank", self.rank_box.toggled, self.rank_mode.currentIndexChanged,
                      self.rank_spin.valueChanged, self.energy_spin.valueChanged)
        self._connect(BIAS_CORRECTION, self.bias_check.toggled)
        self._update_rows()

    @staticmethod
    def _note(text: str = "") -> QLabel:
        """A one-line explanation under a control, in the quiet placeholder colour."""
        note = QLabel(text)
        note.setWordWrap(True)
        note.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        small = QFont(note.font())
        small.setPointSizeF(small.pointSizeF() * 0.92)
        note.setFont(small)
        return note

    @staticmethod
    def _box(title: str, tip: str) -> QGroupBox:
        box = QGroupBox(title)
        box.setCheckable(True)
        box.setToolTip(tip)
        box.setProperty("plain_tip", tip)
        return box

    def set_model(self, model: Model | None) -> None:
        """Offer only what `model`'s backend can do: pruning methods and low rank it cannot are
        disabled with the engine's one-line reason as their tooltip."""
        def gate_items(combo: QComboBox, need_of: Any) -> None:
            items = combo.model()
            for index in range(combo.count()):
                method = combo.itemData(index)
                need = need_of(method)
                reason = capabilities.why_not(model, need) if model is not None and need else None
                item = items.item(index)  # type: ignore[attr-defined]
                item.setEnabled(reason is None)
                item.setToolTip(reason or combo.itemData(index, Qt.ItemDataRole.WhatsThisRole) or "")
                item.setStatusTip(reason or "")

        gate_items(self.method_combo, lambda method: capabilities.pruning_method_need(method)
                   or (STATISTICS_NEED if method in STATISTICS_METHODS else None))
        gate_items(self.quant_method_combo,
                   lambda method: STATISTICS_NEED if method in STATISTICS_METHODS else None)
        self.blocked = {}
        reason = capabilities.why_not(model, BIAS_NEED) if model is not None else None
        if reason is not None:
            self.blocked[BIAS_CORRECTION] = reason
        reason = capabilities.why_not(model, capabilities.LOW_RANK_NEED) if model is not None else None
        if reason is not None:
            self.blocked["low_rank"] = reason

    @staticmethod
    def _spin(low: float, high: float, step: float, suffix: str, decimals: int) -> QDoubleSpinBox:
        spin = QDoubleSpinBox(minimum=low, maximum=high, singleStep=step, suffix=suffix, decimals=decimals)
        spin.setKeyboardTracking(False)  # one edit per committed value, not per keystroke
        return spin

    def _connect(self, key: str, *signals: Any) -> None:
        for signal in signals:
            signal.connect(lambda *_args, key=key: self._changed(key))

    def _changed(self, key: str) -> None:
        self._update_rows()
        if not self._updating:
            self.edited.emit(key, self.section_data(key))

    def _update_rows(self) -> None:
        method = self.method_combo.currentData()
        # OBS prunes by an amount or, like N:M, by a pattern: it offers the pattern row, whose
        # "unstructured" choice (not offered for plain N:M) brings back the amount
        if method == "nm" and self.pattern_combo.currentText().strip() == UNSTRUCTURED:
            with QSignalBlocker(self.pattern_combo):
                self.pattern_combo.setCurrentIndex(1)
        view = self.pattern_combo.view()
        if isinstance(view, QListView):
            view.setRowHidden(0, method == "nm")
        by_pattern = method == "nm" or (method == "obs" and self._obs_pattern() is not None)
        self.prune_form.setRowVisible(self.amount_spin, not by_pattern)
        self.prune_form.setRowVisible(self.pattern_combo, method in ("nm", "obs"))
        self.method_note.setText(METHOD_NOTES.get(method, ""))
        is_float = not str(self.bits_combo.currentData()).isdigit()
        for widget in (self.granularity_combo, self.symmetric_check, self.range_combo,
                       self.quant_method_combo):
            # an unchecked box disables its children itself; enabling one here would undo that
            widget.setEnabled(not is_float and self.quant_box.isChecked())
        self.quant_form.setRowVisible(self.group_spin, self.granularity_combo.currentText() == "group" and not is_float)
        quant_method = self.quant_method_combo.currentData() if not is_float else "rtn"
        self.quant_method_note.setText(QUANT_METHOD_NOTES.get(quant_method, "") if not is_float
                                       else "16-bit floats are a cast: no rounding method")
        for widget in (self.act_order_check, self.damping_spin):
            self.quant_form.setRowVisible(widget, quant_method == "gptq")
        by_rank = self.rank_mode.currentData() == "rank"
        self.rank_form.setRowVisible(self.rank_spin, by_rank)
        self.rank_form.setRowVisible(self.energy_spin, not by_rank)

    # -- reading and writing ---------------------------------------------------------------------
    def section_data(self, key: str) -> SectionData | bool:
        """The section as plan data from the controls, or None when its box is unchecked
        (for BIAS_CORRECTION: whether the box is checked)."""
        if key == BIAS_CORRECTION:
            return self.bias_check.isChecked()
        if key == "pruning":
            if not self.prune_box.isChecked():
                return None
            method = self.method_combo.currentData()
            if method == "nm":
                return {"method": "nm", "pattern": self.pattern_combo.currentText().strip()}
            if method == "obs" and (pattern := self._obs_pattern()) is not None:
                return {"method": "obs", "pattern": pattern}
            return {"method": method, "amount": round(self.amount_spin.value() / 100, 4)}
        if key == "quantization":
            if not self.quant_box.isChecked():
                return None
            bits = str(self.bits_combo.currentData())
            if not bits.isdigit():
                return {"bits": bits}
            data: dict[str, Any] = {"bits": int(bits), "symmetric": self.symmetric_check.isChecked(),
                                    "granularity": self.granularity_combo.currentText(),
                                    "range": self.range_combo.currentText()}
            if data["granularity"] == "group":
                data["group_size"] = self.group_spin.value()
            if self.quant_method_combo.currentData() == "gptq":
                data.update(method="gptq", act_order=self.act_order_check.isChecked(),
                            damping=round(self.damping_spin.value() / 100, 6))
            elif self.quant_method_combo.currentData() == "awq":
                data["method"] = "awq"
            return data
        if not self.rank_box.isChecked():
            return None
        if self.rank_mode.currentData() == "rank":
            return {"rank": self.rank_spin.value()}
        return {"energy": round(self.energy_spin.value() / 100, 4)}

    def _obs_pattern(self) -> str | None:
        """The N:M pattern OBS should keep, or None when it prunes by an amount."""
        text = self.pattern_combo.currentText().strip()
        return None if text in (UNSTRUCTURED, "") else text

    def show_sections(self, sections: Mapping[str, SectionData], available: set[str]) -> None:
        """Show `sections` (plan data, None = off); boxes not in `available` are disabled."""
        self._updating = True
        try:
            pruning = sections.get("pruning")
            self.prune_box.setChecked(pruning is not None)
            if pruning is not None:
                self.method_combo.setCurrentIndex(self.method_combo.findData(pruning.get("method", "magnitude")))
                if pruning.get("amount") is not None:
                    self.amount_spin.setValue(100 * float(pruning["amount"]))
                if pruning.get("pattern"):
                    self.pattern_combo.setCurrentText(str(pruning["pattern"]))
                elif pruning.get("method") == "obs":
                    self.pattern_combo.setCurrentText(UNSTRUCTURED)
            quant = sections.get("quantization")
            self.quant_box.setChecked(quant is not None)
            if quant is not None:
                self.bits_combo.setCurrentIndex(self.bits_combo.findData(str(quant.get("bits", 8))))
                if "granularity" in quant:
                    self.granularity_combo.setCurrentText(quant["granularity"])
                if quant.get("group_size"):
                    self.group_spin.setValue(int(quant["group_size"]))
                self.symmetric_check.setChecked(bool(quant.get("symmetric", True)))
                self.range_combo.setCurrentText(quant.get("range", "minmax"))
                method = quant.get("method", "rtn")
                self.quant_method_combo.setCurrentIndex(max(self.quant_method_combo.findData(method), 0))
                if method == "gptq":
                    self.act_order_check.setChecked(bool(quant.get("act_order", False)))
                    self.damping_spin.setValue(100 * float(quant.get("damping", DEFAULT_DAMPING)))
            low_rank = sections.get("low_rank")
            self.rank_box.setChecked(low_rank is not None)
            if low_rank is not None:
                by_rank = low_rank.get("rank") is not None
                self.rank_mode.setCurrentIndex(0 if by_rank else 1)
                if by_rank:
                    self.rank_spin.setValue(int(low_rank["rank"]))
                else:
                    self.energy_spin.setValue(100 * float(low_rank["energy"]))
            for key, box in (("pruning", self.prune_box), ("quantization", self.quant_box),
                             ("low_rank", self.rank_box)):
                reason = self.blocked.get(key)
                # a section the model cannot do stays switchable off while the plan has it on
                box.setEnabled(key in available and (reason is None or box.isChecked()))
                box.setToolTip(reason or box.property("plain_tip"))
                box.setStatusTip(reason or "")
            self.bias_check.setChecked(bool(sections.get(BIAS_CORRECTION, False)))
            reason = self.blocked.get(BIAS_CORRECTION)
            self.bias_check.setEnabled(bool(available) and (reason is None or self.bias_check.isChecked()))
            self.bias_check.setToolTip(reason or self._bias_tip)
            self.bias_check.setStatusTip(reason or "")
            self._update_rows()
        finally:
            self._updating = False


class RecoveryForm(QGroupBox):
    """The plan's ``recovery`` section; each change is validated by RecoveryConfig.from_dict.

    Fields the form does not show (momentum, weight decay, schedule options, seed…) are kept as
    the plan has them.
    """

    #: The new recovery data (None = off); the editor validates and stores it.
    edited = Signal(object)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Fine-tune after compression", parent)
        self.setCheckable(True)
        self.setChecked(False)
        self.setToolTip("Distil from the original model so the compressed one wins back accuracy; "
                        "pruned weights stay zero and quantized weights stay on their grid")
        self._updating = False
        self._base: dict[str, Any] = {}
        defaults = RecoveryConfig()
        self.steps_spin = QSpinBox(minimum=1, maximum=10_000_000, value=defaults.steps or 500)
        self.batch_spin = QSpinBox(minimum=1, maximum=65536, value=defaults.batch_size)
        self.optimizer_combo = QComboBox()
        self.optimizer_combo.addItems(OPTIMIZERS)
        self.lr_spin = QDoubleSpinBox(minimum=1e-6, maximum=10.0, decimals=6, singleStep=1e-4, value=defaults.lr)
        self.schedule_combo = QComboBox()
        self.schedule_combo.addItems(list(SCHEDULES))
        self.temperature_spin = QDoubleSpinBox(minimum=0.1, maximum=100.0, decimals=1, singleStep=0.5,
                                               value=defaults.temperature)
        self.temperature_spin.setToolTip("Softens both models' outputs for distillation")
        self.alpha_spin = QDoubleSpinBox(minimum=0.0, maximum=1.0, decimals=2, singleStep=0.05, value=defaults.alpha)
        self.alpha_spin.setToolTip("Weight of the label loss; the rest goes to distillation")
        self.l1_spin = QDoubleSpinBox(minimum=0.0, maximum=100.0, decimals=5, singleStep=1e-4, value=defaults.l1)
        self.l1_spin.setToolTip("Proximal L1 strength: makes more weights exactly zero while training")
        self.eval_spin = QSpinBox(minimum=0, maximum=1_000_000, value=defaults.eval_every, specialValueText="at the end")
        self.eval_spin.setToolTip("Evaluate (and keep the best state) every this many steps")
        self.gradual_box = QGroupBox("Gradual pruning")
        self.gradual_box.setCheckable(True)
        self.gradual_box.setChecked(False)
        self.gradual_box.setToolTip("Raise sparsity along a cubic schedule while training (Zhu & Gupta 2017)")
        self.final_spin = QDoubleSpinBox(minimum=0.0, maximum=99.0, decimals=1, singleStep=5.0, value=50.0, suffix=" %")
        self.start_spin = QSpinBox(minimum=0, maximum=10_000_000, value=0)
        self.end_spin = QSpinBox(minimum=1, maximum=10_000_000, value=400)
        self.every_spin = QSpinBox(minimum=1, maximum=1_000_000, value=10)
        gradual_form = QFormLayout(self.gradual_box)
        gradual_form.addRow("Final sparsity", self.final_spin)
        gradual_form.addRow("From step", self.start_spin)
        gradual_form.addRow("To step", self.end_spin)
        gradual_form.addRow("Every", self.every_spin)

        form = QFormLayout(self)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Optimizer", self.optimizer_combo)
        form.addRow("Learning rate", self.lr_spin)
        form.addRow("Schedule", self.schedule_combo)
        form.addRow("Temperature", self.temperature_spin)
        form.addRow("Label weight α", self.alpha_spin)
        form.addRow("L1 strength", self.l1_spin)
        form.addRow("Evaluate every", self.eval_spin)
        form.addRow(self.gradual_box)

        spins = (self.steps_spin, self.batch_spin, self.lr_spin, self.temperature_spin, self.alpha_spin,
                 self.l1_spin, self.eval_spin, self.final_spin, self.start_spin, self.end_spin, self.every_spin)
        for spin in spins:
            spin.setKeyboardTracking(False)
            spin.valueChanged.connect(self._changed)
        for combo in (self.optimizer_combo, self.schedule_combo):
            combo.currentIndexChanged.connect(self._changed)
        self.toggled.connect(self._changed)
        self.gradual_box.toggled.connect(self._changed)
        self._tip = self.toolTip()
        #: The engine's why-not line when the model cannot be fine-tuned, else None.
        self.blocked: str | None = None

    def set_model(self, model: Model | None) -> None:
        """Fine-tuning needs a model the backend can train; otherwise say why, in one line."""
        self.blocked = capabilities.why_not(model, capabilities.RECOVERY_NEED) if model is not None else None
        self._gate()

    def _gate(self) -> None:
        # switched on in a loaded plan, it stays switchable off; otherwise it cannot be switched on
        self.setEnabled(self.blocked is None or self.isChecked())
        self.setToolTip(self.blocked or self._tip)
        self.setStatusTip(self.blocked or "")

    def data(self) -> dict[str, Any] | None:
        """The recovery section the controls describe, on top of the fields they do not show."""
        if not self.isChecked():
            return None
        data = dict(self._base)
        data.pop("epochs", None)
        schedule = dict(data.get("schedule") or {})
        if schedule.get("name") != self.schedule_combo.currentText():
            schedule = {"name": self.schedule_combo.currentText()}
        data.update(
            steps=self.steps_spin.value(), batch_size=self.batch_spin.value(),
            optimizer=self.optimizer_combo.currentText(), lr=self.lr_spin.value(), schedule=schedule,
            temperature=self.temperature_spin.value(), alpha=self.alpha_spin.value(),
            l1=self.l1_spin.value(), eval_every=self.eval_spin.value(),
        )
        if self.gradual_box.isChecked():
            data["gradual"] = {"final_sparsity": round(self.final_spin.value() / 100, 4),
                               "start_step": self.start_spin.value(), "end_step": self.end_spin.value(),
                               "frequency": self.every_spin.value()}
        else:
            data.pop("gradual", None)
        return data

    def show_recovery(self, data: Mapping[str, Any] | None) -> None:
        self._updating = True
        try:
            self._base = dict(data or {})
            self.setChecked(data is not None)
            try:
                config = RecoveryConfig.from_dict(dict(data)) if data is not None else RecoveryConfig()
            except PlanError:
                config = RecoveryConfig()  # the error shows when the plan is used; keep the form usable
            self.steps_spin.setValue(config.steps or self.steps_spin.value())
            self.batch_spin.setValue(config.batch_size)
            self.optimizer_combo.setCurrentText(config.optimizer)
            self.lr_spin.setValue(config.lr)
            self.schedule_combo.setCurrentText(config.schedule["name"])
            self.temperature_spin.setValue(config.temperature)
            self.alpha_spin.setValue(config.alpha)
            self.l1_spin.setValue(config.l1)
            self.eval_spin.setValue(config.eval_every)
            gradual = config.gradual
            self.gradual_box.setChecked(gradual is not None)
            if gradual is not None:
                self.final_spin.setValue(100 * gradual.final_sparsity)
                self.start_spin.setValue(gradual.start_step)
                self.end_spin.setValue(gradual.end_step)
                self.every_spin.setValue(gradual.frequency)
            self._gate()
        finally:
            self._updating = False

    def _changed(self, *_args: object) -> None:
        if not self._updating:
            self.edited.emit(self.data())


class PlanEditor(QWidget):
    """Tabs for the selected layers, the defaults and recovery, an error line and the forecast."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.document = session.plan_document

        # -- selected layers --
        self.target_label = QLabel()
        bold = QFont(self.target_label.font())
        bold.setBold(True)
        self.target_label.setFont(bold)
        self.target_label.setWordWrap(True)
        self.target_note = QLabel()
        self.target_note.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.target_note.setWordWrap(True)
        self.preset_combo = QComboBox()
        self.preset_combo.addItem("Apply a preset…")
        self.preset_combo.addItems(preset_labels(True))
        self.preset_combo.setToolTip("Set every technique of the selected layers at once (one undo step)")
        self.preset_combo.activated.connect(self._on_preset)
        self.layer_form = SectionsForm()
        self.layer_form.edited.connect(self._edit_layers)
        self.keep_button = QPushButton("Keep as is")
        self.keep_button.setToolTip("Switch every technique off for the selected layers")
        self.keep_button.clicked.connect(lambda: self.apply_preset("keep"))
        self.defaults_button = QPushButton("Follow defaults")
        self.defaults_button.setToolTip("Remove the selected layers' own settings")
        self.defaults_button.clicked.connect(lambda: self.apply_preset(FOLLOW_DEFAULTS))
        buttons = QHBoxLayout()
        buttons.addWidget(self.keep_button)
        buttons.addWidget(self.defaults_button)
        buttons.addStretch(1)
        layers_page = QWidget()
        layers_layout = QVBoxLayout(layers_page)
        layers_layout.addWidget(self.target_label)
        layers_layout.addWidget(self.target_note)
        layers_layout.addWidget(self.preset_combo)
        layers_layout.addWidget(self.layer_form)
        layers_layout.addLayout(buttons)
        layers_layout.addStretch(1)

        # -- defaults --
        self.defaults_form = SectionsForm()
        self.defaults_form.edited.connect(self._edit_defaults)
        defaults_note = QLabel("Every layer that can take a technique gets these settings, unless "
                               "its kind, a name pattern or the layer itself says otherwise.")
        defaults_note.setWordWrap(True)
        defaults_note.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        defaults_page = QWidget()
        defaults_layout = QVBoxLayout(defaults_page)
        defaults_layout.addWidget(defaults_note)
        defaults_layout.addWidget(self.defaults_form)
        defaults_layout.addStretch(1)

        # -- recovery --
        self.recovery_form = RecoveryForm()
        self.recovery_form.edited.connect(self._edit_recovery)
        recovery_page = QWidget()
        recovery_layout = QVBoxLayout(recovery_page)
        recovery_layout.addWidget(self.recovery_form)
        recovery_layout.addStretch(1)

        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        for page, title in ((layers_page, "Selected layers"), (defaults_page, "Defaults"),
                            (recovery_page, "Recovery")):
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QFrame.Shape.NoFrame)
            scroll.setWidget(page)
            self.tabs.addTab(scroll, title)

        self.error_label = QLabel()
        self.error_label.setObjectName("plan-error")
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.hide()

        # Parts of the plan the model's backend cannot carry out, one engine line each; Run is
        # disabled with the first of them until the plan changes or a model that can is opened.
        self.capability_label = QLabel()
        self.capability_label.setObjectName("plan-capabilities")
        self.capability_label.setWordWrap(True)
        self.capability_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.capability_label.hide()
        self._restyle()

        # Asked, without a modal box, when a newly opened model does not fit the plan.
        self.mismatch_bar = QFrame()
        self.mismatch_bar.setObjectName("plan-mismatch")
        self.mismatch_bar.setFrameShape(QFrame.Shape.StyledPanel)
        self.mismatch_label = QLabel()
        self.mismatch_label.setWordWrap(True)
        self.keep_plan_button = QPushButton("Keep plan")
        self.keep_plan_button.setToolTip("Keep editing this plan until it fits the model")
        self.keep_plan_button.clicked.connect(self.keep_mismatched_plan)
        self.discard_plan_button = QPushButton("Discard plan")
        self.discard_plan_button.setToolTip("Start from an empty plan (Edit › Undo brings it back)")
        self.discard_plan_button.clicked.connect(self.discard_mismatched_plan)
        mismatch_buttons = QHBoxLayout()
        mismatch_buttons.addStretch(1)
        mismatch_buttons.addWidget(self.keep_plan_button)
        mismatch_buttons.addWidget(self.discard_plan_button)
        mismatch_layout = QVBoxLayout(self.mismatch_bar)
        mismatch_layout.setContentsMargins(8, 6, 8, 6)
        mismatch_layout.addWidget(self.mismatch_label)
        mismatch_layout.addLayout(mismatch_buttons)
        self.mismatch_bar.hide()

        self.forecast_label = QLabel()
        self.forecast_label.setObjectName("plan-forecast")
        self.forecast_label.setWordWrap(True)
        self.forecast_label.setTextFormat(Qt.TextFormat.RichText)
        forecast = QFrame()
        forecast.setFrameShape(QFrame.Shape.StyledPanel)
        forecast_layout = QVBoxLayout(forecast)
        forecast_layout.setContentsMargins(10, 6, 10, 6)
        forecast_layout.addWidget(self.forecast_label)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self.mismatch_bar)
        layout.addWidget(self.tabs, 1)
        layout.addWidget(self.error_label)
        layout.addWidget(self.capability_label)
        layout.addWidget(forecast)

        session.model_changed.connect(self._on_model_changed)
        session.layers_selected.connect(self._on_selection)
        session.plan_state_changed.connect(self._on_plan_state)
        self._on_model_changed(session.model)
        self._on_plan_state(session.plan_state)

    def _restyle(self) -> None:
        """The error and capability lines in the look's red and amber."""
        self.error_label.setStyleSheet(f"color: {status_color(BAD, self.palette())};")
        self.capability_label.setStyleSheet(f"color: {status_color(WARNING, self.palette())};")

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange and hasattr(self, "capability_label"):
            self._restyle()

    def preferred_width(self) -> int:
        """The width that shows every tab's page whole (longest combo box item, "Symmetric
        (zero point 0)") beside a vertical scroll bar: the dock's width on a first start. A
        narrower dock scrolls sideways rather than clipping them, as it once did."""
        bar = self.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent)
        pages = [self.tabs.widget(index) for index in range(self.tabs.count())]
        widest = max(scroll.widget().minimumSizeHint().width() for scroll in pages if isinstance(scroll, QScrollArea))
        margins = self.layout().contentsMargins()
        return widest + bar + margins.left() + margins.right() + 4

    # -- the model's capabilities and a plan that does not fit ------------------------------------
    def _on_model_changed(self, model: Model | None) -> None:
        self.mismatch_bar.hide()
        for form in (self.layer_form, self.defaults_form, self.recovery_form):
            form.set_model(model)

    def ask_keep_or_discard(self) -> bool:
        """Show Keep / Discard when the plan does not fit the model just opened; True if asked."""
        model, error = self.session.model, self.session.plan_state.error
        if model is None or error is None:
            self.mismatch_bar.hide()
            return False
        self.mismatch_label.setText(f"The plan does not fit {model.path.name}: {error}")
        self.mismatch_bar.show()
        return True

    def keep_mismatched_plan(self) -> None:
        self.mismatch_bar.hide()

    def discard_mismatched_plan(self) -> None:
        self.mismatch_bar.hide()
        self.document.replace(Plan(), "Discard the plan that did not fit")

    def plan_problems(self) -> list[str]:
        """The plan's parts the model cannot do, as the engine words them (see gui.capabilities)."""
        state = self.session.plan_state
        if state.error is not None:
            return []
        return capabilities.plan_problems(self.session.model, self.document.plan, state.layers)

    # -- showing --------------------------------------------------------------------------------
    def _on_selection(self, _names: list[str]) -> None:
        self.show_error("")
        self._show_layers()

    def _on_plan_state(self, state: PlanState) -> None:
        if state.error is None:
            self.mismatch_bar.hide()
        problems = self.plan_problems()
        self.capability_label.setText("\n".join(f"Cannot run here — {line}" for line in problems))
        self.capability_label.setVisible(bool(problems))
        self._show_layers()
        self.defaults_form.show_sections(self.document.to_dict().get("defaults") or {}, set(SECTIONS))
        self.recovery_form.show_recovery(self.document.plan.recovery)
        self._show_forecast(state)

    def _show_layers(self) -> None:
        model = self.session.model
        names = self.session.selected_layers
        state = self.session.plan_state
        if model is None or not names:
            self.target_label.setText("No layer selected")
            self.target_note.setText("Select layers in the table (Ctrl- or Shift-click for several).")
            self.layer_form.show_sections(_section_dicts(None), set())
            for widget in (self.keep_button, self.defaults_button, self.preset_combo):
                widget.setEnabled(False)
            return
        first = model.layer(names[0])
        if len(names) == 1:
            self.target_label.setText(first.name)
        else:
            shown = ", ".join(names[:3]) + ("…" if len(names) > 3 else "")
            self.target_label.setText(f"{len(names)} layers: {shown}")
        own = self.document.layer_sections(first.name)
        origin = "its own settings" if own is not None else "the defaults and overrides"
        self.target_note.setText(f"{first.kind} · now {action_text(state.layers.get(first.name))} "
                                 f"· from {origin}" + (f" (showing {first.name})" if len(names) > 1 else ""))
        available = {key for key in SECTIONS
                     if any(section_applies(model.layer(name), key, None) for name in names)}
        self.layer_form.show_sections(_section_dicts(state.layers.get(first.name)), available)
        for widget in (self.keep_button, self.defaults_button, self.preset_combo):
            widget.setEnabled(True)

    def _show_forecast(self, state: PlanState) -> None:
        if self.session.model is None:
            self.forecast_label.setText("Open a model to plan its compression.")
            return
        if state.error is not None:
            self.forecast_label.setText("<b>The plan does not fit this model</b> — see the error above.")
            self.show_error(state.error)
            return
        prediction = state.prediction
        assert prediction is not None
        changed = sum(1 for layer_plan in state.layers.values() if not layer_plan.keep)
        text = (f"Predicted size <b>{human_bytes(prediction.bytes_after)}</b> "
                f"of {human_bytes(prediction.bytes_before)} "
                f"(<b>{prediction.ratio:.3f}×</b>) · {changed} of {len(state.layers)} layers compressed")
        if state.metric is not None:
            metric = state.metric
            baseline = f" (now {metric.baseline:.4f})" if metric.baseline is not None else ""
            rough = ", roughly: some settings are not on the curves" if metric.approximate else ""
            text += f"<br>Predicted {metric.name} <b>≈ {metric.value:.4f}</b>{baseline}{rough}"
        if self.document.plan.recovery:
            text += "<br>Recovery fine-tuning runs after the one-shot step."
        self.forecast_label.setText(text)

    def show_error(self, message: str) -> None:
        """The engine's one line under the controls ("" hides it)."""
        self.error_label.setText(message)
        self.error_label.setVisible(bool(message))

    # -- editing --------------------------------------------------------------------------------
    def _try(self, edit: Any, *args: Any, **kwargs: Any) -> bool:
        try:
            edit(*args, **kwargs)
        except PlanError as exc:
            self.show_error(str(exc))
            return False
        self.show_error(self.session.plan_state.error or "")
        return True

    def _edit_layers(self, key: str, data: SectionData | bool) -> None:
        model = self.session.model
        if model is None:
            return
        if key == BIAS_CORRECTION:
            names = list(self.session.selected_layers)
            if names:
                verb = "Turn on" if data else "Turn off"
                self._try(self.document.replace, with_layer_bias_correction(
                    self.document.plan, model, names, bool(data)),
                    f"{verb} bias correction for {describe_names(names)}")
            return
        names = [name for name in self.session.selected_layers
                 if section_applies(model.layer(name), key, data)]
        if not names:
            self.show_error(f"none of the selected layers can take this {SECTION_LABELS[key]} setting")
            return
        verb = f"Set {SECTION_LABELS[key]} of" if data is not None else f"Turn off {SECTION_LABELS[key]} for"
        self._try(self.document.set_layer_sections, {name: {key: data} for name in names},
                  f"{verb} {describe_names(names)}")

    def _edit_defaults(self, key: str, data: SectionData | bool) -> None:
        if key == BIAS_CORRECTION:
            plan = self.document.to_dict()
            defaults = dict(plan.get("defaults") or {})
            if data:
                defaults[BIAS_CORRECTION] = True
            else:
                defaults.pop(BIAS_CORRECTION, None)
            plan["defaults"] = defaults
            self._try(self.document.replace, plan,
                      f"{'Turn on' if data else 'Turn off'} default bias correction")
            return
        verb = "Set default" if data is not None else "Turn off default"
        self._try(self.document.set_defaults, {key: data}, f"{verb} {SECTION_LABELS[key]}")

    def _edit_recovery(self, data: dict[str, Any] | None) -> None:
        if data is not None:
            try:
                RecoveryConfig.from_dict(dict(data))
            except PlanError as exc:
                self.show_error(str(exc))
                return
        plan = self.document.to_dict()
        plan.pop("recovery", None)
        if data is not None:
            plan["recovery"] = data
        self._try(self.document.replace, plan, "Edit recovery settings" if data else "Turn off recovery")

    def _on_preset(self, index: int) -> None:
        if index > 0:
            self.apply_preset(self.preset_combo.itemText(index))
        self.preset_combo.setCurrentIndex(0)

    def apply_preset(self, label: str, names: list[str] | None = None) -> bool:
        """Apply one of :data:`PRESETS` (or "follow defaults") to `names` (default: the selection)."""
        model = self.session.model
        names = list(names if names is not None else self.session.selected_layers)
        if model is None or not names:
            return False
        return self._try(apply_preset, self.session, label, names)


def with_layer_bias_correction(plan: Plan, model: Model, names: list[str], on: bool) -> dict[str, Any]:
    """`plan` as data with bias correction switched on or off for `names` by their own entries.

    Switching off removes the layer's own switch when the rest of the plan then leaves it off
    (no clutter of ``bias_correction: false``), and writes false where defaults, kinds or
    patterns would switch it on. An entry left empty is removed: the layer follows defaults."""
    data = plan.to_dict()
    table = data.setdefault("layers", {})
    for name in names:
        entry = table.get(name)
        merged: dict[str, Any] = (dict.fromkeys(SECTIONS) if entry == "keep" else dict(entry or {}))
        if on:
            merged[BIAS_CORRECTION] = True
        else:
            merged.pop(BIAS_CORRECTION, None)
            if _inherits_bias_correction(data, table, name, merged, model):
                merged[BIAS_CORRECTION] = False
        if merged:
            table[name] = merged
        else:
            table.pop(name, None)
    if not table:
        data.pop("layers")
    return data


def _inherits_bias_correction(data: dict[str, Any], table: dict[str, Any], name: str,
                              merged: dict[str, Any], model: Model) -> bool:
    """Whether `name`, with `merged` as its own entry, gets bias correction from other levels."""
    trial = dict(data)
    trial["layers"] = {**table, name: merged} if merged else {k: v for k, v in table.items() if k != name}
    if not trial["layers"]:
        trial.pop("layers")
    try:
        resolved = Plan.from_dict(trial).resolve(model.layers)
    except PlanError:
        return False  # the edit shows the plan's own error when it is pushed
    layer_plan = resolved.get(name)
    return layer_plan is not None and layer_plan.bias_correction


def apply_preset(session: Session, label: str, names: list[str]) -> None:
    """Give `names` the whole-layer setting `label` (a :data:`PRESETS` label or "follow
    defaults") as one undo step; layers that cannot take a section skip it. Raises PlanError."""
    model = session.model
    document = session.plan_document
    if model is None or not names:
        return
    if label == FOLLOW_DEFAULTS:
        document.clear_layers(names, f"Reset {describe_names(names)} to defaults")
        return
    sections = dict(PRESETS)[label]
    edits: dict[str, Any] = {}
    for name in names:
        layer = model.layer(name)
        if sections == "keep":
            edits[name] = "keep"
            continue
        assert isinstance(sections, dict)
        fitting = {key: value for key, value in sections.items() if section_applies(layer, key, value)}
        if any(value is not None for value in fitting.values()):
            edits[name] = fitting
    if not edits:
        raise PlanError(f"none of the selected layers can take “{label}”")
    document.set_layer_sections(edits, f"Make {describe_names(list(edits))} {label}")


def preset_labels(layer_can_compress: bool) -> list[str]:
    """The choices offered in the table's planned-action cell."""
    whole = [label for label, _ in PRESETS] if layer_can_compress else []
    return whole + [FOLLOW_DEFAULTS]


def _main(argv: list[str]) -> int:
    from gui.preview import preview

    return preview(lambda session: PlanEditor(session), argv, title="Plan editor", layer_picker=True)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

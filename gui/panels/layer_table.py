"""The layer table: one row per weight layer, sortable by real numbers and filterable by name.

Everything but sparsity is known at load time. Sparsity needs a pass over the weights, so its
cells read "…" until the session's background sweep reports the layer, then fill in place.
Two columns follow the plan: the planned action ("prune 50% · int8/ch") and the predicted
size after compression; both refresh whenever the session re-resolves the plan. The action
cell is editable (double-click or F2): it offers whole-layer presets, applied through the
plan document to every selected row when the edited row is one of them.
"""

from __future__ import annotations

import re
import sys
from enum import IntEnum
from typing import Any, Sequence

from PySide6.QtCore import (
    QAbstractItemModel,
    QAbstractTableModel,
    QEvent,
    QItemSelection,
    QItemSelectionModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    QPoint,
    QSortFilterProxyModel,
    Qt,
)
from PySide6.QtGui import QFont, QFontMetrics
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHeaderView,
    QLineEdit,
    QMenu,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from engine.errors import PlanError
from engine.model import Layer, Model

from gui.panels.plan_editor import apply_preset, preset_labels
from gui.plan_view import action_text
from gui.session import PlanState, Session
from gui.text import grouped, human_bytes, percent, shape_text

#: Raw values for sorting: numbers sort as numbers, not as their display text.
SORT_ROLE = Qt.ItemDataRole.UserRole + 1
#: The layer's name on every cell of its row, for lookups that ignore the column.
NAME_ROLE = Qt.ItemDataRole.UserRole + 2

PENDING = "…"
FAILED = "error"
CHECK = "✓"


class Column(IntEnum):
    NAME = 0
    KIND = 1
    SHAPE = 2
    PARAMS = 3
    SIZE = 4
    ACTION = 5
    PREDICTED = 6
    DTYPE = 7
    SPARSITY = 8
    PRUNABLE = 9
    QUANTIZABLE = 10


HEADERS = {
    Column.NAME: "Name",
    Column.KIND: "Kind",
    Column.SHAPE: "Shape",
    Column.PARAMS: "Params",
    Column.SIZE: "Size",
    Column.ACTION: "Planned action",
    Column.PREDICTED: "Predicted",
    Column.DTYPE: "Dtype",
    Column.SPARSITY: "Sparsity",
    Column.PRUNABLE: "Prune",
    Column.QUANTIZABLE: "Quant",
}
HEADER_TIPS = {
    Column.SIZE: "Memory the weights take at their stored dtype",
    Column.ACTION: "What the plan does to this layer; double-click to change it "
                   "(bold: the layer has its own settings)",
    Column.PREDICTED: "Bytes after compression, predicted from the plan without compressing",
    Column.SPARSITY: "Fraction of weights that are exactly zero",
    Column.PRUNABLE: "Pruning methods can act on this layer",
    Column.QUANTIZABLE: "Weight quantization can act on this layer",
}
NUMERIC = {Column.PARAMS, Column.SIZE, Column.PREDICTED, Column.SPARSITY}
CENTERED = {Column.PRUNABLE, Column.QUANTIZABLE}
PLAN_COLUMNS = (Column.ACTION, Column.PREDICTED)
#: Shown on request (right-click the header): what the plan editor already tells per layer.
HIDDEN_BY_DEFAULT = (Column.DTYPE, Column.PRUNABLE, Column.QUANTIZABLE)
#: Widest text a cell of these columns may show before its numbers arrive.
WIDTH_TEMPLATES = {Column.SPARSITY: "100.0 %", Column.ACTION: "prune 50% · int8/ch",
                   Column.PREDICTED: "999.9 KiB"}
#: Rows measured when fitting columns; beyond this the widths are a fair guess anyway.
FIT_SAMPLE_ROWS = 2000
#: A column never starts wider than this, whatever one odd cell says.
MAX_FIT_WIDTH = 260
#: The name column is never squeezed below its widest name, up to this many pixels.
MAX_NAME_WIDTH = 320
#: Rows the window keeps in view when it gives a dock its height (they fell to two when the
#: Sensitivity dock opened); only the user dragging a separator shows fewer.
MIN_VISIBLE_ROWS = 8
#: Rows the table shows whatever happens: its hard minimum, small enough for an 800×600 screen.
HARD_MIN_ROWS = 3


class LayerTableModel(QAbstractTableModel):
    """Rows are the session model's layers; see the module docstring."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session
        self._layers: list[Layer] = []
        self._rows: dict[str, int] = {}
        #: Layers whose statistics could not be computed, with the reason.
        self._failed: dict[str, str] = {}
        #: Per row, what its plan columns showed after the last plan refresh, and the error.
        self._plan_cells_shown: list[tuple[object, ...]] = []
        self._plan_error_shown: str | None = None
        session.model_changed.connect(self._on_model_changed)
        session.layers_stats_ready.connect(self._on_stats_ready)
        session.layer_failed.connect(self._on_failed)
        session.plan_state_changed.connect(self._on_plan_state)
        self._on_model_changed(session.model)

    # -- session events -------------------------------------------------------------------
    def _on_model_changed(self, model: Model | None) -> None:
        self.beginResetModel()
        self._layers = list(model.layers) if model is not None else []
        self._rows = {layer.name: row for row, layer in enumerate(self._layers)}
        self._plan_cells_shown = []  # the refresh that follows a new model names every row
        self._failed.clear()
        self.endResetModel()

    def _on_stats_ready(self, names: list[str]) -> None:
        """One dataChanged over the rows of a batch (a row each cost 30 µs at 300k layers)."""
        rows = [row for row in map(self._rows.get, names) if row is not None]
        if rows:
            self.dataChanged.emit(
                self.index(min(rows), Column.SPARSITY), self.index(max(rows), Column.SPARSITY),
                [Qt.ItemDataRole.DisplayRole, SORT_ROLE, Qt.ItemDataRole.ToolTipRole],
            )

    def _on_failed(self, name: str, message: str) -> None:
        self._failed[name] = message
        self._on_stats_ready([name])

    def _on_plan_state(self, _state: PlanState) -> None:
        """dataChanged over the span of rows whose plan columns show something new: the proxy
        re-filters every row it is told about, 5 µs each, which at 300k layers was seconds per
        plan refresh even when the refresh changed nothing on screen."""
        state = self.session.plan_state
        shown = self._plan_cells(state)
        before, error_before = self._plan_cells_shown, self._plan_error_shown
        self._plan_cells_shown, self._plan_error_shown = shown, state.error
        if len(before) != len(shown) or error_before != state.error:
            changed: Sequence[int] = range(len(shown))
        else:
            changed = [row for row, (old, new) in enumerate(zip(before, shown)) if old != new]
        if changed:
            self.dataChanged.emit(
                self.index(changed[0], min(PLAN_COLUMNS)), self.index(changed[-1], max(PLAN_COLUMNS)),
                [Qt.ItemDataRole.DisplayRole, SORT_ROLE, Qt.ItemDataRole.ToolTipRole, Qt.ItemDataRole.FontRole],
            )

    def _plan_cells(self, state: PlanState) -> list[tuple[object, ...]]:
        """Per row, what its plan columns show besides the plan's error: the layer's plan, its
        predicted bytes, whether it has its own settings."""
        plans = state.layers
        predicted = state.prediction.layers if state.prediction is not None else {}
        own = self.session.plan_document.plan.layers
        return [(plans.get(name), getattr(predicted.get(name), "bytes_after", None), name in own)
                for name in (layer.name for layer in self._layers)]

    # -- Qt model interface -----------------------------------------------------------------
    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._layers)

    def columnCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(Column)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation != Qt.Orientation.Horizontal:
            return None
        column = Column(section)
        if role == Qt.ItemDataRole.DisplayRole:
            return HEADERS[column]
        if role == Qt.ItemDataRole.ToolTipRole:
            return HEADER_TIPS.get(column)
        if role == Qt.ItemDataRole.TextAlignmentRole:
            return _alignment(column)
        return None

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        layer = self._layers[index.row()]
        column = Column(index.column())
        if role == Qt.ItemDataRole.DisplayRole:
            return self._display(layer, column)
        if role == SORT_ROLE:
            return self._sort_key(layer, column)
        if role == NAME_ROLE:
            return layer.name
        if role == Qt.ItemDataRole.TextAlignmentRole:
            return _alignment(column)
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tooltip(layer, column)
        if role == Qt.ItemDataRole.FontRole and column == Column.ACTION and self._has_own_settings(layer):
            font = QFont()
            font.setBold(True)
            return font
        if role == Qt.ItemDataRole.EditRole and column == Column.ACTION:
            return self._display(layer, column)
        return None

    def flags(self, index: QModelIndex | QPersistentModelIndex) -> Qt.ItemFlag:
        flags = super().flags(index)
        if index.isValid() and index.column() == Column.ACTION:
            flags |= Qt.ItemFlag.ItemIsEditable
        return flags

    def setData(self, index: QModelIndex | QPersistentModelIndex, value: Any, role: int = Qt.ItemDataRole.EditRole) -> bool:
        """An edit of the action cell applies a preset to the row, or to the whole selection
        when the row is part of it; the plan document records it as one undo step."""
        if role != Qt.ItemDataRole.EditRole or index.column() != Column.ACTION or not value:
            return False
        name = self._layers[index.row()].name
        selected = self.session.selected_layers
        names = selected if name in selected else [name]
        try:
            apply_preset(self.session, str(value), names)
        except PlanError as exc:
            self.session.plan_rejected.emit(str(exc))
            return False
        return True

    # -- cell contents ----------------------------------------------------------------------
    def _has_own_settings(self, layer: Layer) -> bool:
        return self.session.plan_document.layer_sections(layer.name) is not None

    def _predicted(self, layer: Layer) -> int | None:
        prediction = self.session.plan_state.prediction
        entry = prediction.layers.get(layer.name) if prediction is not None else None
        return None if entry is None else entry.bytes_after

    def _sparsity(self, layer: Layer) -> float | None:
        stats = self.session.cached_stats(layer.name)
        return None if stats is None else stats.sparsity

    def _display(self, layer: Layer, column: Column) -> str:
        if column == Column.NAME:
            return layer.name
        if column == Column.KIND:
            return layer.kind
        if column == Column.SHAPE:
            return shape_text(layer.shape)
        if column == Column.PARAMS:
            return grouped(layer.params)
        if column == Column.SIZE:
            return human_bytes(layer.nbytes)
        if column == Column.ACTION:
            state = self.session.plan_state
            return "—" if state.error else action_text(state.layers.get(layer.name))
        if column == Column.PREDICTED:
            predicted = self._predicted(layer)
            return "—" if predicted is None else human_bytes(predicted)
        if column == Column.DTYPE:
            return layer.dtype
        if column == Column.SPARSITY:
            sparsity = self._sparsity(layer)
            if sparsity is None:
                return FAILED if layer.name in self._failed else PENDING
            return percent(sparsity)
        if column == Column.PRUNABLE:
            return CHECK if layer.prunable else ""
        return CHECK if layer.quantizable else ""

    def _sort_key(self, layer: Layer, column: Column) -> Any:
        if column == Column.PARAMS:
            return layer.params
        if column == Column.SIZE:
            return layer.nbytes
        if column == Column.PREDICTED:
            predicted = self._predicted(layer)
            return -1 if predicted is None else predicted
        if column == Column.SPARSITY:
            sparsity = self._sparsity(layer)
            return -1.0 if sparsity is None else sparsity
        if column == Column.SHAPE:
            return len(layer.shape), tuple(layer.shape)
        if column in (Column.PRUNABLE, Column.QUANTIZABLE):
            return int(layer.prunable if column == Column.PRUNABLE else layer.quantizable)
        if column == Column.NAME:
            return natural_key(layer.name)
        return self._display(layer, column).lower()

    def _tooltip(self, layer: Layer, column: Column) -> str | None:
        if column == Column.NAME:
            lines = [layer.name, f"weight: {layer.weight_key}"]
            if layer.bias_key:
                lines.append(f"bias: {layer.bias_key}")
            if layer.shared_with:
                lines.append(f"shares its weight with {layer.shared_with}")
            if layer.macs is not None:
                lines.append(f"MACs: {grouped(layer.macs)}")
            return "\n".join(lines)
        if column == Column.SIZE:
            return f"{grouped(layer.nbytes)} bytes"
        if column in PLAN_COLUMNS:
            return self._plan_tooltip(layer)
        if column == Column.SPARSITY and layer.name in self._failed:
            return self._failed[layer.name]
        return None

    def _plan_tooltip(self, layer: Layer) -> str:
        state = self.session.plan_state
        if state.error:
            return state.error
        prediction = state.prediction.layers.get(layer.name) if state.prediction else None
        origin = "its own settings" if self._has_own_settings(layer) else "defaults, kinds and patterns"
        lines = [f"{action_text(state.layers.get(layer.name))}  (from {origin})"]
        if prediction is not None:
            ratio = prediction.bytes_after / prediction.bytes_before if prediction.bytes_before else 1.0
            lines.append(f"{grouped(prediction.bytes_before)} → {grouped(prediction.bytes_after)} bytes "
                         f"({ratio:.3f}×)")
            if prediction.rank is not None:
                lines.append(f"rank {prediction.rank}")
            if prediction.caveat:
                lines.append(f"estimate: {prediction.caveat}")
        return "\n".join(lines)

    # -- lookups --------------------------------------------------------------------------------
    def row_of(self, name: str) -> int | None:
        return self._rows.get(name)

    def layer_at(self, row: int) -> Layer:
        return self._layers[row]


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """'layers.10.fc' sorts after 'layers.9.fc': digit runs compare as numbers."""
    parts = re.split(r"(\d+)", text.lower())
    return tuple((1, int(part)) if part.isdigit() else (0, part) for part in parts if part)


def _alignment(column: Column) -> Qt.AlignmentFlag:
    if column in NUMERIC:
        return Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
    if column in CENTERED:
        return Qt.AlignmentFlag.AlignCenter
    return Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter


class LayerFilterProxy(QSortFilterProxyModel):
    """Sorts by :data:`SORT_ROLE` and keeps rows whose name, kind or planned action contains the
    filter text (so "int4" finds every layer planned at 4 bits)."""

    def __init__(self) -> None:
        super().__init__()
        self.setSortRole(SORT_ROLE)
        self.setDynamicSortFilter(True)
        self._needle = ""

    def set_needle(self, text: str) -> None:
        """Show only layers whose name, kind or planned action contains `text`, ignoring case."""
        needle = text.strip().lower()
        if needle == self._needle:
            return
        if hasattr(self, "beginFilterChange"):  # Qt >= 6.9
            self.beginFilterChange()
            self._needle = needle
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self._needle = needle
            self.invalidateRowsFilter()

    def filterAcceptsRow(self, source_row: int, source_parent: QModelIndex | QPersistentModelIndex) -> bool:
        if not self._needle:
            return True
        source = self.sourceModel()
        for column in (Column.NAME, Column.KIND, Column.ACTION):
            text = source.index(source_row, column, source_parent).data() or ""
            if self._needle in text.lower():
                return True
        return False

    def lessThan(self, left: QModelIndex | QPersistentModelIndex, right: QModelIndex | QPersistentModelIndex) -> bool:
        a, b = left.data(SORT_ROLE), right.data(SORT_ROLE)
        try:
            return a < b
        except TypeError:  # mixed kinds never happen within a column, but never crash a sort
            return str(a) < str(b)


class ActionDelegate(QStyledItemDelegate):
    """Edits the planned-action cell with a list of whole-layer presets."""

    def __init__(self, table: "LayerTable") -> None:
        super().__init__(table)
        self.table = table

    def createEditor(self, parent: QWidget, option: QStyleOptionViewItem,
                     index: QModelIndex | QPersistentModelIndex) -> QWidget:
        editor = QComboBox(parent)
        name = index.data(NAME_ROLE)
        model = self.table.session.model
        layer = model.layer(name) if model is not None and name else None
        editor.addItems(preset_labels(layer is not None and (layer.prunable or layer.quantizable)))
        editor.setToolTip("Applies to every selected layer when this row is one of them")
        # choosing an item commits at once: one pick, one undo step
        editor.activated.connect(lambda _i, editor=editor: self._commit(editor))
        return editor

    def _commit(self, editor: QComboBox) -> None:
        self.commitData.emit(editor)
        self.closeEditor.emit(editor, QStyledItemDelegate.EndEditHint.NoHint)

    def setEditorData(self, editor: QWidget, index: QModelIndex | QPersistentModelIndex) -> None:
        assert isinstance(editor, QComboBox)
        current = editor.findText(str(index.data(Qt.ItemDataRole.EditRole)))
        editor.setCurrentIndex(max(current, 0))
        editor.showPopup()

    def setModelData(self, editor: QWidget, model: QAbstractItemModel,
                     index: QModelIndex | QPersistentModelIndex) -> None:
        assert isinstance(editor, QComboBox)
        if editor.currentText() != index.data(Qt.ItemDataRole.EditRole):
            model.setData(index, editor.currentText(), Qt.ItemDataRole.EditRole)


class LayerTable(QWidget):
    """Filter box over a sortable table; the selected rows are the session's selected layers
    (Ctrl- and Shift-click select several: the plan editor then edits them all)."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.source = LayerTableModel(session)
        self.proxy = LayerFilterProxy()
        self.proxy.setSourceModel(self.source)

        self.filter_edit = QLineEdit(placeholderText="Filter layers  (Ctrl+F)")
        self.filter_edit.setToolTip("Keep the layers whose name, kind or planned action contains this text")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self._set_filter)

        self.view = QTableView()
        self.view.setModel(self.proxy)
        self.view.setSortingEnabled(True)
        self.unsort()
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.view.setEditTriggers(QAbstractItemView.EditTrigger.DoubleClicked
                                  | QAbstractItemView.EditTrigger.EditKeyPressed)
        self.view.setItemDelegateForColumn(Column.ACTION, ActionDelegate(self))
        self.view.setAlternatingRowColors(True)
        self.view.setShowGrid(False)
        self.view.setWordWrap(False)
        self.view.setTextElideMode(Qt.TextElideMode.ElideMiddle)  # keeps a name's both ends
        self.view.verticalHeader().hide()
        self.view.verticalHeader().setDefaultSectionSize(self.view.fontMetrics().height() + 8)
        self.view.setMinimumHeight(self.rows_height(HARD_MIN_ROWS))
        self._size_columns()
        self.set_hidden_columns(HIDDEN_BY_DEFAULT)
        header = self.view.horizontalHeader()
        header.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        header.customContextMenuRequested.connect(self._column_menu)
        session.plan_state_changed.connect(self._on_plan_state)
        self._syncing = False
        self.view.selectionModel().selectionChanged.connect(self._on_view_selection)
        session.layers_selected.connect(self._on_layers_selected)
        session.model_changed.connect(self._on_model_changed)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(4)
        layout.addWidget(self.filter_edit)
        layout.addWidget(self.view)

    def rows_height(self, rows: int) -> int:
        """The view's height that shows `rows` whole rows under the header, with room for a
        horizontal scroll bar."""
        frame = 2 * self.view.frameWidth()
        header = self.view.horizontalHeader().sizeHint().height()
        scroll_bar = self.view.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent)
        return frame + header + rows * self.view.verticalHeader().defaultSectionSize() + scroll_bar

    def visible_rows(self) -> float:
        """How many rows fit in the view as it is now (for tests and layout checks)."""
        return self.view.viewport().height() / self.view.verticalHeader().defaultSectionSize()

    def _size_columns(self) -> None:
        header = self.view.horizontalHeader()
        header.setHighlightSections(False)
        header.setSortIndicatorClearable(True)  # a third click returns to file order
        header.setStretchLastSection(False)
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setMinimumSectionSize(36)
        self._name_width = 0
        self.view.viewport().installEventFilter(self)
        self.fit_columns()

    def fit_columns(self, columns: tuple[Column, ...] = tuple(Column), grow_only: bool = False) -> None:
        """Size `columns` to their widest text; the name column then takes what is left."""
        header = self.view.horizontalHeader()
        cell = self.view.fontMetrics()
        bold = header.fontMetrics()
        bold_cell = QFont(self.view.font())
        bold_cell.setBold(True)
        rows = min(self.source.rowCount(), FIT_SAMPLE_ROWS)
        padding = 14
        for column in columns:
            texts = [self.source._display(self.source.layer_at(row), column) for row in range(rows)]
            texts.append(WIDTH_TEMPLATES.get(column, ""))
            metrics = QFontMetrics(bold_cell) if column == Column.ACTION else cell  # overrides are bold
            widest = max(metrics.horizontalAdvance(text) for text in texts)
            width = max(widest, bold.horizontalAdvance(HEADERS[column]) + 8) + padding
            if column == Column.NAME:
                self._name_width = min(width, MAX_NAME_WIDTH)
            elif not grow_only or width > header.sectionSize(column):
                header.resizeSection(column, min(width, MAX_FIT_WIDTH))
        self._fill_with_name()

    def _on_plan_state(self, _state: object) -> None:
        self.fit_columns(PLAN_COLUMNS, grow_only=True)

    # -- column visibility ---------------------------------------------------------------------
    def hidden_columns(self) -> list[Column]:
        return [column for column in Column if self.view.isColumnHidden(column)]

    def set_hidden_columns(self, columns: list[Column] | tuple[Column, ...]) -> None:
        """Hide exactly `columns` (never the name)."""
        for column in Column:
            self.view.setColumnHidden(column, column in columns and column != Column.NAME)
        self._fill_with_name()

    def _column_menu(self, position: QPoint) -> None:
        menu = QMenu(self)
        for column in Column:
            if column == Column.NAME:
                continue
            action = menu.addAction(HEADERS[column])
            action.setCheckable(True)
            action.setChecked(not self.view.isColumnHidden(column))
            action.toggled.connect(lambda on, column=column: self._toggle_column(column, on))
        menu.exec(self.view.horizontalHeader().mapToGlobal(position))

    def _toggle_column(self, column: Column, visible: bool) -> None:
        self.view.setColumnHidden(column, not visible)
        self._fill_with_name()

    def _fill_with_name(self) -> None:
        """Stretch the name column over spare room, but never below its readable width.

        A plain Stretch section shrinks to nothing when the window is narrow; this keeps names
        legible and lets a horizontal scroll bar appear instead.
        """
        header = self.view.horizontalHeader()
        others = sum(header.sectionSize(column) for column in Column
                     if column != Column.NAME and not self.view.isColumnHidden(column))
        spare = self.view.viewport().width() - others
        header.resizeSection(Column.NAME, max(self._name_width, spare))

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.view.viewport() and event.type() == QEvent.Type.Resize:
            self._fill_with_name()
        return super().eventFilter(watched, event)

    def _on_model_changed(self, _model: object) -> None:
        """A filter typed for one model means nothing for the next: every layer shows again."""
        self.filter_edit.clear()
        self.fit_columns()

    def _set_filter(self, text: str) -> None:
        self.proxy.set_needle(text)

    # -- selection, both ways without echo ----------------------------------------------------
    def selected_names(self) -> list[str]:
        """Selected layers in view order, the current row's first."""
        selection = self.view.selectionModel()
        rows = sorted(index.row() for index in selection.selectedRows())
        names = [self.proxy.index(row, 0).data(NAME_ROLE) for row in rows]
        current = selection.currentIndex()
        if current.isValid() and selection.isRowSelected(current.row(), QModelIndex()):
            first = current.data(NAME_ROLE)
            names = [first] + [name for name in names if name != first]
        return names

    def _on_view_selection(self, _selected: QItemSelection, _deselected: QItemSelection) -> None:
        if self._syncing:
            return
        names = self.selected_names()
        if not names:  # e.g. the selected rows were filtered out: the session keeps its choice
            return
        self._syncing = True
        try:
            self.session.select_layers(names)
        finally:
            self._syncing = False

    def _on_layers_selected(self, names: list[str]) -> None:
        if self._syncing or names == self.selected_names():
            return
        indexes = []
        for name in names:
            row = self.source.row_of(name)
            index = self.proxy.mapFromSource(self.source.index(row, 0)) if row is not None else QModelIndex()
            if index.isValid():  # rows hidden by the filter stay selected in the session only
                indexes.append(index)
        selection_model = self.view.selectionModel()
        self._syncing = True
        try:
            if not names:
                selection_model.clearSelection()
                return
            if not indexes:
                return
            selection = QItemSelection()
            for index in indexes:
                selection.select(index, index)
            flags = QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows
            selection_model.select(selection, flags)
            selection_model.setCurrentIndex(indexes[0], QItemSelectionModel.SelectionFlag.NoUpdate)
            self.view.scrollTo(indexes[0])
        finally:
            self._syncing = False

    def unsort(self) -> None:
        """Back to file order, which is also the order data flows through the network."""
        self.view.horizontalHeader().setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        self.proxy.sort(-1)

    def select_row(self, proxy_row: int) -> None:
        """Select the row shown at `proxy_row`, as a click would."""
        index = self.proxy.index(proxy_row, 0)
        self.view.selectionModel().setCurrentIndex(
            index,
            QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows,
        )

    def visible_names(self) -> list[str]:
        return [self.proxy.index(row, 0).data(NAME_ROLE) for row in range(self.proxy.rowCount())]


def _main(argv: list[str]) -> int:
    from gui.preview import preview

    return preview(lambda session: LayerTable(session), argv, title="Layer table")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

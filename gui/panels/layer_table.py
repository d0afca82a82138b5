"""The layer table: one row per weight layer, sortable by real numbers and filterable by name.

Everything but sparsity is known at load time. Sparsity needs a pass over the weights, so its
cells read "…" until the session's background sweep reports the layer, then fill in place.
"""

from __future__ import annotations

import re
import sys
from enum import IntEnum
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QEvent,
    QObject,
    QItemSelectionModel,
    QModelIndex,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
)
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLineEdit,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from engine.model import Layer, Model

from gui.session import Session
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
    DTYPE = 5
    SPARSITY = 6
    PRUNABLE = 7
    QUANTIZABLE = 8


HEADERS = {
    Column.NAME: "Name",
    Column.KIND: "Kind",
    Column.SHAPE: "Shape",
    Column.PARAMS: "Params",
    Column.SIZE: "Size",
    Column.DTYPE: "Dtype",
    Column.SPARSITY: "Sparsity",
    Column.PRUNABLE: "Prune",
    Column.QUANTIZABLE: "Quant",
}
HEADER_TIPS = {
    Column.SIZE: "Memory the weights take at their stored dtype",
    Column.SPARSITY: "Fraction of weights that are exactly zero",
    Column.PRUNABLE: "Pruning methods can act on this layer",
    Column.QUANTIZABLE: "Weight quantization can act on this layer",
}
NUMERIC = {Column.PARAMS, Column.SIZE, Column.SPARSITY}
CENTERED = {Column.PRUNABLE, Column.QUANTIZABLE}
#: Widest text a cell of these columns may show before its numbers arrive.
WIDTH_TEMPLATES = {Column.SPARSITY: "100.0 %"}
#: Rows measured when fitting columns; beyond this the widths are a fair guess anyway.
FIT_SAMPLE_ROWS = 2000
#: A column never starts wider than this, whatever one odd cell says.
MAX_FIT_WIDTH = 260
#: The name column is never squeezed below its widest name, up to this many pixels.
MAX_NAME_WIDTH = 320


class LayerTableModel(QAbstractTableModel):
    """Rows are the session model's layers; see the module docstring."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session
        self._layers: list[Layer] = []
        self._rows: dict[str, int] = {}
        #: Layers whose statistics could not be computed, with the reason.
        self._failed: dict[str, str] = {}
        session.model_changed.connect(self._on_model_changed)
        session.layer_stats_ready.connect(self._on_stats_ready)
        session.layer_failed.connect(self._on_failed)
        self._on_model_changed(session.model)

    # -- session events -------------------------------------------------------------------
    def _on_model_changed(self, model: Model | None) -> None:
        self.beginResetModel()
        self._layers = list(model.layers) if model is not None else []
        self._rows = {layer.name: row for row, layer in enumerate(self._layers)}
        self._failed.clear()
        self.endResetModel()

    def _on_stats_ready(self, name: str) -> None:
        row = self._rows.get(name)
        if row is not None:
            cell = self.index(row, Column.SPARSITY)
            self.dataChanged.emit(
                cell, cell, [Qt.ItemDataRole.DisplayRole, SORT_ROLE, Qt.ItemDataRole.ToolTipRole]
            )

    def _on_failed(self, name: str, message: str) -> None:
        self._failed[name] = message
        self._on_stats_ready(name)

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
        return None

    # -- cell contents ----------------------------------------------------------------------
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
        if column == Column.SPARSITY and layer.name in self._failed:
            return self._failed[layer.name]
        return None

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
    """Sorts by :data:`SORT_ROLE` and keeps rows whose name or kind contains the filter text."""

    def __init__(self) -> None:
        super().__init__()
        self.setSortRole(SORT_ROLE)
        self.setDynamicSortFilter(True)
        self._needle = ""

    def set_needle(self, text: str) -> None:
        """Show only layers whose name or kind contains `text`, ignoring case."""
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
        for column in (Column.NAME, Column.KIND):
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


class LayerTable(QWidget):
    """Filter box over a sortable table; selecting a row selects the layer in the session."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.source = LayerTableModel(session)
        self.proxy = LayerFilterProxy()
        self.proxy.setSourceModel(self.source)

        self.filter_edit = QLineEdit(placeholderText="Filter layers by name or kind  (Ctrl+F)")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self._set_filter)

        self.view = QTableView()
        self.view.setModel(self.proxy)
        self.view.setSortingEnabled(True)
        self.unsort()
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.view.setAlternatingRowColors(True)
        self.view.setShowGrid(False)
        self.view.setWordWrap(False)
        self.view.setTextElideMode(Qt.TextElideMode.ElideMiddle)  # keeps a name's both ends
        self.view.verticalHeader().hide()
        self.view.verticalHeader().setDefaultSectionSize(self.view.fontMetrics().height() + 8)
        self._size_columns()
        self.view.selectionModel().currentRowChanged.connect(self._on_current_row)
        session.layer_selected.connect(self._on_layer_selected)
        session.model_changed.connect(lambda _model: self.fit_columns())

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(4)
        layout.addWidget(self.filter_edit)
        layout.addWidget(self.view)

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

    def fit_columns(self) -> None:
        """Size every column to its widest text; the name column then takes what is left."""
        header = self.view.horizontalHeader()
        cell = self.view.fontMetrics()
        bold = header.fontMetrics()
        rows = min(self.source.rowCount(), FIT_SAMPLE_ROWS)
        padding = 14
        for column in Column:
            texts = [self.source._display(self.source.layer_at(row), column) for row in range(rows)]
            texts.append(WIDTH_TEMPLATES.get(column, ""))
            widest = max(cell.horizontalAdvance(text) for text in texts)
            width = max(widest, bold.horizontalAdvance(HEADERS[column]) + 8) + padding
            if column == Column.NAME:
                self._name_width = min(width, MAX_NAME_WIDTH)
            else:
                header.resizeSection(column, min(width, MAX_FIT_WIDTH))
        self._fill_with_name()

    def _fill_with_name(self) -> None:
        """Stretch the name column over spare room, but never below its readable width.

        A plain Stretch section shrinks to nothing when the window is narrow; this keeps names
        legible and lets a horizontal scroll bar appear instead.
        """
        header = self.view.horizontalHeader()
        others = sum(header.sectionSize(column) for column in Column if column != Column.NAME)
        spare = self.view.viewport().width() - others
        header.resizeSection(Column.NAME, max(self._name_width, spare))

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.view.viewport() and event.type() == QEvent.Type.Resize:
            self._fill_with_name()
        return super().eventFilter(watched, event)

    def _set_filter(self, text: str) -> None:
        self.proxy.set_needle(text)

    # -- selection, both ways without echo ----------------------------------------------------
    def _on_current_row(self, current: QModelIndex, _previous: QModelIndex) -> None:
        name = current.data(NAME_ROLE) if current.isValid() else ""
        if name and name != self.session.selected_layer:
            self.session.select_layer(name)

    def _on_layer_selected(self, name: str) -> None:
        current = self.view.selectionModel().currentIndex()
        if name and current.isValid() and current.data(NAME_ROLE) == name:
            return
        row = self.source.row_of(name) if name else None
        if row is None:
            self.view.selectionModel().clearSelection()
            return
        index = self.proxy.mapFromSource(self.source.index(row, 0))
        if not index.isValid():  # hidden by the filter
            return
        self.view.selectionModel().setCurrentIndex(
            index,
            QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows,
        )
        self.view.scrollTo(index)

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

"""The background statistics sweep works a batch of layers per job: a checkpoint of thousands
of tensors fills the table without one Qt job per layer (300k of those never finished), and a
layer that fails is reported alone while the rest of its batch goes on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import Qt
from safetensors.numpy import save_file

from engine.formats import load_model
from engine.stats import StatsCache
from gui import session as session_module
from gui.panels.layer_table import Column, LayerTable
from gui.session import Session

WAIT_MS = 60_000
LAYERS = 2500


@pytest.fixture
def many_layers(tmp_path: Path):
    rng = np.random.default_rng(0)
    tensors = {f"experts.{i}.weight": rng.standard_normal((4, 4)).astype(np.float32)
               for i in range(LAYERS)}
    tensors["experts.7.weight"][:2] = 0  # half zeros: a sparsity the table must show
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    return load_model(path)


def test_thousands_of_layers_are_swept_in_a_few_jobs(qtbot, many_layers) -> None:
    session = Session()
    table = LayerTable(session)
    qtbot.addWidget(table)
    session.set_model(many_layers)
    assert len(session._jobs) == math.ceil(LAYERS / session_module.SWEEP_BATCH_LAYERS)
    ready: list[str] = []
    session.layers_stats_ready.connect(ready.extend)
    qtbot.waitUntil(lambda: not session.busy, timeout=WAIT_MS)
    assert sorted(ready) == sorted(layer.name for layer in many_layers.layers)
    model = table.source
    row = next(r for r, layer in enumerate(model._layers) if layer.name == "experts.7")
    assert model.data(model.index(row, Column.SPARSITY), Qt.ItemDataRole.DisplayRole) == "50.0 %"
    last = model.data(model.index(LAYERS - 1, Column.SPARSITY), Qt.ItemDataRole.DisplayRole)
    assert last == "0.0 %"
    session.shutdown()


def test_a_failing_layer_is_reported_alone(qtbot, many_layers, monkeypatch) -> None:
    broken = "experts.1500"
    real_stats = StatsCache.stats

    def stats(self: StatsCache, layer):  # type: ignore[no-untyped-def]
        name = layer if isinstance(layer, str) else layer.name
        if name == broken:
            raise ValueError("unreadable weight")
        return real_stats(self, layer)

    monkeypatch.setattr(StatsCache, "stats", stats)
    monkeypatch.setattr(StatsCache, "prefetch", lambda self, layers: None)
    session = Session()
    failed: list[tuple[str, str]] = []
    ready: list[str] = []
    session.layer_failed.connect(lambda name, message: failed.append((name, message)))
    session.layers_stats_ready.connect(ready.extend)
    session.set_model(many_layers)
    qtbot.waitUntil(lambda: not session.busy, timeout=WAIT_MS)
    assert failed == [(broken, "ValueError: unreadable weight")]
    assert len(ready) == LAYERS - 1 and broken not in ready
    session.shutdown()


def test_a_plan_edit_refreshes_only_the_rows_it_changes(qtbot, many_layers) -> None:
    """The proxy re-filters every row a dataChanged names; an edit of one layer names one."""
    session = Session()
    table = LayerTable(session)
    qtbot.addWidget(table)
    session.set_model(many_layers, sweep=False)
    model = table.source
    spans: list[tuple[int, int]] = []
    model.dataChanged.connect(lambda first, last, _roles: spans.append((first.row(), last.row())))
    row = 1234
    name = model._layers[row].name
    assert model.data(model.index(row, Column.ACTION), Qt.ItemDataRole.DisplayRole) == "keep"
    session.plan_document.set_layers([name], {"quantization": {"bits": 4}})
    assert spans == [(row, row)]
    assert "4" in model.data(model.index(row, Column.ACTION), Qt.ItemDataRole.DisplayRole)
    spans.clear()
    session.plan_document.set_defaults({"quantization": {"bits": 8}})
    assert spans == [(0, LAYERS - 1)]
    session.shutdown()


def test_the_plan_is_repriced_once_after_the_sweep_not_after_each_histogram(
        qtbot, many_layers) -> None:
    """Selecting a layer computes its histogram; that job ending re-priced every layer (4 s a
    click at 300k layers)."""
    session = Session()
    refreshes: list[object] = []
    session.plan_state_changed.connect(refreshes.append)
    session.set_model(many_layers)
    qtbot.waitUntil(lambda: not session.busy, timeout=WAIT_MS)
    assert len(refreshes) == 2  # the model opened; the sweep ended (sparsities known)
    for name in ("experts.2499", "experts.3"):
        session.request_histogram(name)
        qtbot.waitUntil(lambda: not session.busy, timeout=WAIT_MS)
        assert session.cached_histogram(name) is not None
    assert len(refreshes) == 2
    session.shutdown()

"""The first window end to end: load on the real worker, table, histogram, errors, trust."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent
from PySide6.QtWidgets import QApplication

from engine.errors import UntrustedPickleError
from engine.stats import compute_stats
from gui.dialogs import ERROR_DIALOG_NAME, ErrorDialog
from gui.panels.layer_table import Column, NAME_ROLE

WAIT_MS = 10_000


def open_and_wait(qtbot, window, path: Path) -> None:
    job = window.open_model(path)
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)


def loaded(qtbot, window, make_model, name: str = "small.bin", seed: int = 0):
    model = make_model(name, seed)
    window.fake_loader.add(model)
    open_and_wait(qtbot, window, model.path)
    assert window.session.model is model
    return model


def test_open_populates_table_and_histogram(qtbot, window, make_model, tmp_path):
    model = loaded(qtbot, window, make_model)
    table = window.layer_table
    assert table.proxy.rowCount() == len(model.layers)
    assert table.visible_names() == model.layer_names()  # file order until the user sorts
    assert "small.bin" in window.windowTitle()
    summary = window.summary.text()
    assert "test" in summary and "5 layers" in summary and "weights only" in summary

    table.select_row(2)
    assert window.session.selected_layer == "fc1.weight"
    panel = window.histogram
    qtbot.waitUntil(lambda: panel.layer_name == "fc1.weight" and panel.histogram is not None, timeout=WAIT_MS)
    weight = model.weight("fc1.weight")
    assert int(panel.plotted_counts().sum()) == weight.size
    _x, y = panel.bars.getData()
    assert y is not None and float(np.sum(y)) == weight.size
    assert panel.stat_text("count") == f"{weight.size:,}"
    assert panel.stat_text("sparsity") == "50.0 %"
    expected = compute_stats(weight)
    assert panel.stat_text("std") == f"{expected.std:.4g}"

    panel.log_toggle.setChecked(True)
    _x, y_log = panel.bars.getData()
    assert np.all(np.isfinite(y_log)) and float(np.max(y_log)) < float(np.max(y))
    assert int(panel.plotted_counts().sum()) == weight.size


def test_sparsity_fills_in_from_the_background(qtbot, window, make_model, tmp_path):
    model = loaded(qtbot, window, make_model)
    source = window.layer_table.source
    row = source.row_of("fc1.weight")

    def sparsity_text() -> str:
        return source.index(row, Column.SPARSITY).data()

    qtbot.waitUntil(lambda: sparsity_text() == "50.0 %", timeout=WAIT_MS)
    qtbot.waitUntil(lambda: not window.session.busy, timeout=WAIT_MS)
    for name in model.layer_names():
        assert source.index(source.row_of(name), Column.SPARSITY).data() != "…"


def test_sorting_params_is_numeric(qtbot, window, make_model, tmp_path):
    loaded(qtbot, window, make_model)
    table = window.layer_table
    table.view.sortByColumn(Column.PARAMS, Qt.SortOrder.AscendingOrder)
    params = [int(table.proxy.index(r, Column.PARAMS).data().replace(",", "")) for r in range(table.proxy.rowCount())]
    assert params == sorted(params) == [72, 90, 800, 1000, 4608]
    table.view.sortByColumn(Column.SIZE, Qt.SortOrder.DescendingOrder)
    assert table.visible_names()[0] == "conv2.weight"
    table.unsort()
    assert table.visible_names()[0] == "conv1.weight"


def test_filter_keeps_matching_rows_and_selection_follows(qtbot, window, make_model, tmp_path):
    loaded(qtbot, window, make_model)
    table = window.layer_table
    table.filter_edit.setText("linear")
    assert table.visible_names() == ["fc1.weight", "fc2.weight"]
    table.filter_edit.setText("conv2.")
    assert table.visible_names() == ["conv2.weight"]
    table.filter_edit.clear()
    window.session.select_layer("fc2.weight")
    current = table.view.selectionModel().currentIndex()
    assert current.data(NAME_ROLE) == "fc2.weight"


def test_bad_file_reports_error_and_keeps_model(qtbot, window, make_model, tmp_path, errors):
    model = loaded(qtbot, window, make_model)
    bad = tmp_path / "empty.onnx"
    bad.write_bytes(b"")
    open_and_wait(qtbot, window, bad)
    assert len(errors) == 1
    message, _details = errors[0]
    assert "empty.onnx" in message and "\n" not in message
    assert window.session.model is model
    assert window.layer_table.proxy.rowCount() == len(model.layers)
    assert not window.progress_bar.isVisible()


def test_error_dialog_is_shown_for_real(qtbot, settings, tmp_path, fake_loader):
    """With the default reporter, a real (non-blocking) dialog appears among top-level widgets."""
    from gui.main_window import MainWindow

    win = MainWindow(settings, loader=fake_loader)
    qtbot.addWidget(win)
    win.show()
    open_and_wait(qtbot, win, tmp_path / "missing.safetensors")

    def dialogs() -> list[ErrorDialog]:
        return [w for w in QApplication.topLevelWidgets() if w.objectName() == ERROR_DIALOG_NAME and w.isVisible()]

    qtbot.waitUntil(lambda: len(dialogs()) == 1, timeout=WAIT_MS)
    dialog = dialogs()[0]
    assert "missing.safetensors" in dialog.message and "no such file" in dialog.message
    dialog.accept()
    win.close()


def test_crashing_loader_is_one_line_with_details(qtbot, settings, tmp_path, errors):
    from gui.main_window import MainWindow

    def broken(_path, _options):
        raise ValueError("bad magic\nsecond line")

    win = MainWindow(settings, loader=broken, show_error=lambda _p, m, d: errors.append((m, d)))
    qtbot.addWidget(win)
    open_and_wait(qtbot, win, tmp_path / "x.pt")
    assert errors[0][0] == "ValueError: bad magic"
    assert "Traceback" in errors[0][1]
    assert win.session.model is None
    win.close()


@pytest.mark.parametrize("answer", [True, False])
def test_pickle_needs_explicit_trust(qtbot, settings, make_model, errors, answer):
    from gui.main_window import MainWindow

    model = make_model("net.pt")
    calls: list[bool] = []
    asked: list[Path] = []

    def loader(path, options):
        calls.append(options.trust)
        if not options.trust:
            raise UntrustedPickleError(f"{path.name} is a pickle that can run code")
        return model

    def confirm(_parent, path, reason) -> bool:
        asked.append(path)
        assert "can run code" in reason
        return answer

    win = MainWindow(settings, loader=loader, show_error=lambda _p, m, d: errors.append((m, d)), confirm_trust=confirm)
    qtbot.addWidget(win)
    open_and_wait(qtbot, win, model.path)
    assert asked == [model.path]
    if answer:
        qtbot.waitUntil(lambda: win.session.model is model, timeout=WAIT_MS)
        assert calls == [False, True]
    else:
        assert calls == [False] and win.session.model is None
    assert errors == []
    qtbot.waitUntil(lambda: not win.loading, timeout=WAIT_MS)
    win.close()


@pytest.mark.parametrize("answer", [True, False])
def test_real_pickled_module_asks_first(qtbot, settings, tmp_path, errors, answer):
    torch = pytest.importorskip("torch")
    from gui.main_window import MainWindow

    path = tmp_path / "module.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)), path)
    reasons: list[str] = []

    def confirm(_parent, _path, reason) -> bool:
        reasons.append(reason)
        return answer

    win = MainWindow(settings, show_error=lambda _p, m, d: errors.append((m, d)), confirm_trust=confirm)
    qtbot.addWidget(win)
    win.open_model(path)
    qtbot.waitUntil(lambda: bool(reasons) and not win.loading, timeout=60_000)
    assert len(reasons) == 1 and "Sequential" in reasons[0]
    assert errors == []
    if answer:
        assert win.session.model is not None and win.session.model.module is not None
        assert win.layer_table.proxy.rowCount() == 2
    else:
        assert win.session.model is None
    win.close()


def test_recent_files_and_drop(qtbot, window, make_model, tmp_path, settings):
    first = loaded(qtbot, window, make_model, "first.bin")
    second = make_model("second.bin", 1)
    window.fake_loader.add(second)
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(second.path))])
    event = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier)
    window.dropEvent(event)
    qtbot.waitUntil(lambda: window.session.model is second, timeout=WAIT_MS)
    recent = settings.value("recent_files")
    assert recent[:2] == [str(second.path.resolve()), str(first.path.resolve())]
    window._fill_recent_menu()
    assert [a.text() for a in window.recent_menu.actions()][:2] == ["second.bin", "first.bin"]


def test_layout_is_remembered(qtbot, settings, tmp_path):
    from gui.main_window import MainWindow

    win = MainWindow(settings)
    qtbot.addWidget(win)
    win.resize(760, 540)  # the offscreen screen is 800 x 600
    win.show()
    win.splitter.setSizes([480, 260])
    sizes = win.splitter.sizes()
    win.close()
    again = MainWindow(settings)
    qtbot.addWidget(again)
    again.show()
    assert again.size().width() == 760 and again.size().height() == 540
    assert again.splitter.sizes() == sizes
    again.close()


def test_demo_opens_through_the_real_loader(qtbot, settings):
    from gui.main_window import MainWindow
    from gui.preview import demo_model_path

    path = demo_model_path()
    if path is None:
        pytest.skip("demo model not built yet")
    try:
        from engine.formats import _adapters

        _adapters()
    except ImportError as exc:
        pytest.skip(f"format adapters not all present yet: {exc}")
    win = MainWindow(settings)
    qtbot.addWidget(win)
    win.show()
    job = win.open_demo()
    assert job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=60_000)
    model = win.session.model
    assert model is not None and model.path == path
    assert win.layer_table.proxy.rowCount() == len(model.layers)
    first = model.layers[0]
    qtbot.waitUntil(lambda: win.histogram.histogram is not None, timeout=WAIT_MS)
    weight = model.weight(first)
    assert int(win.histogram.plotted_counts().sum()) + compute_stats(weight).non_finite == weight.size
    assert win.histogram.stat_text("count") == f"{weight.size:,}"
    win.close()


def test_unreadable_layer_is_reported_in_place(qtbot, window, make_model):
    """A weight that cannot be read shows its reason in the plot and the table, and nothing else breaks."""
    model = make_model()

    def broken() -> np.ndarray:
        raise OSError("read past the end of the file")

    model.tensors._getters["fc2.weight"] = broken
    window.fake_loader.add(model)
    open_and_wait(qtbot, window, model.path)
    window.session.select_layer("fc2.weight")
    panel = window.histogram
    qtbot.waitUntil(lambda: "read past the end" in panel.message.toPlainText(), timeout=WAIT_MS)
    assert panel.histogram is None and panel.stat_text("count") == "—"
    source = window.layer_table.source
    cell = source.index(source.row_of("fc2.weight"), Column.SPARSITY)
    qtbot.waitUntil(lambda: cell.data() == "error", timeout=WAIT_MS)
    assert "read past the end" in cell.data(Qt.ItemDataRole.ToolTipRole)
    window.session.select_layer("conv1.weight")
    qtbot.waitUntil(lambda: panel.histogram is not None, timeout=WAIT_MS)


def test_closing_while_loading_is_quiet(qtbot, settings, make_model):
    """A load or a stats job that finishes after its window is gone calls nothing and raises nothing."""
    import threading

    from PySide6.QtCore import QThreadPool

    from gui.main_window import MainWindow

    model = make_model()
    release = threading.Event()

    def slow(_path, _options):
        release.wait(5)
        return model

    win = MainWindow(settings, loader=slow)
    win.show()
    win.open_model(model.path)
    win.close()
    win.deleteLater()
    qtbot.wait(50)  # the window is destroyed here
    release.set()
    assert QThreadPool.globalInstance().waitForDone(5000)
    qtbot.wait(100)  # the job's queued signals are delivered (to nobody) here


def test_closing_with_an_unsaved_plan_asks_and_loses_nothing(qtbot, window, make_model, tmp_path,
                                                             save_prompts):
    path = window.fake_loader.add(make_model())
    job = window.open_model(path)
    qtbot.waitUntil(lambda: job.finished and window.session.model is not None, timeout=5000)
    assert window.plan_may_close() and save_prompts == []  # nothing to lose: no question

    window.document.set_defaults({"quantization": {"bits": 4}})
    window.ask_save_changes = lambda _parent, what: save_prompts.append(what) or "cancel"
    assert window.close() is False and window.isVisible()
    assert save_prompts == ["the plan"]

    saved = window.save_plan_to(tmp_path / "kept.yaml")
    window.document.set_defaults({"quantization": {"bits": 3}})
    assert window.isWindowModified()
    window.ask_save_changes = lambda _parent, what: save_prompts.append(what) or "save"
    assert window.close() is True
    assert save_prompts[-1] == "kept.yaml"  # Save wrote to the plan's own file, no file dialog
    assert "bits: 3" in saved.read_text()


def test_no_automatic_garbage_collection_while_a_job_runs(qtbot) -> None:
    """Collection is paused while a worker runs (see gui.workers._pause_collection) and back on
    once the last job is done."""
    import gc
    import threading

    from gui.workers import Job

    release = threading.Event()
    seen: list[bool] = []

    def body(_progress, _cancel) -> None:
        seen.append(gc.isenabled())
        release.wait(10)

    assert gc.isenabled()
    job = Job(body, "hold").start()
    qtbot.waitUntil(lambda: bool(seen), timeout=5000)
    assert seen == [False] and not gc.isenabled()
    release.set()
    qtbot.waitUntil(lambda: job.finished, timeout=5000)
    assert gc.isenabled()

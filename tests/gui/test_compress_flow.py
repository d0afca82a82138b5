"""Compress and export from the window through the real workers; cancel; replay in the CLI.

The demo model and its data are real, as are compress(), recovery, export and verification.
Recovery runs a handful of steps so the whole file stays within a few seconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PySide6.QtCore import Qt
from PySide6.QtTest import QTest

from engine import cli
from engine.demo import DEMO_MODEL
from engine.formats import load_model

WAIT_MS = 60_000
PLAN = {
    "defaults": {"quantization": {"bits": 8, "symmetric": True, "granularity": "per-channel",
                                  "range": "minmax"}},
    "layers": {"features.7": {"pruning": {"method": "magnitude", "amount": 0.6}},
               "classifier.1": {"pruning": {"method": "nm", "pattern": "2:4"}}},
}


@pytest.fixture
def demo(qtbot, window):
    job = window.open_model(DEMO_MODEL)
    qtbot.waitUntil(lambda: job.finished and window.session.model is not None, timeout=WAIT_MS)
    return window


def weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_and_wait(qtbot, window):
    job = window.run_compression()
    assert job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)
    return job


def test_compress_from_the_window_fills_the_dashboard_and_the_overlay(qtbot, demo, errors):
    window = demo
    window.session.plan_document.replace(PLAN, "Test plan")
    window.session.select_layer("classifier.1")
    QTest.keyClick(window, Qt.Key.Key_R, Qt.KeyboardModifier.ControlModifier)  # Ctrl+R runs it
    assert window.busy and window.cancel_button.isVisible() and window.progress_bar.isVisible()
    qtbot.waitUntil(lambda: not window.busy, timeout=WAIT_MS)
    assert errors == []
    outcome = window.session.result
    assert outcome is not None and outcome.plan == window.session.plan_document.to_dict()
    report = outcome.report
    assert window.tabs.currentWidget() is window.results
    cards = window.results.card_texts()
    assert cards["SIZE"].startswith("737.2 KiB → ") and f"{report.size_ratio:.3f}×" in cards["SIZE"]
    accuracy = report.metrics_after["accuracy"]
    assert cards["ACCURACY"].startswith(f"99.56 % → {100 * accuracy:.2f} %")
    assert "ms" in cards["LATENCY"] and cards["RECOVERY"].startswith("not used")
    assert window.results.chart.names == [layer.name for layer in report.layers]
    assert window.results.table.rowCount() == len(report.layers)
    assert any("compressed digits_cnn.safetensors" in line for line in window.log.lines)

    # the histogram overlays the layer as compressed: 2:4 leaves exactly half the weights zero
    overlay = window.histogram.after
    assert overlay is not None and overlay.zeros == overlay.count // 2
    assert f"{overlay.zeros:,} exact zeros (50.0 %)" in window.histogram.after_label.text()
    assert window.export_action.isEnabled()
    window.session.plan_document.set_layers(["classifier.4"], "keep")
    assert window.results.stale_label.isVisibleTo(window.results)


def test_cancelled_recovery_leaves_model_plan_and_results_as_they_were(qtbot, demo):
    window = demo
    model = window.session.model
    document = window.session.plan_document
    document.replace({**PLAN, "recovery": {"steps": 100_000, "eval_every": 0}}, "Long recovery")
    plan_before, steps_before = document.to_dict(), document.undo_stack.count()
    digest_before = weights_digest(model.module)

    job = window.run_compression()
    assert job is not None
    seen = []
    job.partial.connect(seen.append)
    qtbot.waitUntil(lambda: bool(seen), timeout=WAIT_MS)  # the first recovery step arrived
    assert window.results.recovery_plot.step_count >= 1
    window.cancel_button.click()
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)

    assert window.session.result is None and not window.busy
    assert not window.results.content.isVisible() and window.results.title.text() == "No compression yet"
    assert document.to_dict() == plan_before and document.undo_stack.count() == steps_before
    assert window.session.model is model and weights_digest(model.module) == digest_before
    assert any("cancelled" in line for line in window.log.lines)
    assert window.run_action.isEnabled() and not window.cancel_button.isVisible()


def test_saved_plan_replays_bit_identically_in_the_cli(qtbot, demo, tmp_path):
    window = demo
    window.session.plan_document.replace({**PLAN, "recovery": {"steps": 6, "eval_every": 3}}, "Plan")
    run_and_wait(qtbot, window)
    outcome = window.session.result
    assert outcome is not None and outcome.report.recovery["steps"] == 6
    plan_file = window.save_plan_to(tmp_path / "plan.yaml")
    output = tmp_path / "replayed.safetensors"
    # Float sums split over another thread count round differently: the replay names the app's
    # count (the log says it), as a user replaying a recovery bit for bit would.
    threads = torch.get_num_threads()
    assert any(f"{threads} threads" in line for line in window.log.lines)
    code = cli.main(["compress", str(DEMO_MODEL), "--plan", str(plan_file), "-o", str(output),
                     "--data", "demo", "--calibration", "demo:calibration", "--train-data", "demo:train",
                     "--no-measure", "--threads", str(threads)])
    assert code == 0
    from safetensors.torch import load_file

    replayed = load_file(str(output))
    ours = outcome.compressed.module.state_dict()
    assert set(replayed) == set(ours)
    for name, tensor in ours.items():
        assert torch.equal(replayed[name].to(tensor.dtype), tensor), name


def test_export_dialog_writes_a_verified_file_and_refuses_the_input(qtbot, demo, errors, tmp_path):
    window = demo
    window.export()
    assert "run the compression first" in errors[-1][0]  # nothing to export yet: one line
    window.session.plan_document.replace(PLAN, "Plan")
    run_and_wait(qtbot, window)
    QTest.keyClick(window, Qt.Key.Key_E, Qt.KeyboardModifier.ControlModifier)  # Ctrl+E
    dialog = window.export_dialog
    qtbot.addWidget(dialog)
    from engine.export import formats

    assert dialog.format_combo.count() == 1 + len(formats())  # automatic + every format
    dialog.path_edit.setText(str(tmp_path / "digits-small.onnx"))
    assert "onnx-int8" in dialog.plan_label.text()  # conv weights are quantized: static int8

    # the input model is never a destination: refused before any work, in one line
    digest = hashlib.sha256(Path(DEMO_MODEL).read_bytes()).hexdigest()
    dialog.format_combo.setCurrentIndex(dialog.format_combo.findData("safetensors"))
    dialog.path_edit.setText(str(DEMO_MODEL))
    assert dialog.start_export() is None
    message = errors[-1][0]
    assert "refusing to overwrite the input model" in message and "\n" not in message
    assert hashlib.sha256(Path(DEMO_MODEL).read_bytes()).hexdigest() == digest
    dialog.path_edit.setText(str(tmp_path / "model.weird"))
    assert dialog.start_export() is None and "\n" not in errors[-1][0]

    errors.clear()
    destination = tmp_path / "digits-small.safetensors"
    dialog.path_edit.setText(str(destination))
    job = dialog.start_export()
    assert job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)
    assert errors == []
    assert dialog.result is not None and dialog.result.kept
    text = dialog.result_text()
    assert "Verified" in text and "Max |diff|" in text and "Agreement" in text and "Latency" in text
    reloaded = load_model(destination)
    assert reloaded.format == "safetensors" and reloaded.layer_names() == window.session.model.layer_names()
    assert any("written and verified" in line for line in window.log.lines)
    dialog.close()


def test_a_plan_made_for_another_model_blocks_compression_with_one_line(qtbot, demo, errors, make_model):
    window = demo
    window.session.plan_document.replace(PLAN, "Plan for the demo")
    other = make_model("other.bin")
    window.fake_loader.add(other)
    job = window.open_model(other.path)
    qtbot.waitUntil(lambda: job.finished and window.session.model is other, timeout=WAIT_MS)
    assert "features.7" in window.summary.plan_label.text()  # the strip says it does not fit
    assert window.run_compression() is None
    assert "features.7" in errors[-1][0] and "\n" not in errors[-1][0]

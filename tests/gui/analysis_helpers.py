"""Small runnable models and waiting helpers shared by the analysis panel tests."""

from __future__ import annotations

from pathlib import Path

from engine.formats._torch_common import module_model
from engine.model import Model
from engine.sensitivity import Sensitivity, sweep_module

from factories import tiny_cnn

WAIT_MS = 20_000


def runnable_model(folder: Path, name: str = "tiny.pt") -> Model:
    """TinyCNN (conv 1->4, fc 64->10; input 1x8x8) as a runnable Model with a file on disk."""
    path = folder / name
    path.write_bytes(b"stand-in for a model file")
    return module_model(path, "test", tiny_cnn(), input_shape=(1, 1, 8, 8))


def datafree_results(model: Model) -> Sensitivity:
    """Data-free results for `model`, made without the GUI (milliseconds on TinyCNN)."""
    result = sweep_module(model.module, None, "datafree")
    result.model = model.path.name
    return result


def wait_for_job(qtbot, job) -> None:  # type: ignore[no-untyped-def]
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)


def combo_item(combo, data: str) -> tuple[bool, str]:  # type: ignore[no-untyped-def]
    """(enabled, tooltip) of the combo item holding `data`: how a gated choice reads."""
    from PySide6.QtCore import Qt

    index = combo.findData(data)
    assert index >= 0, data
    return combo.model().item(index).isEnabled(), combo.itemData(index, Qt.ItemDataRole.ToolTipRole) or ""

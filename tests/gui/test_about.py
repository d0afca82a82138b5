"""Help › About and the app icon: version from pyproject, component versions, icon sizes."""

from __future__ import annotations

from PySide6.QtGui import QGuiApplication

from engine import __version__

from gui.about import AboutDialog, component_versions, details_text
from gui.icons import ICON_SIZES, app_icon, icon_path


def test_app_icon_has_every_rendered_size(qtbot):
    icon = app_icon()
    assert not icon.isNull()
    assert {size.width() for size in icon.availableSizes()} == set(ICON_SIZES)
    assert all(icon_path(size).is_file() for size in ICON_SIZES)


def test_about_shows_the_version_and_components(qtbot):
    dialog = AboutDialog()
    qtbot.addWidget(dialog)
    assert __version__ in dialog.title.text()
    labels = dict(component_versions())
    for name in ("PyTorch", "ONNX", "ONNX Runtime", "PySide6"):
        assert dialog.version_labels[name].text() == labels[name] != "not installed"
    assert "Apache-2.0" in dialog.license.text()


def test_copy_details_puts_the_versions_on_the_clipboard(qtbot):
    dialog = AboutDialog()
    qtbot.addWidget(dialog)
    dialog.copy_button.click()
    assert QGuiApplication.clipboard().text() == details_text()
    assert details_text().splitlines()[0] == f"Slimscope: {__version__}"

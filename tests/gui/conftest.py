"""Small neutral models built in the test, and a main window that never touches real settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QSettings, QThreadPool

from engine.formats import LoadOptions
from engine.model import PRUNABLE_KINDS, Layer, Model, TensorStore


def build_model(path: Path, arrays: dict[str, tuple[str, np.ndarray]], fmt: str = "test") -> Model:
    """A Model over in-memory arrays: layer name -> (kind, weight)."""
    path.write_bytes(b"stand-in for a model file")
    getters = {name: (lambda a=array: a) for name, (_kind, array) in arrays.items()}
    shapes = {name: tuple(array.shape) for name, (_kind, array) in arrays.items()}
    dtypes = {name: str(array.dtype) for name, (_kind, array) in arrays.items()}
    itemsizes = {name: array.itemsize for name, (_kind, array) in arrays.items()}
    layers = [
        Layer(
            name=name,
            kind=kind,
            weight_key=name,
            shape=tuple(array.shape),
            dtype=str(array.dtype),
            params=int(array.size),
            nbytes=int(array.nbytes),
            prunable=kind in PRUNABLE_KINDS,
            quantizable=kind in PRUNABLE_KINDS,
        )
        for name, (kind, array) in arrays.items()
    ]
    return Model(path=path, format=fmt, layers=layers, tensors=TensorStore(getters, shapes, dtypes, itemsizes))


def small_arrays(seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    """Params chosen so text order and numeric order differ (90 < 800 < 1000 < 4608)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    sparse = rng.standard_normal((10, 100)).astype(np.float32)
    sparse[:, :50] = 0.0
    return {
        "conv1.weight": ("Conv2d", weight),
        "conv2.weight": ("Conv2d", rng.standard_normal((16, 32, 3, 3)).astype(np.float32)),
        "fc1.weight": ("Linear", sparse),
        "fc2.weight": ("Linear", rng.standard_normal((10, 80)).astype(np.float32)),
        "norm.weight": ("BatchNorm2d", rng.standard_normal(90).astype(np.float32)),
    }


class FakeLoader:
    """Stands in for engine.formats.load_model: builds models for files it was told about."""

    def __init__(self) -> None:
        self.models: dict[Path, Model] = {}
        self.calls: list[tuple[Path, bool]] = []

    def add(self, model: Model) -> Path:
        self.models[model.path] = model
        return model.path

    def __call__(self, path: Path, options: LoadOptions) -> Model:
        self.calls.append((path, options.trust))
        options.progress(0.5, f"reading {path.name}")
        from engine.formats import load_model

        if path in self.models:
            return self.models[path]
        return load_model(path, options)  # the real loader decides what is wrong with it


@pytest.fixture
def make_model(tmp_path: Path):
    """make_model(file_name, seed=0) -> a five-layer Model whose path exists under tmp_path."""

    def make(file_name: str = "small.bin", seed: int = 0) -> Model:
        return build_model(tmp_path / file_name, small_arrays(seed))

    return make


@pytest.fixture(autouse=True)
def save_prompts(monkeypatch) -> list[str]:
    """Every window's "save the plan?" question, answered "discard" (a modal box would block
    the test run); the list records what was asked."""
    from gui import dialogs

    asked: list[str] = []

    def discard(_parent: object, what: str) -> str:
        asked.append(what)
        return "discard"

    monkeypatch.setattr(dialogs, "ask_save_changes", discard)
    return asked


@pytest.fixture
def fake_loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def settings(tmp_path: Path) -> QSettings:
    return QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)


@pytest.fixture
def errors() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def window(qtbot, settings, errors, fake_loader):
    from gui.main_window import MainWindow

    loader = fake_loader
    win = MainWindow(settings, loader=loader, show_error=lambda _parent, message, details: errors.append((message, details)))
    win.fake_loader = loader  # type: ignore[attr-defined]
    qtbot.addWidget(win)
    win.resize(1100, 700)
    win.show()
    yield win
    win.close()
    QThreadPool.globalInstance().waitForDone(5000)

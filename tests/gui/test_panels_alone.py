"""Every panel runs alone over a model file (habit 10) and can save itself as a picture."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.fixture
def tiny_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.safetensors"
    safetensors_numpy.save_file(
        {
            "fc1.weight": rng.standard_normal((16, 8)).astype(np.float32),
            "fc1.bias": np.zeros(16, np.float32),
            "fc2.weight": rng.standard_normal((4, 16)).astype(np.float32),
        },
        str(path),
    )
    return path


@pytest.mark.parametrize("module", ["gui.panels.histogram", "gui.panels.layer_table", "gui.panels.summary"])
def test_panel_runs_alone(qapp, tiny_file, tmp_path, module):
    out = tmp_path / f"{module}.png"
    code = importlib.import_module(module)._main([str(tiny_file), "--layer", "fc2", "--screenshot", str(out)])
    assert code == 0
    assert out.stat().st_size > 1000


def test_panel_reports_a_bad_file(qapp, tmp_path, capsys):
    from gui.panels.histogram import _main

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    assert _main([str(bad)]) == 2
    assert "bad.onnx" in capsys.readouterr().err

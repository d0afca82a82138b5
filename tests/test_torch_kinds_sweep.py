"""Sensitivity and export of TorchScript and static-batch torch.export models (issue 13):
the sweeps reach their layers, measure what the eager model measures, and the compressed
results export to two formats each, reloaded and checked against the compressed module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import factories_torch_kinds as kinds_factories
from engine.compress import compress
from engine.data import open_data
from engine.evaluate import TorchRunner
from engine.export import export
from engine.formats import load_model
from engine.plan import Plan
from engine.sensitivity import SweepSettings, sweep, sweep_module

SETTINGS = SweepSettings(sparsities=(0.0, 0.5, 0.9), bits=(8, 3))
PLAN = {"layers": {name: {"pruning": {"method": "magnitude", "amount": 0.5},
                          "quantization": {"bits": 8}} for name in ("conv", "fc")}}


@pytest.fixture
def script(tmp_path: Path) -> Path:
    return kinds_factories.plain_script(tmp_path / "net.pt")


@pytest.fixture
def program(tmp_path: Path) -> Path:
    return kinds_factories.static_batch_program(tmp_path / "net.pt2")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return kinds_factories.images(tmp_path / "x.npz")


def _metrics(result) -> dict[tuple[str, str], list[float]]:
    return {(layer.name, axis): curve.metric for layer in result.layers
            for axis, curve in layer.curves.items()}


@pytest.mark.parametrize("kind", ["script", "program"])
def test_datafree_reaches_the_layers_with_their_kinds(kind: str, request) -> None:
    model = load_model(request.getfixturevalue(kind))
    result = sweep(model, None, "datafree", SETTINGS)
    assert [(layer.name, layer.kind) for layer in result.layers] == \
        [("conv", "Conv2d"), ("fc", "Linear")]
    assert result.layers[0].curves["bits"].metric[-1] > 0  # a real weight error


@pytest.mark.parametrize("kind", ["script", "program"])
def test_exact_measures_what_the_eager_model_measures(kind: str, request, images: Path) -> None:
    model = load_model(request.getfixturevalue(kind))
    data = open_data(str(images), model.inputs)
    before = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    measured = sweep(model, data, "exact", SETTINGS)
    expected = sweep_module(kinds_factories.conv_net(), data, "naive", SETTINGS)
    got, want = _metrics(measured), _metrics(expected)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert min(got[("conv", "bits")]) < 1.0  # 3-bit codes change some answers
    for key, value in model.module.state_dict().items():  # the swaps ran on a copy
        assert torch.equal(value, before[key]), key


def test_exact_sweeps_a_script_with_a_sample_rate_argument(tmp_path: Path) -> None:
    model = load_model(kinds_factories.streaming_script(tmp_path / "vad.pt"))
    data = open_data(str(kinds_factories.chunks(tmp_path / "chunks.npz")), model.inputs)
    measured = sweep(model, data, "exact", SETTINGS)
    expected = sweep_module(kinds_factories.streaming(), data, "naive", SETTINGS)
    got, want = _metrics(measured), _metrics(expected)
    assert got.keys() == want.keys() == {(n, a) for n in ("first", "second")
                                          for a in ("sparsity", "bits")}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    datafree = sweep(model, None, "datafree", SETTINGS)
    assert [layer.kind for layer in datafree.layers] == ["Linear", "Linear"]


def _first_output(value) -> np.ndarray:
    return (value[0] if isinstance(value, (tuple, list)) else value).detach().numpy()


@pytest.mark.parametrize("kind, suffix, fmt", [
    ("script", ".onnx", "onnx"), ("script", ".pt", "torchscript"),
    ("program", ".pt2", None), ("program", ".onnx", "onnx"),
    ("program-uncompressed", ".pt2", None), ("program-uncompressed", ".onnx", "onnx")])
def test_compressed_torch_kinds_export_and_reload(kind: str, suffix: str, fmt: str | None,
                                                  request, images: Path,
                                                  tmp_path: Path) -> None:
    uncompressed = kind.endswith("-uncompressed")
    model = load_model(request.getfixturevalue(kind.removesuffix("-uncompressed")))
    data = open_data(str(images), model.inputs)
    compressed, _ = compress(model, Plan.from_dict({} if uncompressed else PLAN), measure=False)
    conv = compressed.module.state_dict()["conv.weight"]
    if not uncompressed:
        assert float((conv == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    out = tmp_path / f"out{suffix}"
    result = export(compressed, model, out, format=fmt, data=data, measure=False)
    assert result.kept, result.verification.summary()
    x = np.load(images)["x"][:1]  # batch 1: what the static program takes
    want = TorchRunner(compressed.module).run(x)
    if suffix == ".onnx":
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
    elif suffix == ".pt":
        got = _first_output(torch.jit.load(str(out))(torch.from_numpy(x)))
    else:
        got = _first_output(torch.export.load(str(out)).module()(torch.from_numpy(x)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if not uncompressed:  # compression changed the outputs
        assert np.abs(want - TorchRunner(model.module).run(x)).max() > 0

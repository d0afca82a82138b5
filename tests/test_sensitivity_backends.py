"""Sensitivity of ONNX graphs (ONNX Runtime) and weights-only files: engine.sensitivity_backends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engine.allocate import allocate, choose_keep_float
from engine.cli import main
from engine.data import open_data
from engine.errors import SlimscopeError
from engine.formats import load_model
from engine.jobs import Cancelled, CancelToken
from engine.plan import Plan
from engine.sensitivity import (
    EXTRAPOLATED,
    MEASURED,
    NodeSensitivity,
    Sensitivity,
    SweepSettings,
    paired_drops,
    spearman,
    sweep,
)
from engine.sensitivity_backends import (
    _main_proto,
    _weight_uses,
    collect_input_moments,
    predicted_output_error,
    sweep_backend,
)
from factories import write_safetensors
from factories_sensitivity import (
    INPUT_SHAPE,
    conv_mlp_onnx,
    outlier_onnx,
    write_model_and_data,
)

LEVELS = SweepSettings(sparsities=(0.25, 0.5, 0.9), bits=(8, 4, 2), activations=False)
LAYERS = ["conv1", "conv2", "fc1", "fc2"]


@pytest.fixture(scope="module")
def conv_mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_model_and_data(tmp_path_factory.mktemp("conv_mlp"), conv_mlp_onnx(),
                                INPUT_SHAPE)


@pytest.fixture(scope="module")
def unlabelled(conv_mlp: tuple[Path, Path]) -> Path:
    """The same inputs without labels: exact scores agreement and KL against the original."""
    path = conv_mlp[1].with_name("inputs_only.npz")
    np.savez(path, x=np.load(conv_mlp[1])["x"])
    return path


def test_exact_and_datafree_give_every_layer_every_level(conv_mlp: tuple[Path, Path]) -> None:
    model = load_model(conv_mlp[0])
    data = open_data(str(conv_mlp[1]), model.inputs)
    for method, source in (("exact", data), ("datafree", None)):
        result = sweep(model, source, method, LEVELS)
        assert [layer.name for layer in result.layers] == LAYERS
        for layer in result.layers:
            assert layer.shape == model.layer(layer.name).shape
            assert layer.curves["sparsity"].levels == [0.0, 0.25, 0.5, 0.9]
            assert layer.curves["bits"].levels == [32, 8, 4, 2]
            assert layer.curves["bits"].bytes[-1] < layer.curves["bits"].bytes[0]
        assert result.model_bytes == model.nbytes and 0 < result.fixed_bytes < model.nbytes
    exact = sweep(model, data, "exact", LEVELS)
    assert exact.metric == "accuracy" and exact.baseline == 1.0  # labels are its own top-1
    assert exact.layer("fc1").curves["sparsity"].status[1] == MEASURED
    assert min(exact.drops(exact.layer("conv1"), "bits")) >= -0.05
    assert max(exact.drops(layer, "sparsity")[-1] for layer in exact.layers) > 0.1


def test_exact_matches_a_new_session_per_level(conv_mlp: tuple[Path, Path]) -> None:
    """Feeding the swept weight to one session measures what rebuilding the graph does."""
    model = load_model(conv_mlp[0])
    data = open_data(str(conv_mlp[1]), model.inputs)
    settings = SweepSettings(sparsities=(0.5,), bits=(4, 2), activations=False,
                             collapse_fraction=0.0)
    exact = sweep(model, data, "exact", settings)
    naive = sweep_backend(model, data, "naive", settings)
    assert not exact.notes  # every weight, the Constant-node one too, was fed
    for layer in exact.layers:
        for axis, curve in layer.curves.items():
            other = naive.layer(layer.name).curves[axis]
            assert curve.levels == other.levels and curve.bytes == other.bytes
            np.testing.assert_allclose(curve.metric, other.metric, atol=1e-9)
            np.testing.assert_allclose(curve.secondary, other.secondary, rtol=1e-4, atol=1e-6)


def test_fast_ranks_like_exact(conv_mlp: tuple[Path, Path], unlabelled: Path) -> None:
    model = load_model(conv_mlp[0])
    data = open_data(str(unlabelled), model.inputs)
    settings = SweepSettings(sparsities=(0.25, 0.5, 0.75, 0.9), bits=(8, 6, 4, 3, 2),
                             activations=False)
    exact = sweep(model, data, "exact", settings)
    fast = sweep(model, data, "fast", settings)
    assert fast.metric == "output_nsr" and not fast.notes
    exact_kl, estimated = paired_drops(exact, fast, secondary_a=True)
    assert len(exact_kl) == 4 * 9
    assert spearman(exact_kl, estimated) > 0.75


def test_input_moments_are_the_activation_gram_matrix(conv_mlp: tuple[Path, Path]) -> None:
    model = load_model(conv_mlp[0])
    x = np.load(conv_mlp[1])["x"]
    data = open_data(str(conv_mlp[1]), model.inputs)
    moments = collect_input_moments(model, data, chunk_size=40)
    graph = conv_mlp_onnx()
    graph.graph.output.extend([onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT,
                                                                  None) for n in ("r1", "r3")])
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    _, r1, r3 = session.run(None, {"input": x})
    r3 = r3.astype(np.float64)
    np.testing.assert_allclose(moments["fc2.weight"], r3.T @ r3 / len(x), rtol=1e-6)
    assert moments["fc2.weight"].shape == (16, 16) and moments["fc1.weight"].shape == (12, 12)
    channels = np.moveaxis(r1.astype(np.float64), 1, -1).reshape(-1, 8)
    np.testing.assert_allclose(moments["conv2.weight"], channels.T @ channels / len(x),
                               rtol=1e-6)  # a 1x1 conv: the full channel matrix
    # a 3x3 convolution: the patch moments predict its output change exactly
    change = np.random.default_rng(5).normal(0, 0.1, (8, 3, 3, 3))
    uses = _weight_uses(_main_proto(model), ["conv1.weight"])["conv1.weight"]
    actual = torch.nn.functional.conv2d(torch.from_numpy(x).double(),
                                        torch.from_numpy(change), padding=1)
    assert moments["conv1.weight"].shape == (1, 27, 27)
    assert predicted_output_error(uses[0], moments["conv1.weight"], change) == pytest.approx(
        float(actual.square().sum()) / len(x), rel=1e-9)


def test_activation_sensitivity_names_the_node_fed_an_outlier(tmp_path: Path) -> None:
    model_path, data_path = write_model_and_data(tmp_path, outlier_onnx(), (12,))
    model = load_model(model_path)
    data = open_data(str(data_path), model.inputs)
    result = sweep(model, data, "exact", SweepSettings(sparsities=(0.5,), bits=(4,)))
    drops = result.activation_drops()
    assert set(drops) == {"first", "amplify", "sensitive"}
    assert max(drops, key=drops.__getitem__) == "sensitive"
    assert drops["sensitive"] > 0.3 and drops["first"] < 0.1
    # "amplify" is a Mul: without an int8 kernel it always stays float
    assert choose_keep_float(result, threshold=0.1) == (["amplify", "sensitive"], pytest.approx(
        max(drops["first"], 0)))
    assert choose_keep_float(result, budget=0.0)[0] == [
        name for name in ("first", "amplify", "sensitive") if name == "amplify" or drops[name] > 0]
    plan = allocate(result, max_drop=0.2).plan
    assert plan.activation_quant is not None
    assert plan.activation_quant.keep_float == ("amplify", "sensitive")
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.activation_quant.keep_float == ("amplify", "sensitive")


def test_json_round_trips_and_rejects_bad_activation_entries(tmp_path: Path) -> None:
    model_path, data_path = write_model_and_data(tmp_path, outlier_onnx(), (12,))
    model = load_model(model_path)
    result = sweep(model, open_data(str(data_path), model.inputs), "exact",
                   SweepSettings(sparsities=(0.5,), bits=(4,)))
    path = tmp_path / "sens.json"
    result.save(path)
    loaded = Sensitivity.load(path)
    assert loaded.to_dict() == result.to_dict()
    assert loaded.activations[0] == NodeSensitivity("first", "MatMul", result.activations[0].metric,
                                                    result.activations[0].delta)
    plain = result.to_dict()
    plain.pop("activations")
    assert Sensitivity.from_dict(plain).activations == []
    for bad in ([{"name": "first", "op_type": "MatMul", "metric": "high", "delta": 0.0}],
                [{"name": 3, "op_type": "MatMul", "metric": 1.0, "delta": 0.0}],
                {"first": 1.0},
                [result.activations[0].to_dict(), result.activations[0].to_dict()]):
        with pytest.raises(SlimscopeError) as caught:
            Sensitivity.from_dict({**result.to_dict(), "activations": bad})
        assert "\n" not in str(caught.value) and "activations" in str(caught.value)


def test_weights_only_is_datafree_and_refuses_the_rest_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_safetensors(tmp_path)
    model = load_model(path)
    result = sweep(model, None, "datafree", LEVELS)
    assert result.metric == "weight_nsr" and result.layers
    assert any("no accuracy figure" in note for note in result.notes)
    output = tmp_path / "sens.json"
    assert main(["sensitivity", str(path), "--method", "datafree", "-o", str(output)]) == 0
    assert Sensitivity.load(output).layers
    capsys.readouterr()
    for method in ("exact", "fast"):
        assert main(["sensitivity", str(path), "--method", method, "--data", "synthetic:8",
                     "-o", str(tmp_path / f"{method}.json")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and "weights only" in error and method in error
        assert not (tmp_path / f"{method}.json").exists()


def test_cli_sensitivity_then_plan_keeps_the_fragile_node_in_float(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path, data_path = write_model_and_data(tmp_path, outlier_onnx(), (12,))
    sens, plan = tmp_path / "sens.json", tmp_path / "plan.json"
    assert main(["sensitivity", str(model_path), "--data", str(data_path), "--sparsities",
                 "0.5", "--bits", "8,4", "-o", str(sens)]) == 0
    assert "sensitive" in capsys.readouterr().err
    assert main(["plan", str(model_path), "--sensitivity", str(sens), "--max-drop", "0.2",
                 "-o", str(plan)]) == 0
    written = json.loads(plan.read_text())
    assert written["activation_quant"]["keep_float"] == ["amplify", "sensitive"]
    for method in ("fast", "datafree"):
        out = tmp_path / f"{method}.json"
        assert main(["sensitivity", str(model_path), "--data", str(data_path), "--method",
                     method, "-o", str(out)]) == 0
        assert len(Sensitivity.load(out).layers) == 2


def test_exact_cancels_between_levels(conv_mlp: tuple[Path, Path]) -> None:
    model = load_model(conv_mlp[0])
    data = open_data(str(conv_mlp[1]), model.inputs)
    token = CancelToken()
    seen: list[str] = []

    def progress(fraction: float, message: str) -> None:
        seen.append(message)
        if "fc1" in message:
            token.cancel()

    with pytest.raises(Cancelled):
        sweep(model, data, "exact", LEVELS, progress=progress, cancel=token)
    assert any("conv1: sparsity" in message for message in seen)
    assert not any("fc2" in message for message in seen)


def test_exact_stops_an_axis_once_it_has_collapsed(conv_mlp: tuple[Path, Path]) -> None:
    """With the floor just under the baseline, the first level that loses a sample ends it."""
    model = load_model(conv_mlp[0])
    data = open_data(str(conv_mlp[1]), model.inputs)
    settings = SweepSettings(sparsities=(0.5, 0.9, 0.95), bits=(8,), activations=False,
                             collapse_fraction=0.99)
    curve = sweep(model, data, "exact", settings, layers=["fc1"]).layer("fc1").curves["sparsity"]
    assert curve.status[:2] == ["baseline", MEASURED] and curve.metric[1] < 1.0
    assert curve.status[2:] == [EXTRAPOLATED, EXTRAPOLATED]
    assert curve.metric[2:] == [curve.metric[1]] * 2
    assert curve.bytes[3] < curve.bytes[1]  # storage still follows the level

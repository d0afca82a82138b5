"""SmoothQuant-style outlier migration (engine.methods.smoothquant) on small ONNX graphs whose
activations have two input channels 50x larger than the rest."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.errors import PlanError
from engine.methods.smoothquant import find_targets, smooth_model, smoothing_scales
from engine.methods.static_int8 import quantize_static_int8
from engine.plan import Plan

WIDTH, OUT = 16, 12


def _outlier_model(residual: bool = False, chain: bool = False) -> onnx.ModelProto:
    """x -> LayerNorm (channels 0, 1 scaled 50x) -> MatMul W1 (+bias) [-> MatMul W2] -> y;
    `residual` also adds the LayerNorm output to the result (a second reader: no fold)."""
    rng = np.random.default_rng(0)
    gamma = np.ones(WIDTH, np.float32)
    gamma[:2] = 50.0
    inits = [numpy_helper.from_array(gamma, "gamma"),
             numpy_helper.from_array(rng.normal(0, 0.1, WIDTH).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0, 0.3, (WIDTH, WIDTH)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, WIDTH).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (WIDTH, OUT)).astype(np.float32), "w2")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1,
                              name="ln"),
             helper.make_node("MatMul", ["ln", "w1"], ["h0"], name="mm1"),
             helper.make_node("Add", ["h0", "b1"], ["h"], name="add1")]
    last = "h"
    if residual:
        nodes.append(helper.make_node("Add", ["h", "ln"], ["r"], name="residual"))
        last = "r"
    if chain:
        nodes.append(helper.make_node("MatMul", [last, "w2"], ["y"], name="mm2"))
        last = "y"
    out_width = OUT if chain else WIDTH
    nodes.append(helper.make_node("Identity", [last], ["out"], name="out"))
    graph = helper.make_graph(nodes, "outliers",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                             ["n", out_width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(count: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (32, WIDTH)).astype(np.float32)} for _ in range(count)]


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


@pytest.mark.parametrize("residual,chain", [(False, False), (True, False), (False, True),
                                            (True, True)])
def test_smoothing_keeps_fp32_outputs(residual: bool, chain: bool) -> None:
    model = _outlier_model(residual, chain)
    feeds = _feeds()
    smoothed, inserted, count = smooth_model(model, feeds, 0.5)
    assert count == (2 if chain else 1)
    np.testing.assert_allclose(_run(smoothed, feeds), _run(model, feeds), rtol=1e-5, atol=1e-5)
    # the LayerNorm output has a second reader with the residual: a Mul, else a fold
    assert bool(inserted) == residual
    gamma = {t.name: numpy_helper.to_array(t) for t in smoothed.graph.initializer}["gamma"]
    assert (gamma[:2] < 50.0).all() != residual  # folded: the outliers left the LayerNorm


def test_scales_follow_the_formula() -> None:
    x, w = np.array([100.0, 1.0, 0.0]), np.array([1.0, 4.0, 2.0])
    np.testing.assert_allclose(smoothing_scales(x, w, 0.5), [10.0, 0.5, 1.0])
    np.testing.assert_allclose(smoothing_scales(x, w, 0.75), [100 ** 0.75, 4 ** -0.25, 1.0])


def test_shared_weights_are_not_targets() -> None:
    model = _outlier_model()
    model.graph.node.append(helper.make_node("MatMul", ["h", "w1"], ["again"], name="mm_again"))
    assert "ln" not in find_targets(model) and "h" not in find_targets(model)


def _int8_error(model: onnx.ModelProto, smoothing: float | None) -> float:
    calibration, test = _feeds(4, seed=1), _feeds(2, seed=7)
    quantized = quantize_static_int8(model, calibration, per_channel=True, smoothing=smoothing)
    reference = _run(model, test)
    return float(np.mean((_run(quantized, test) - reference) ** 2) / np.mean(reference ** 2))


@pytest.mark.parametrize("residual", [False, True])
def test_smoothing_lowers_static_int8_error(residual: bool) -> None:
    model = _outlier_model(residual=residual, chain=True)
    plain, smoothed = _int8_error(model, None), _int8_error(model, 0.5)
    # with a residual the LayerNorm output itself is still rounded for the Add it feeds
    assert smoothed < (0.9 if residual else 0.5) * plain, (plain, smoothed)


def test_plan_round_trip_and_refusals() -> None:
    plan = Plan.from_dict({"activation_quant": {"calibration": "minmax", "smoothing": 0.6}})
    assert plan.activation_quant is not None and plan.activation_quant.smoothing == 0.6
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    assert "smoothing" not in Plan.from_dict({"activation_quant": {}}).to_dict()["activation_quant"]
    for bad in (0, 1, 1.5, -0.1, "half", True, float("nan")):
        with pytest.raises(PlanError) as caught:
            Plan.from_dict({"activation_quant": {"smoothing": bad}})
        assert "\n" not in str(caught.value) and "smoothing" in str(caught.value)


def test_onnx_int8_export_smooths_when_the_plan_says(tmp_path) -> None:
    from engine.data import ArraySource
    from engine.export import export
    from engine.formats import load_model
    from engine.tensor_compress import apply_tensor_plan

    path = tmp_path / "outliers.onnx"
    proto = _outlier_model(chain=True)
    proto.ir_version = 8
    onnx.save(proto, path)
    model = load_model(path)
    data = ArraySource(np.concatenate([f["x"] for f in _feeds()]), None, "x")
    plan = Plan.from_dict({"activation_quant": {"smoothing": 0.5}})
    compressed, _ = apply_tensor_plan(model, plan, calibration=data)
    result = export(compressed, model, tmp_path / "int8.onnx", format="onnx-int8", data=data,
                    calibration=data, measure=False, keep_unverified=True)
    assert any("SmoothQuant, alpha 0.5" in note for note in result.notes), result.notes
    assert any("static_qdq_smoothed" in note for note in result.notes), result.notes

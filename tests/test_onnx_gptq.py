"""GPTQ and OBS pruning on ONNX graphs (issue 15, item 2): the statistics come from ONNX Runtime,
the maths from the torch methods. GPTQ of a MatMul weight (stored [in, out]) must equal GPTQ of
the equivalent torch Linear given the same XᵀX; OBS must leave exactly the requested sparsity;
what cannot be compensated is refused in one line before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engine.calibration_stats import InputStats
from engine.data import ArraySource
from engine.errors import PlanError
from engine.formats import load_model
from engine.methods.gptq import quantize_layer
from engine.plan import Plan, Quantization
from engine.tensor_compress import apply_tensor_plan

IN, HIDDEN, OUT = 24, 16, 6


def _graph(tmp_path: Path, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """input -> Relu -> MatMul fc1 ([in, out]) -> Relu -> Gemm fc2 (transB, [out, in])."""
    rng = np.random.default_rng(seed)
    weights = {"fc1.weight": rng.normal(0, 0.4, (IN, HIDDEN)).astype(np.float32),
               "fc2.weight": rng.normal(0, 0.4, (OUT, HIDDEN)).astype(np.float32),
               "fc2.bias": rng.normal(0, 0.1, OUT).astype(np.float32)}
    nodes = [helper.make_node("Relu", ["input"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "fc1.weight"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r1"], name="relu1"),
             helper.make_node("Gemm", ["r1", "fc2.weight", "fc2.bias"], ["logits"], name="fc2",
                              transB=1)]
    graph = helper.make_graph(
        nodes, "gptq_test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", OUT])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    return path, weights


def _inputs(count: int = 96) -> np.ndarray:
    # correlated inputs with uneven scales: compensation has something to exploit
    rng = np.random.default_rng(1)
    mix = rng.normal(0, 1, (IN, IN)) * np.linspace(0.2, 2.0, IN)
    return (rng.normal(0, 1, (count, IN)) @ mix).astype(np.float32)


def _stats(x: np.ndarray) -> InputStats:
    """XᵀX per sample of a layer input, as the ONNX path collects it (float64)."""
    x64 = x.astype(np.float64)
    xtx = torch.from_numpy(x64.T @ x64 / len(x))[None]
    return InputStats(xtx=xtx, mean=torch.zeros(1, x.shape[1], dtype=torch.float64),
                      channel_mean_abs=torch.zeros(0), rows=len(x), samples=len(x))


def _layer(model, key: str) -> str:
    return next(layer.name for layer in model.layers if layer.weight_key == key)


def test_gptq_on_a_matmul_equals_gptq_on_the_torch_linear(tmp_path: Path) -> None:
    path, weights = _graph(tmp_path)
    model = load_model(path)
    x = _inputs()
    settings = Quantization(bits=3, method="gptq")
    plan = Plan(layers={_layer(model, "fc1.weight"): {"quantization": settings},
                        _layer(model, "fc2.weight"): {"quantization": settings}})
    compressed, _ = apply_tensor_plan(model, plan, calibration=ArraySource(x, None, "x"))
    assert compressed.backend is not None
    # the torch Linear of fc1 is [out, in] = the MatMul weight transposed; its input relu(x)
    fc1 = torch.from_numpy(weights["fc1.weight"].T.copy())
    relu_x = np.maximum(x, 0)
    reference = quantize_layer(fc1, _stats(relu_x), settings).dequantize().numpy()
    got = np.asarray(compressed.backend.read("fc1.weight"))
    np.testing.assert_allclose(got, reference.T, rtol=0, atol=1e-6)
    # the stored codes are the same, in the MatMul's layout with one scale per output column
    q = compressed.quantized["fc1.weight"]
    assert tuple(q.codes.shape) == (IN, HIDDEN) and q.axis == 1
    np.testing.assert_allclose(q.dequantize().numpy(), got, atol=1e-6)
    # and it is not round-to-nearest: GPTQ changed some codes
    rtn = Quantization(bits=3)
    plain, _ = apply_tensor_plan(model, Plan(layers={_layer(model, "fc1.weight"):
                                                     {"quantization": rtn}}))
    assert not np.allclose(np.asarray(plain.backend.read("fc1.weight")), got)
    # the output error on the calibration data is smaller than round-to-nearest's
    exact = relu_x @ weights["fc1.weight"]
    gptq_error = np.square(relu_x @ got - exact).sum()
    rtn_error = np.square(relu_x @ np.asarray(plain.backend.read("fc1.weight")) - exact).sum()
    assert gptq_error < rtn_error


def test_obs_on_onnx_leaves_exactly_the_requested_sparsity(tmp_path: Path) -> None:
    path, weights = _graph(tmp_path)
    model = load_model(path)
    x = _inputs()
    plan = Plan.from_dict({"defaults": {"pruning": {"method": "obs", "amount": 0.6}}})
    compressed, _ = apply_tensor_plan(model, plan, calibration=ArraySource(x, None, "x"))
    for key in ("fc1.weight", "fc2.weight"):
        got = np.asarray(compressed.backend.read(key))
        assert got.shape == weights[key].shape
        assert int((got == 0).sum()) == round(0.6 * got.size), key
        assert compressed.masks[key].shape == got.shape
        assert bool((got[~compressed.masks[key].numpy()] == 0).all())
    # compensated: the kept weights moved, and the output error beats magnitude pruning's
    magnitude, _ = apply_tensor_plan(model, Plan.from_dict(
        {"defaults": {"pruning": {"method": "magnitude", "amount": 0.6}}}))
    relu_x = np.maximum(x, 0)
    exact = relu_x @ weights["fc1.weight"]
    obs = np.square(relu_x @ np.asarray(compressed.backend.read("fc1.weight")) - exact).sum()
    mag = np.square(relu_x @ np.asarray(magnitude.backend.read("fc1.weight")) - exact).sum()
    assert obs < 0.7 * mag


def test_what_cannot_be_compensated_is_refused_before_any_work(tmp_path: Path) -> None:
    path, _ = _graph(tmp_path)
    model = load_model(path)
    grouped = Plan.from_dict({"defaults": {"quantization": {
        "bits": 4, "method": "gptq", "granularity": "group", "group_size": 8}}})
    with pytest.raises(PlanError, match=r"fc1.*stored \[in, out\]"):
        apply_tensor_plan(model, grouped, calibration=ArraySource(_inputs(), None, "x"))
    gptq = Plan.from_dict({"defaults": {"quantization": {"bits": 4, "method": "gptq"}}})
    with pytest.raises(PlanError, match="calibration data"):
        apply_tensor_plan(model, gptq)
    corrected = Plan.from_dict({"defaults": {"quantization": {"bits": 4},
                                             "bias_correction": True}})
    with pytest.raises(PlanError, match="bias correction"):
        apply_tensor_plan(model, corrected)


def test_the_cli_compresses_an_onnx_model_with_gptq_from_its_data(tmp_path: Path) -> None:
    """`compress model.onnx --plan gptq.yaml --data D`: the data calibrates; the file verifies."""
    from engine.cli import main

    plan = tmp_path / "gptq2.yaml"
    plan.write_text("defaults:\n  quantization: {bits: 2, granularity: per-channel, "
                    "method: gptq}\n")
    demo_onnx = Path(__file__).resolve().parents[1] / "resources" / "demo" / "digits_cnn.onnx"
    report = tmp_path / "report.json"
    assert main(["compress", str(demo_onnx), "--plan", str(plan), "--data", "demo",
                 "--format", "onnx-int8", "-o", str(tmp_path / "g.onnx"),
                 "--report", str(report)]) == 0
    import json

    accuracy = json.loads(report.read_text())["metrics_after"]["accuracy"]
    assert accuracy > 0.9  # 2-bit round-to-nearest gives 0.43 on this model


def test_statistics_capabilities_follow_the_backend(tmp_path: Path) -> None:
    """GPTQ/OBS where layer inputs can be read (eager torch, ONNX Runtime); bias correction on
    eager torch only; a compiled graph says why in one line, before any work."""
    from engine.backends.base import BIAS_CORRECTION, LAYER_STATISTICS
    from engine.compress import compress
    from engine.data import open_data
    from engine.demo import DEMO_MODEL
    from tests.factories_inputs import write_static_batch_pt2

    root = Path(__file__).resolve().parents[1]
    eager = load_model(DEMO_MODEL)
    onnx_model = load_model(root / "resources" / "demo" / "digits_cnn.onnx")
    program = load_model(write_static_batch_pt2(tmp_path)[0])
    assert eager.can(LAYER_STATISTICS) and eager.can(BIAS_CORRECTION)
    assert onnx_model.can(LAYER_STATISTICS) and not onnx_model.can(BIAS_CORRECTION)
    assert not program.can(LAYER_STATISTICS) and not program.can(BIAS_CORRECTION)
    gptq = Plan.from_dict({"defaults": {"quantization": {"bits": 4, "method": "gptq"}}})
    data = open_data("synthetic:8", program.inputs)
    with pytest.raises(PlanError, match="which a torch.export graph does not have"):
        compress(program, gptq, data, measure=False)
    corrected = Plan.from_dict({"defaults": {"quantization": {"bits": 4},
                                             "bias_correction": True}})
    with pytest.raises(PlanError, match="built for PyTorch modules only"):
        compress(onnx_model, corrected, open_data("demo", onnx_model.inputs), measure=False)

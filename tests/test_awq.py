"""AWQ-style activation-aware scaling (engine.methods.awq) for 4-bit weight-only ONNX MatMuls:
the search never loses to round to nearest on the calibration data, equals it at a = 0, and the
graph rewrite (LayerNorm fold or Mul) keeps the float maths exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engine.data import ArraySource
from engine.errors import PlanError
from engine.formats import load_model
from engine.methods.awq import AWQQuantization, output_error, rtn, search_scales
from engine.plan import Plan, Quantization
from engine.tensor_compress import apply_tensor_plan

WIDTH, OUT, GROUP = 64, 32, 32
SETTINGS = Quantization(bits=4, granularity="group", group_size=GROUP, method="awq")


def _graph(tmp_path: Path, residual: bool = False) -> Path:
    """x -> LayerNorm (channels 0, 1 scaled 50x) -> MatMul w ([in, out]) -> y (+ LayerNorm
    output through a residual projection when `residual`, a second reader of it)."""
    rng = np.random.default_rng(0)
    gamma = np.ones(WIDTH, np.float32)
    gamma[:2] = 50.0
    inits = [numpy_helper.from_array(gamma, "gamma"),
             numpy_helper.from_array(np.zeros(WIDTH, np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0, 0.3, (WIDTH, OUT)).astype(np.float32), "w")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1,
                              name="ln"),
             helper.make_node("MatMul", ["ln", "w"], ["y"], name="proj")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", OUT])]
    if residual:
        nodes.append(helper.make_node("Relu", ["ln"], ["side"], name="side"))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["n", WIDTH]))
    graph = helper.make_graph(nodes, "awq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "awq.onnx"
    onnx.save(model, path)
    return path


def _inputs(count: int = 128, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (count, WIDTH)).astype(np.float32)


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _layer_input(x: np.ndarray) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ln = (x - mean) / np.sqrt(var + 1e-5)
    ln[:, :2] *= 50.0
    return ln


def test_awq_never_loses_to_rtn_and_equals_it_at_zero() -> None:
    rng = np.random.default_rng(3)
    weight = torch.from_numpy(rng.normal(0, 0.3, (OUT, WIDTH)).astype(np.float32))
    x = torch.from_numpy(_layer_input(_inputs()).astype(np.float64))
    hessian, mean_abs = x.T @ x, x.abs().mean(0)
    plain = output_error(rtn(weight, SETTINGS).dequantize().double() - weight.double(), hessian)
    s, best, errors = search_scales([weight], hessian, mean_abs, SETTINGS)
    assert errors[0.0] == pytest.approx(plain, rel=1e-9)
    assert best <= plain and best < 0.9 * plain  # the outlier inputs make scaling pay
    s0, only_zero, _ = search_scales([weight], hessian, mean_abs, SETTINGS, grid=(0.0,))
    assert only_zero == pytest.approx(plain, rel=1e-9) and torch.equal(s0, torch.ones(WIDTH,
                                                                         dtype=torch.float64))


@pytest.mark.parametrize("residual", [False, True])
def test_awq_on_onnx_beats_rtn_and_keeps_the_graph_exact(tmp_path: Path, residual: bool) -> None:
    model = load_model(_graph(tmp_path, residual))
    name = next(layer.name for layer in model.layers if layer.weight_key == "w")
    calibration = _inputs()
    data = ArraySource(calibration, None, "x")
    errors = {}
    for method in ("rtn", "awq"):
        settings = Quantization(bits=4, granularity="group", group_size=GROUP, method=method)
        compressed, _ = apply_tensor_plan(model, Plan(layers={name: {"quantization": settings}}),
                                          calibration=data)
        proto = compressed.backend.full_proto()
        reference = _run(model.backend.full_proto(), calibration)
        errors[method] = float(np.mean((_run(proto, calibration) - reference) ** 2))
        if method == "awq":
            ops = [node.op_type for node in proto.graph.node]
            assert ("Mul" in ops) == residual  # no second reader: folded into the LayerNorm
            q = compressed.quantized["w"]
            assert tuple(q.codes.shape) == (OUT, WIDTH)  # [out, in]: MatMulNBits' layout
            assert any("AWQ" in note for note in compressed.notes)
    assert errors["awq"] < errors["rtn"], errors


def test_awq_plan_round_trip_and_refusals(tmp_path: Path) -> None:
    data = {"defaults": {"quantization": {"bits": 4, "method": "awq", "granularity": "group",
                                          "group_size": 32}}}
    plan = Plan.from_dict(data)
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    assert plan.to_dict()["defaults"]["quantization"]["method"] == "awq"
    for bad in ({"method": "awq", "damping": 0.1}, {"method": "awq", "bits": "fp16"}):
        with pytest.raises(PlanError) as caught:
            Plan.from_dict({"defaults": {"quantization": bad}})
        assert "\n" not in str(caught.value)
    model = load_model(_graph(tmp_path))
    name = next(layer.name for layer in model.layers if layer.weight_key == "w")
    with pytest.raises(PlanError) as caught:
        apply_tensor_plan(model, Plan(layers={name: {"quantization": SETTINGS}}))
    assert "calibration" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_onnx_w4_file_computes_what_the_plan_computed(tmp_path: Path, method: str) -> None:
    """A square MatMul weight: round-to-nearest codes kept in the stored [in, out] layout must
    not be written to MatMulNBits as if they were [out, in] (the layer would use Wᵀ)."""
    from engine.export import export

    rng = np.random.default_rng(5)
    square = {"w": rng.normal(0, 0.3, (WIDTH, WIDTH)).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH])],
        [numpy_helper.from_array(square["w"], "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "square.onnx")
    model = load_model(tmp_path / "square.onnx")
    x = _inputs()
    data = ArraySource(x, None, "x")
    settings = Quantization(bits=4, granularity="group", group_size=GROUP, method=method)
    compressed, _ = apply_tensor_plan(model, Plan(defaults={"quantization": settings}),
                                      calibration=data)
    planned = _run(compressed.backend.full_proto(), x)
    export(compressed, model, tmp_path / "w4.onnx", format="onnx-w4", data=data, measure=False,
           keep_unverified=True)
    written = _run(onnx.load(tmp_path / "w4.onnx"), x)
    reference = _run(proto, x)
    error = float(np.mean((written - reference) ** 2) / np.mean(reference ** 2))
    assert error < 0.05, error  # Wᵀ instead of W would be an error near 2
    if method == "awq":  # its own codes, written as they are
        np.testing.assert_allclose(written, planned, rtol=1e-3, atol=1e-3)


def test_awq_refuses_a_weight_it_cannot_scale_before_any_work(tmp_path: Path) -> None:
    """W @ X (the weight on the left): its inputs are not the activation's last axis."""
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["w", "x"], ["y"], name="left")], "left",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [WIDTH, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [OUT, "n"])],
        [numpy_helper.from_array(rng.normal(0, 1, (OUT, WIDTH)).astype(np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "left.onnx")
    model = load_model(tmp_path / "left.onnx")
    with pytest.raises(PlanError) as caught:  # no calibration given: refused before needing it
        apply_tensor_plan(model, Plan(defaults={"quantization": SETTINGS}))
    message = str(caught.value)
    assert "AWQ is built for MatMul" in message and "\n" not in message


class _Block(torch.nn.Module):
    """LayerNorm (two outlier channels) -> q, k Linears -> GELU -> out Linear; `residual` adds
    the LayerNorm output to q's (a reader that is not an AWQ Linear)."""

    def __init__(self, residual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(WIDTH)
        with torch.no_grad():
            self.norm.weight[:2] = 50.0
        self.q, self.k = torch.nn.Linear(WIDTH, WIDTH), torch.nn.Linear(WIDTH, WIDTH)
        self.out = torch.nn.Linear(WIDTH, OUT)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q = self.q(h) + (h if self.residual else 0)
        return self.out(torch.nn.functional.gelu(q * self.k(h)))


def _torch_awq(block: torch.nn.Module, names: list[str], method: str) -> torch.nn.Module:
    import copy

    from engine.compressed import CompressedModel
    from engine.methods.base import Context
    from engine.methods.quantize import UniformQuantization
    from engine.plan import LayerPlan

    work = copy.deepcopy(block)
    settings = Quantization(bits=4, granularity="group", group_size=GROUP, method=method)
    layers = {name: LayerPlan(quantization=settings) for name in names}
    batches = [(torch.from_numpy(_inputs(64, seed)), None) for seed in (1, 2)]
    chosen = AWQQuantization() if method == "awq" else UniformQuantization()
    chosen.apply(work, layers, CompressedModel(module=work), Context(calibration=batches))
    return work


def test_torch_awq_folds_into_the_layernorm_and_beats_rtn() -> None:
    block = _Block()
    x = torch.from_numpy(_inputs(128, 1))
    with torch.no_grad():
        reference = block(x)
        errors = {m: float(((_torch_awq(block, ["q", "k"], m)(x) - reference) ** 2).mean())
                  for m in ("rtn", "awq")}
    assert errors["awq"] < errors["rtn"], errors
    folded = _torch_awq(block, ["q", "k"], "awq")
    assert not torch.equal(folded.norm.weight, block.norm.weight)  # 1/s went into the LayerNorm


@pytest.mark.parametrize("residual,names", [(False, ["out"]), (True, ["q", "k"])])
def test_torch_awq_refuses_a_layer_without_an_exact_fold(residual: bool, names: list[str]) -> None:
    with pytest.raises(PlanError) as caught:
        _torch_awq(_Block(residual), names, "awq")
    message = str(caught.value)
    assert "AWQ folds 1/s" in message and "\n" not in message

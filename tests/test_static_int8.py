"""Int8 and weight-only quantization of ONNX graphs, on small models built here and run in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from engine import onnx_tools
from engine.errors import SlimscopeError
from engine.jobs import CancelToken, Cancelled
from engine.methods.static_int8 import (
    Int8Candidate,
    Int8Report,
    _choose,
    quantize_dynamic_int8,
    quantize_int8_best,
    quantize_static_int8,
    quantize_weight_only,
)
from factories import TinyTransformer

IMAGE = (3, 16, 16)


def conv_net() -> nn.Module:
    """About 240k weights: enough that int8's fixed overhead (scales, zero points) is small."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def conv_only_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 8, 3, padding=1)).eval()


def images(count: int, seed: int) -> np.ndarray:
    """Structured images (offsets, stripes, noise): logits that differ, unlike pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE[1], 0:IMAGE[2]] / IMAGE[1]
    stripes = np.sin(2 * np.pi * rng.uniform(1, 4, (count, 1, 1, 1))
                     * (xx + yy * rng.uniform(-1, 1, (count, 1, 1, 1))))
    return (rng.standard_normal((count, 3, 1, 1)) + stripes * rng.uniform(0.5, 2, (count, 3, 1, 1))
            + 0.3 * rng.standard_normal((count, *IMAGE))).astype(np.float32)


def sequences(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 16, 32)).astype(np.float32)


def reference(net: nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(batch)).numpy()


def outputs(model: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    return onnx_tools.run(onnx_tools.session(model, threads=1), batch)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def initializer_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    return {tensor.name: tensor.data_type for tensor in model.graph.initializer}


@pytest.fixture(scope="module")
def conv_fp32() -> tuple[nn.Module, onnx.ModelProto]:
    net = conv_net()
    return net, onnx_tools.export_onnx(net, torch.zeros(1, *IMAGE))


@pytest.fixture(scope="module")
def transformer_fp32() -> tuple[nn.Module, onnx.ModelProto]:
    torch.manual_seed(2)
    net = TinyTransformer(activation=nn.ReLU).eval()
    return net, onnx_tools.export_onnx(net, torch.zeros(1, 16, 32))


# -- static int8 ------------------------------------------------------------------------------
def test_static_int8_is_quarter_size_valid_and_agrees_with_fp32(conv_fp32) -> None:
    net, fp32 = conv_fp32
    steps: list[float] = []
    quantized = quantize_static_int8(fp32, [images(16, seed) for seed in range(3)],
                                     progress=lambda fraction, message="": steps.append(fraction))
    onnx_tools.validate(quantized)
    ratio = onnx_tools.serialized_size(quantized) / onnx_tools.serialized_size(fp32)
    assert ratio <= 0.30
    conv_weights = [t for t in quantized.graph.initializer if len(t.dims) == 4]
    assert conv_weights and all(t.data_type == TensorProto.INT8 for t in conv_weights)
    scales = [t for t in quantized.graph.initializer if t.name.endswith("_scale") and t.dims]
    assert scales, "per-channel weights carry one scale per output channel"
    dtypes = initializer_dtypes(quantized)
    activation_zero_points = [dtypes[node.input[2]] for node in quantized.graph.node
                              if node.op_type == "QuantizeLinear"]
    # uint8 activations: the only kind x86 ORT fuses into fast QLinearConv (see the module)
    assert activation_zero_points and set(activation_zero_points) == {TensorProto.UINT8}
    test = images(128, seed=99)
    expected, produced = reference(net, test), outputs(quantized, test)
    assert (expected.argmax(1) == produced.argmax(1)).mean() >= 0.95
    assert cosine(expected, produced) >= 0.99
    assert steps == sorted(steps) and steps[-1] == 1.0


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibrations_run_and_stay_close(conv_fp32, method: str) -> None:
    net, fp32 = conv_fp32
    quantized = quantize_static_int8(fp32, [images(16, 0)], method=method)
    test = images(64, seed=98)
    assert cosine(reference(net, test), outputs(quantized, test)) >= 0.98


def test_unknown_calibration_method_is_refused(conv_fp32) -> None:
    with pytest.raises(SlimscopeError, match="unknown calibration method 'median'"):
        quantize_static_int8(conv_fp32[1], [images(2, 0)], method="median")


def test_opset_11_model_is_upgraded_for_per_channel_scales() -> None:
    net = conv_only_net()
    old = onnx_tools.export_onnx(net, torch.zeros(1, *IMAGE), opset=11)
    assert onnx_tools.opset_version(old) == 11
    quantized = quantize_static_int8(old, [images(8, 0)], per_channel=True)
    assert onnx_tools.opset_version(quantized) >= 13
    axes = [attribute.i for node in quantized.graph.node if node.op_type == "DequantizeLinear"
            for attribute in node.attribute if attribute.name == "axis"]
    assert axes, "per-channel DequantizeLinear needs its axis, which opset 11 lacks"
    onnx_tools.validate(quantized)
    test = images(16, 3)
    assert cosine(reference(net, test), outputs(quantized, test)) >= 0.99


@pytest.mark.parametrize("pre_process", [True, False])
def test_weights_in_constant_nodes_are_really_quantized(pre_process: bool) -> None:
    rng = np.random.default_rng(0)
    conv_weight = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    dense_weight = rng.standard_normal((16, 10)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Constant", [], ["conv_w"], value=numpy_helper.from_array(conv_weight)),
        helper.make_node("Constant", [], ["dense_w"], value=numpy_helper.from_array(dense_weight)),
        helper.make_node("Conv", ["input", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "dense_w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "constant_weights",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
    )
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantized = quantize_static_int8(fp32, [images(8, 0)], pre_process=pre_process)
    assert "Constant" not in {node.op_type for node in quantized.graph.node}
    by_shape = {tuple(t.dims): t.data_type for t in quantized.graph.initializer}
    assert by_shape[conv_weight.shape] == TensorProto.INT8
    assert by_shape[dense_weight.shape] == TensorProto.INT8
    test = images(16, 4)
    assert cosine(outputs(fp32, test), outputs(quantized, test)) >= 0.99


def test_cancel_stops_calibration(conv_fp32) -> None:
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        quantize_static_int8(conv_fp32[1], [images(4, 0)], cancel=token)


# -- dynamic int8 and the best format -----------------------------------------------------------
def test_dynamic_int8_quantizes_matmuls_including_the_gemm_head(transformer_fp32) -> None:
    net, fp32 = transformer_fp32
    assert "Gemm" in {node.op_type for node in fp32.graph.node}
    quantized = quantize_dynamic_int8(fp32)
    op_types = {node.op_type for node in quantized.graph.node}
    assert "MatMulInteger" in op_types and "Gemm" not in op_types
    float_matrices = [t for t in quantized.graph.initializer
                      if t.data_type == TensorProto.FLOAT and len(t.dims) == 2]
    assert float_matrices == []  # every weight matrix, the head's too, is int8
    test = sequences(32, 5)
    assert cosine(reference(net, test), outputs(quantized, test)) >= 0.99


def test_dynamic_int8_quantizes_a_scaled_gemm_too() -> None:
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((48, 32)).astype(np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=0.5, beta=2.0, transB=1)],
        "scaled_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 48])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantized = quantize_dynamic_int8(fp32)  # ORT alone leaves alpha != 1 Gemms in float
    assert "MatMulInteger" in {node.op_type for node in quantized.graph.node}
    batch = rng.standard_normal((8, 32)).astype(np.float32)
    assert cosine(outputs(fp32, batch), outputs(quantized, batch)) >= 0.99


def test_best_int8_reports_every_candidate_and_returns_the_chosen_one(conv_fp32) -> None:
    net, fp32 = conv_fp32
    chosen, report = quantize_int8_best(fp32, [images(8, 0), images(8, 1)], repeats=6)
    assert [c.name for c in report.candidates] == [
        "static_qdq", "weight_only", "dynamic_matmul", "static_rest_dynamic_matmul"]
    assert sum(c.chosen for c in report.candidates) == 1
    assert all(c.reason for c in report.candidates)
    assert report.chosen.bytes == onnx_tools.serialized_size(chosen)
    assert report.chosen.size_ratio <= 0.30  # the head-only dynamic candidate is never chosen
    assert report.to_dict()["candidates"][0]["name"] == "static_qdq"
    test = images(32, 6)
    assert cosine(reference(net, test), outputs(chosen, test)) >= 0.99


def _candidate(name: str, size: float, latency: float, cos: float = 0.999) -> Int8Candidate:
    return Int8Candidate(name=name, description=name, bytes=int(size * 1000), size_ratio=size,
                         median_ms=latency * 10, p90_ms=latency * 11, latency_ratio=latency,
                         output_cosine=cos)


@pytest.mark.parametrize("candidates, expected", [
    # the smaller format wins only if it is not slower than fp32
    ([_candidate("static", 0.25, 1.5), _candidate("dynamic", 0.27, 0.8)], "dynamic"),
    # sizes within 5% tie; latencies within 10% tie; the earlier candidate then wins
    ([_candidate("static", 0.25, 0.42), _candidate("mixed", 0.255, 0.40)], "static"),
    ([_candidate("static", 0.25, 0.60), _candidate("mixed", 0.255, 0.40)], "mixed"),
    # an inaccurate candidate is never chosen, however small and fast
    ([_candidate("broken", 0.2, 0.1, cos=0.5), _candidate("static", 0.25, 0.5)], "static"),
    # all slower than fp32: the fastest accurate one, flagged in its reason
    ([_candidate("static", 0.25, 3.0), _candidate("dynamic", 0.27, 2.0)], "dynamic"),
])
def test_choice_rules(candidates: list[Int8Candidate], expected: str) -> None:
    report = Int8Report(fp32_bytes=1000, fp32_median_ms=10.0, threads=1, candidates=candidates)
    _choose(report, min_cosine=0.99)
    assert report.chosen.name == expected
    assert all(c.reason for c in candidates)


# -- weight-only ----------------------------------------------------------------------------
def matmul_weight_bytes(model: onnx.ModelProto, op_type: str, inputs: slice) -> int:
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    return sum(sizes.get(name, 0) for node in model.graph.node if node.op_type == op_type
               for name in node.input[inputs])


def test_weight_only_4bit_shrinks_matmul_weights_fivefold_and_runs(transformer_fp32) -> None:
    net, fp32 = transformer_fp32
    fp32_bytes = matmul_weight_bytes(onnx_tools.gemm_to_matmul(fp32), "MatMul", slice(1, 2))
    quantized = quantize_weight_only(fp32, bits=4, block_size=32)
    op_types = [node.op_type for node in quantized.graph.node]
    assert op_types.count("MatMulNBits") == 8 and "Gemm" not in op_types  # 7 Linear + head
    packed_bytes = matmul_weight_bytes(quantized, "MatMulNBits", slice(1, 4))
    assert packed_bytes <= 0.2 * fp32_bytes
    test = sequences(32, 7)
    expected = reference(net, test)
    assert cosine(expected, outputs(quantized, test)) >= 0.98
    eight_bit = quantize_weight_only(fp32, bits=8)
    assert np.abs(outputs(eight_bit, test) - expected).max() < \
        np.abs(outputs(quantized, test) - expected).max()


def test_weight_only_on_a_conv_model_names_the_operator() -> None:
    fp32 = onnx_tools.export_onnx(conv_only_net(), torch.zeros(1, *IMAGE))
    with pytest.raises(SlimscopeError, match="no 4-bit kernel for Conv"):
        quantize_weight_only(fp32, bits=4)


def test_weight_only_on_a_mixed_model_errs_unless_told_to_skip(conv_fp32) -> None:
    _, fp32 = conv_fp32
    with pytest.raises(SlimscopeError, match="no 4-bit kernel for Conv"):
        quantize_weight_only(fp32, bits=4)
    quantized = quantize_weight_only(fp32, bits=4, skip_unsupported=True)
    op_types = [node.op_type for node in quantized.graph.node]
    assert op_types.count("MatMulNBits") == 1 and op_types.count("Conv") == 4


def test_weight_only_4bit_quantizes_embedding_tables() -> None:
    class Embedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(500, 64)
            self.head = nn.Linear(64, 4)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.table(tokens)).mean(dim=1)

    torch.manual_seed(3)
    net = Embedder().eval()
    tokens = torch.randint(0, 500, (2, 8))
    fp32 = onnx_tools.export_onnx(net, tokens, input_names=("tokens",))
    quantized = quantize_weight_only(fp32, bits=4)
    assert {"GatherBlockQuantized", "MatMulNBits"} <= {n.op_type for n in quantized.graph.node}
    assert onnx_tools.serialized_size(quantized) < 0.25 * onnx_tools.serialized_size(fp32)
    produced = onnx_tools.run(onnx_tools.session(quantized), tokens.numpy())
    assert cosine(reference(net, tokens.numpy()), produced) >= 0.98
    with pytest.raises(SlimscopeError, match="no 8-bit kernel for Gather"):
        quantize_weight_only(fp32, bits=8)


@pytest.mark.parametrize("bits, block_size, message", [
    (3, 32, "4 or 8 bits"), (4, 24, "power of two"), (4, 8, "power of two")])
def test_weight_only_refuses_settings_ort_cannot_run(transformer_fp32, bits: int,
                                                     block_size: int, message: str) -> None:
    with pytest.raises(SlimscopeError, match=message):
        quantize_weight_only(transformer_fp32[1], bits=bits, block_size=block_size)


def test_a_fixed_batch_graph_is_calibrated_in_its_own_batch_size() -> None:
    """A .pt2 exported at batch 1 becomes an ONNX graph whose input is [1, ...]: ORT's
    calibrator must be fed one sample at a time, not the data's batches of 32."""
    from engine.methods.static_int8 import calibration_feeds

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph)
    feeds = calibration_feeds(model, [np.zeros((8, 4), np.float32), np.ones((3, 4), np.float32)])
    assert len(feeds) == 11 and all(feed["x"].shape == (1, 4) for feed in feeds)


def _two_input_fixed_batch_graph() -> onnx.ModelProto:
    """Silero's shape after .pt2 -> ONNX: `x` [1, 8] and a recurrent `state` [2, 1, 4] whose
    batch sits on axis 1, a Gemm of x, and the state's sum added to it."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
        helper.make_node("ReduceSum", ["state", "axes"], ["summed"], keepdims=0, name="sum"),
        helper.make_node("Add", ["xw", "summed"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[weight, numpy_helper.from_array(np.array([0], np.int64), "axes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_fixed_batch_graph_with_several_inputs_is_cut_along_each_inputs_axis() -> None:
    """Every input is cut to the graph's batch on its own sample axis (state on axis 1), as
    data sources (NamedInputs) or as plain dicts replayed from earlier feeds; the last, short
    piece is padded."""
    from engine.data import NamedInputs
    from engine.methods.static_int8 import calibration_feeds

    model = _two_input_fixed_batch_graph()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    state = rng.standard_normal((2, 5, 4)).astype(np.float32)
    feeds = calibration_feeds(model, [(NamedInputs({"x": x, "state": state},
                                                   {"x": 0, "state": 1}), None)])
    assert len(feeds) == 5
    assert all(feed["x"].shape == (1, 8) and feed["state"].shape == (2, 1, 4) for feed in feeds)
    np.testing.assert_array_equal(feeds[3]["state"][:, 0], state[:, 3])
    # a plain dict has no axes of its own: the graph's shapes say state's batch is on axis 1
    again = calibration_feeds(model, [{"x": x[:3], "state": state[:, :3]}])
    assert [feed["state"].shape for feed in again] == [(2, 1, 4)] * 3
    np.testing.assert_array_equal(again[2]["x"][0], x[2])


def test_static_int8_calibrates_a_two_input_fixed_batch_graph() -> None:
    """ORT's calibrator used to get the data's whole batch ("Got: 32 Expected: 1")."""
    from engine.data import NamedInputs

    model = _two_input_fixed_batch_graph()
    rng = np.random.default_rng(2)
    batch = NamedInputs({"x": rng.standard_normal((32, 8)).astype(np.float32),
                         "state": rng.standard_normal((2, 32, 4)).astype(np.float32)},
                        {"x": 0, "state": 1})
    quantized, report = quantize_int8_best(model, [batch], repeats=2)
    assert report.chosen.output_cosine > 0.99
    feed = {"x": batch["x"][:1], "state": batch["state"][:, :1]}
    expected = onnx_tools.session(model).run(None, feed)[0]
    produced = onnx_tools.session(quantized).run(None, feed)[0]
    assert np.allclose(produced, expected, atol=0.1)


def test_weights_int8_everywhere_twice_leaves_the_first_scales_float() -> None:
    """quantize_int8_best runs it over every candidate, the weight-only one built by it too:
    a per-row scale of 258 values (silero's STFT conv) must not become codes of its own."""
    from engine.methods.static_int8 import weights_int8_everywhere

    rng = np.random.default_rng(4)
    weight = numpy_helper.from_array(rng.standard_normal((258, 1, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 258, 13])], [weight])
    once, first = weights_int8_everywhere(helper.make_model(graph))
    twice, second = weights_int8_everywhere(once)
    assert (first, second) == (1, 0)
    assert onnx_tools.serialized_size(twice) == onnx_tools.serialized_size(once)
    assert [n.op_type for n in twice.graph.node].count("Cast") == 1

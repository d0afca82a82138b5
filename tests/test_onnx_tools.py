"""ONNX plumbing: export, graph repairs, validation, sessions and timing, on real small models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from engine import onnx_tools
from engine.errors import SlimscopeError


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    net[1].running_mean.uniform_(-0.5, 0.5)  # BatchNorm folding must use these, not defaults
    return net.eval()


def conv_graph_with_constant_weight() -> tuple[onnx.ModelProto, np.ndarray]:
    """x -> Conv(weight from a Constant node) -> y, as some exporters write it."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)),
        helper.make_node("Constant", [], ["shift"], value_float=0.5),
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["conv", "shift"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "constant_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 6, 6])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weight


def outputs(model: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    return onnx_tools.run(onnx_tools.session(model, threads=1), batch)


# -- export ---------------------------------------------------------------------------------
def test_export_matches_torch_for_any_batch_size_and_restores_training_mode() -> None:
    net = small_cnn().train()
    model = onnx_tools.export_onnx(net, torch.zeros(1, 3, 8, 8))
    assert net.training  # export ran in eval mode and put the flag back
    net.eval()
    assert {node.op_type for node in model.graph.node} >= {"Conv", "Gemm"}
    assert "BatchNormalization" not in {node.op_type for node in model.graph.node}  # folded
    batch = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(outputs(model, batch), expected, rtol=1e-4, atol=1e-5)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]


def test_export_of_an_unsupported_operator_is_one_clear_line() -> None:
    class Eigen(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eig(x)[0].real

    with pytest.raises(SlimscopeError, match="could not export Eigen.*linalg_eig") as caught:
        onnx_tools.export_onnx(Eigen(), torch.randn(2, 4, 4))
    assert "\n" not in str(caught.value)


# -- repairs --------------------------------------------------------------------------------
def test_upgrade_opset_converts_old_models_and_keeps_their_outputs() -> None:
    net = small_cnn()
    old = onnx_tools.export_onnx(net, torch.zeros(1, 3, 8, 8), opset=11)
    upgraded = onnx_tools.upgrade_opset(old, 13)
    assert onnx_tools.opset_version(old) == 11
    assert onnx_tools.opset_version(upgraded) == 13
    batch = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(outputs(upgraded, batch), outputs(old, batch), rtol=1e-5, atol=1e-6)
    assert onnx_tools.upgrade_opset(upgraded, 13) is upgraded  # already new enough: untouched


def test_constants_become_initializers_without_changing_results() -> None:
    model, weight = conv_graph_with_constant_weight()
    repaired = onnx_tools.constants_to_initializers(model)
    assert [node.op_type for node in repaired.graph.node] == ["Conv", "Add"]
    initializers = {t.name: numpy_helper.to_array(t) for t in repaired.graph.initializer}
    np.testing.assert_array_equal(initializers["w"], weight)
    assert initializers["shift"] == np.float32(0.5)
    assert [node.op_type for node in model.graph.node][0] == "Constant"  # input untouched
    batch = np.random.default_rng(3).standard_normal((2, 2, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(outputs(repaired, batch), outputs(model, batch), rtol=1e-6)


@pytest.mark.parametrize("alpha, beta, trans_b", [(1.0, 1.0, 1), (0.5, 2.0, 0)])
def test_gemm_becomes_matmul_plus_add_with_the_same_results(alpha: float, beta: float,
                                                            trans_b: int) -> None:
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=alpha, beta=beta,
                          transB=trans_b)],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    converted = onnx_tools.gemm_to_matmul(model)
    assert [node.op_type for node in converted.graph.node] == ["MatMul", "Add"]
    assert "w" not in {t.name for t in converted.graph.initializer}  # the old layout is gone
    onnx_tools.validate(converted)
    batch = rng.standard_normal((3, 5)).astype(np.float32)
    expected = alpha * batch @ (weight.T if trans_b else weight) + beta * bias
    np.testing.assert_allclose(outputs(converted, batch), expected, rtol=1e-5, atol=1e-5)


def test_gemm_with_a_computed_weight_is_left_alone() -> None:
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"])], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [n.op_type for n in onnx_tools.gemm_to_matmul(model).graph.node] == ["Gemm"]


# -- validation -------------------------------------------------------------------------------
def test_validate_accepts_a_good_model_from_memory_bytes_or_file(tmp_path) -> None:
    model = onnx_tools.export_onnx(small_cnn(), torch.zeros(1, 3, 8, 8))
    path = tmp_path / "good.onnx"
    onnx.save(model, path)
    for source in (model, model.SerializeToString(), path):
        onnx_tools.validate(source)


def test_validate_rejects_a_malformed_graph_in_one_line() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["missing"], ["y"])], "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    broken = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(SlimscopeError, match="invalid ONNX model") as caught:
        onnx_tools.validate(broken)
    assert "\n" not in str(caught.value)


def test_validate_rejects_what_only_onnx_runtime_cannot_run() -> None:
    graph = helper.make_graph(
        [helper.make_node("Mystery", ["x"], ["y"], domain="com.example")], "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    onnx.checker.check_model(model, full_check=True)  # valid ONNX as far as the checker knows
    with pytest.raises(SlimscopeError, match="ONNX Runtime cannot load.*Mystery"):
        onnx_tools.validate(model)


# -- sessions, timing, size -------------------------------------------------------------------
def test_run_feeds_arrays_pairs_and_mappings_alike() -> None:
    model = onnx_tools.export_onnx(small_cnn(), torch.zeros(1, 3, 8, 8))
    sess = onnx_tools.session(model.SerializeToString(), threads=1)
    batch = np.random.default_rng(5).standard_normal((2, 3, 8, 8))  # float64 is cast
    from_array = onnx_tools.run(sess, batch)
    from_pair = onnx_tools.run(sess, (batch, np.array([0, 1])))
    from_mapping = onnx_tools.run(sess, {"input": batch.astype(np.float32)})
    assert from_array.shape == (2, 5) and from_array.dtype == np.float32
    np.testing.assert_array_equal(from_array, from_pair)
    np.testing.assert_array_equal(from_array, from_mapping)


def test_latency_is_measured_in_milliseconds_with_median_below_p90() -> None:
    model = onnx_tools.export_onnx(small_cnn(), torch.zeros(1, 3, 8, 8))
    batch = np.zeros((1, 3, 8, 8), np.float32)
    latency = onnx_tools.onnx_latency_ms(model, batch, repeats=7, warmup=1)
    assert 0.0 < latency["median_ms"] <= latency["p90_ms"] < 1000.0
    both = onnx_tools.compare_latency_ms({"a": model, "b": model}, batch, repeats=6, warmup=1)
    assert set(both) == {"a", "b"}
    assert all(0.0 < entry["median_ms"] <= entry["p90_ms"] for entry in both.values())


def test_serialized_size_is_the_file_size(tmp_path) -> None:
    model = onnx_tools.export_onnx(small_cnn(), torch.zeros(1, 3, 8, 8))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert onnx_tools.serialized_size(model) == path.stat().st_size
    weights = sum(p.numel() for p in small_cnn().parameters() if p.dim() > 1) * 4
    assert onnx_tools.serialized_size(model) > weights

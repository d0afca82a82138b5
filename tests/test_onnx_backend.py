"""ONNX weights wherever a graph keeps them (If branches, Loop bodies, outer-scope initializers,
external data), the OnnxBackend that reads, replaces and runs them, readable layer names for
exporter-generated weights, and low-rank factorization by graph rewrite; all through real
onnx / onnxruntime on graphs built by tests/factories_onnx.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import factories_onnx as factories
from engine.backends.base import LOW_RANK
from engine.backends.onnx_graph import OnnxBackend, factorize
from engine.errors import SlimscopeError
from engine.formats import load_model
from engine.plan import LowRank

BATCH = np.random.default_rng(0).standard_normal((5, factories.WIDTH)).astype(np.float32)
POSITIVE, NEGATIVE = np.abs(BATCH), -np.abs(BATCH)


def run(backend: OnnxBackend, batch: np.ndarray) -> np.ndarray:
    """The backend's own graph in onnxruntime (the runner of the evaluation code)."""
    return backend.runner(threads=1).run(batch)


def backend_of(path: Path) -> OnnxBackend:
    backend = load_model(path).backend
    assert isinstance(backend, OnnxBackend)
    return backend


# -- weights in subgraphs ---------------------------------------------------------------------
def test_if_branch_weights_and_outer_scope_initializers_are_layers(tmp_path: Path) -> None:
    model = load_model(factories.write(factories.if_model(), tmp_path, "if.onnx"))

    by_key = {layer.weight_key: layer for layer in model.layers}
    # "w" in both branches: one key each, told apart by the subgraph path
    assert set(by_key) == {"w_shared", "branch.then_branch/w", "branch.else_branch/w"}
    assert len({layer.name for layer in model.layers}) == 3
    assert all(layer.kind == "MatMul" for layer in model.layers)
    np.testing.assert_array_equal(model.weight(by_key["branch.then_branch/w"].name),
                                  factories.IF_WEIGHTS["then_w"])
    np.testing.assert_array_equal(model.weight(by_key["branch.else_branch/w"].name),
                                  factories.IF_WEIGHTS["else_w"])
    np.testing.assert_array_equal(model.backend.read("w_shared"), factories.IF_WEIGHTS["w_shared"])
    assert model.params == 3 * factories.WIDTH ** 2


def test_nested_loop_body_weights_are_layers(tmp_path: Path) -> None:
    model = load_model(factories.write(factories.nested_loop_model(), tmp_path, "loops.onnx"))

    assert sorted(layer.weight_key for layer in model.layers) == ["inner_w", "outer_w"]
    np.testing.assert_array_equal(model.backend.read("inner_w"), factories.LOOP_WEIGHTS["inner_w"])
    np.testing.assert_allclose(run(model.backend, BATCH), factories.nested_loop_reference(BATCH),
                               rtol=1e-4, atol=1e-5)


def test_with_weights_changes_the_branch_it_targets_and_not_the_original(tmp_path: Path) -> None:
    backend = backend_of(factories.write(factories.if_model(), tmp_path, "if.onnx"))
    before = backend.proto.SerializeToString()
    new_then = np.eye(factories.WIDTH, dtype=np.float32) * 2

    changed = backend.with_weights({"branch.then_branch/w": new_then})

    np.testing.assert_allclose(run(changed, POSITIVE),
                               factories.if_reference(POSITIVE, then_w=new_then), rtol=1e-5)
    np.testing.assert_allclose(run(changed, NEGATIVE), factories.if_reference(NEGATIVE), rtol=1e-5)
    np.testing.assert_array_equal(changed.read("branch.then_branch/w"), new_then)
    # the original backend and its proto are untouched
    np.testing.assert_allclose(run(backend, POSITIVE), factories.if_reference(POSITIVE),
                               rtol=1e-5)
    assert backend.proto.SerializeToString() == before


def test_with_weights_reaches_a_constant_inside_a_nested_loop(tmp_path: Path) -> None:
    backend = backend_of(factories.write(factories.nested_loop_model(), tmp_path, "loops.onnx"))
    inner = np.eye(factories.WIDTH, dtype=np.float32) * 0.5

    changed = backend.with_weights({"inner_w": inner})

    np.testing.assert_allclose(run(changed, BATCH),
                               factories.nested_loop_reference(BATCH, inner_w=inner),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(run(backend, BATCH), factories.nested_loop_reference(BATCH),
                               rtol=1e-4, atol=1e-5)


def test_with_weights_refuses_unknown_keys_and_wrong_shapes(tmp_path: Path) -> None:
    backend = backend_of(factories.write(factories.if_model(), tmp_path, "if.onnx"))
    with pytest.raises(SlimscopeError, match="no tensor named 'w'"):
        backend.with_weights({"w": np.zeros((4, 4), np.float32)})
    with pytest.raises(SlimscopeError, match="shape"):
        backend.with_weights({"w_shared": np.zeros((4, 5), np.float32)})


def test_subgraph_external_data_is_memory_mapped_and_replaceable(tmp_path: Path) -> None:
    path = factories.write_external(factories.if_model(), tmp_path, "if_ext.onnx")
    model = load_model(path)

    weight = model.backend.read("branch.then_branch/w")
    assert isinstance(weight, np.memmap)
    np.testing.assert_array_equal(weight, factories.IF_WEIGHTS["then_w"])
    assert isinstance(model.backend.read("w_shared"), np.memmap)

    changed = model.backend.with_weights({"branch.else_branch/w": np.zeros((4, 4), np.float32)})
    np.testing.assert_array_equal(run(changed, NEGATIVE), np.zeros_like(NEGATIVE))
    np.testing.assert_allclose(run(model.backend, NEGATIVE), factories.if_reference(NEGATIVE),
                               rtol=1e-5)
    saved = tmp_path / "saved.onnx"
    changed.save(saved)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(saved)).graph.initializer)


def test_subgraph_external_data_outside_the_folder_is_refused(tmp_path: Path) -> None:
    """Issue 12's rule holds for tensors inside If branches too."""
    proto = factories.if_model()
    path = factories.write_external(proto, tmp_path, "if_ext.onnx")
    hostile = onnx.load(str(path), load_external_data=False)
    branch = next(a.g for a in hostile.graph.node[-1].attribute if a.name == "then_branch")
    tensor = branch.node[0].attribute[0].t
    next(e for e in tensor.external_data if e.key == "location").value = "../../etc/passwd"
    onnx.save(hostile, str(path))
    with pytest.raises(SlimscopeError) as refused:
        load_model(path)
    assert "\n" not in str(refused.value)


# -- names --------------------------------------------------------------------------------------
def test_generated_weight_names_become_module_paths(tmp_path: Path) -> None:
    model = load_model(factories.write(factories.generated_names_model(), tmp_path, "gen.onnx"))
    assert model.layer_names() == ["layers.0.q", "layers.1.q", "features.0", "head.proj"]
    assert [layer.weight_key for layer in model.layers] == [
        "onnx::MatMul_701", "onnx::MatMul_702", "onnx::Gemm_703", "val_16"]


# -- low rank -----------------------------------------------------------------------------------
def test_factorize_matmul_and_transposed_gemm_equals_the_svd_product() -> None:
    proto = factories.matmul_gemm_model()
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    w_mm, w_fc, b_fc = (factories.LOW_RANK_WEIGHTS[k] for k in ("mm.weight", "fc.weight",
                                                                  "fc.bias"))

    def best(matrix: np.ndarray, rank: int) -> np.ndarray:
        u, s, vh = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vh[:rank]

    rewritten = factorize(factorize(proto, "mm.weight", 4), "fc.weight", 3)
    onnx.checker.check_model(rewritten)
    expected = 0.5 * (x @ best(w_mm, 4)) @ best(w_fc.T, 3) + b_fc
    got = OnnxBackend(rewritten, Path("low_rank.onnx")).runner(threads=1).run(x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert {node.op_type for node in rewritten.graph.node} == {"MatMul", "Gemm"}
    names = {t.name: tuple(t.dims) for t in rewritten.graph.initializer}
    assert "mm.weight" not in names and "fc.weight" not in names
    assert names["mm.weight.lowrank_first"] == (16, 4)
    assert names["mm.weight.lowrank_second"] == (4, 12)
    assert names["fc.weight.lowrank_second"] == (10, 3)  # stored transposed, as transB asks
    # the input proto is left as it was
    assert "mm.weight" in {t.name for t in proto.graph.initializer}


def test_backend_factorize_keeps_weights_whose_factors_would_not_be_smaller(
        tmp_path: Path) -> None:
    backend = backend_of(factories.write(factories.matmul_gemm_model(), tmp_path, "lr.onnx"))
    assert backend.can(LOW_RANK)

    changed, done = backend.factorize({"mm.weight": LowRank(rank=2),
                                       "fc.weight": LowRank(energy=1.0)})

    assert done == {"mm.weight": (2, ("mm.weight.lowrank_first", "mm.weight.lowrank_second"))}
    assert changed.read("mm.weight.lowrank_first").shape == (16, 2)
    np.testing.assert_array_equal(changed.read("fc.weight"), factories.LOW_RANK_WEIGHTS["fc.weight"])
    assert run(changed, np.ones((2, 16), np.float32)).shape == (2, 10)


def test_factorize_a_weight_inside_an_if_branch() -> None:
    proto = factories.if_model()
    rewritten = factorize(proto, "branch.then_branch/w", 1)
    backend = OnnxBackend(rewritten, Path("if.onnx"))
    u, s, vh = np.linalg.svd(factories.IF_WEIGHTS["then_w"].astype(np.float64))
    rank_one = (u[:, :1] * s[:1]) @ vh[:1]
    np.testing.assert_allclose(run(backend, POSITIVE),
                               POSITIVE @ factories.IF_WEIGHTS["w_shared"] @ rank_one,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run(backend, NEGATIVE), factories.if_reference(NEGATIVE),
                               rtol=1e-5)


def test_factorize_refuses_weights_not_used_by_matmul_or_gemm(tmp_path: Path) -> None:
    proto = factories.nested_loop_model()
    with pytest.raises(SlimscopeError, match="no tensor named"):
        factorize(proto, "nothing", 2)
    with pytest.raises(SlimscopeError, match="2-D float"):
        factorize(proto, "trips", 1)


def test_external_data_of_a_non_weight_attribute_is_checked_too(tmp_path: Path) -> None:
    """ConstantOfShape's value is no weight, but onnx's loader would follow its location."""
    value = onnx.numpy_helper.from_array(np.zeros(1, np.float32), "fill")
    value.ClearField("raw_data")
    value.data_location = onnx.TensorProto.EXTERNAL
    value.external_data.add(key="location", value="/etc/passwd")
    value.external_data.add(key="length", value="4")
    proto = factories.if_model()
    proto.graph.node.insert(0, onnx.helper.make_node(
        "ConstantOfShape", ["shape"], ["filled"], value=value, name="fill"))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "shape"))
    path = tmp_path / "fill.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(SlimscopeError, match="fill") as refused:
        load_model(path)
    assert "\n" not in str(refused.value)


def test_why_not_factorize_answers_before_any_work(tmp_path: Path) -> None:
    backend = backend_of(factories.write(factories.matmul_gemm_model(), tmp_path, "lr.onnx"))
    assert backend.why_not_factorize("mm.weight") is None
    assert backend.why_not_factorize("fc.weight") is None
    assert "shape [10]" in backend.why_not_factorize("fc.bias")
    loops = backend_of(factories.write(factories.nested_loop_model(), tmp_path, "loops.onnx"))
    assert loops.why_not_factorize("inner_w") is None  # a MatMul inside a nested Loop body

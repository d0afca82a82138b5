"""ONNX weights that reach their operator reshaped, and named inputs a model does not take
(issue 13).

torch's exporter hands an LSTM its weights through shape-only nodes: Silero VAD's ONNX file
keeps ``decoder.rnn.weight_ih`` as a ``[4H, in]`` Constant inside an ``If`` branch, reorders
the gates with ``Slice``/``Concat`` and adds the direction axis with ``Unsqueeze``. Those
weights are layers in their stored shape; per-channel scales run per gate row whichever layout
(stored ``[4H, in]``, ONNX's own ``[directions, 4H, in]``) the file holds.

The factory below builds such graphs with onnx.helper: ``x [batch, steps, 8]`` -> LSTM (hidden
8) -> last hidden state -> MatMul head -> three logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engine.compress import compress
from engine.data import open_data
from engine.errors import SlimscopeError
from engine.evaluate import TorchRunner, torch_arguments
from engine.formats import load_model
from engine.plan import Plan
from engine.sensitivity import SweepSettings, sweep

STEPS, INPUTS, HIDDEN, CLASSES = 4, 8, 8, 3
GATES = 4 * HIDDEN
#: The factory's layouts: stored [4H, in] and unsqueezed (optionally inside an If branch, with
#: Silero's Slice/Concat gate reorder), and ONNX's own [D, 4H, in] for one and two directions.
UNSQUEEZED, IN_IF, NATIVE, BIDIRECTIONAL = "unsqueezed", "in-if", "native", "bidirectional"


def _array(rng: np.random.Generator, *shape: int) -> np.ndarray:
    # rows of very different scales: a per-tensor or per-direction scale would show
    rows = np.exp(rng.uniform(-3.0, 0.0, size=shape[:-1] + (1,)))
    return (rng.standard_normal(shape) * rows).astype(np.float32)


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def _unsqueezed(weight: str, out: str, reorder: bool) -> list[onnx.NodeProto]:
    """``weight [4H, n]`` -> (gates i,f,c,o reordered to ONNX's i,o,f,c) -> ``[1, 4H, n]``."""
    nodes = [_const(f"{out}_axes", np.array([0], np.int64))]
    source = weight
    if reorder:
        pieces = []
        for index, (start, stop) in enumerate(((0, HIDDEN), (3 * HIDDEN, GATES),
                                               (HIDDEN, 3 * HIDDEN))):
            nodes += [_const(f"{out}_s{index}", np.array([start], np.int64)),
                      _const(f"{out}_e{index}", np.array([stop], np.int64)),
                      helper.make_node("Slice", [weight, f"{out}_s{index}", f"{out}_e{index}",
                                                 f"{out}_axes"], [f"{out}_piece{index}"])]
            pieces.append(f"{out}_piece{index}")
        nodes.append(helper.make_node("Concat", pieces, [f"{out}_gates"], axis=0))
        source = f"{out}_gates"
    nodes.append(helper.make_node("Unsqueeze", [source, f"{out}_axes"], [out]))
    return nodes


def lstm_onnx(path: Path, layout: str = UNSQUEEZED, seed: int = 0) -> Path:
    """An LSTM classifier whose weights are stored as `layout` says (see the constants)."""
    rng = np.random.default_rng(seed)
    directions = 2 if layout == BIDIRECTIONAL else 1
    nodes = [helper.make_node("Transpose", ["x"], ["steps"], perm=[1, 0, 2])]
    initializers = [numpy_helper.from_array(_array(rng, HIDDEN, CLASSES), "head.weight"),
                    numpy_helper.from_array(np.zeros((directions, 8 * HIDDEN), np.float32),
                                            "lstm_bias")]
    rnn: list[onnx.NodeProto] = []
    if layout in (NATIVE, BIDIRECTIONAL):  # generated names: layers named after the node
        initializers += [numpy_helper.from_array(_array(rng, directions, GATES, INPUTS),
                                                 "onnx::LSTM_7"),
                         numpy_helper.from_array(_array(rng, directions, GATES, HIDDEN),
                                                 "onnx::LSTM_8")]
        weights = ("onnx::LSTM_7", "onnx::LSTM_8")
    elif layout == UNSQUEEZED:
        initializers += [numpy_helper.from_array(_array(rng, GATES, INPUTS), "onnx::LSTM_7"),
                         numpy_helper.from_array(_array(rng, GATES, HIDDEN), "onnx::LSTM_8")]
        rnn += _unsqueezed("onnx::LSTM_7", "W", False) + _unsqueezed("onnx::LSTM_8", "R", False)
        weights = ("W", "R")
    else:  # Silero's layout: Constant nodes in an If branch, readable names, gates reordered
        rnn += [_const("rnn.weight_ih", _array(rng, GATES, INPUTS)),
                _const("rnn.weight_hh", _array(rng, GATES, HIDDEN))]
        rnn += _unsqueezed("rnn.weight_ih", "W", True) + _unsqueezed("rnn.weight_hh", "R", True)
        weights = ("W", "R")
    rnn += [helper.make_node("LSTM", ["steps", *weights, "lstm_bias"], ["", "h_all"],
                             name="lstm", hidden_size=HIDDEN,
                             direction="bidirectional" if directions == 2 else "forward"),
            helper.make_node("ReduceMean", ["h_all"], ["hidden"], axes=[0], keepdims=0)]
    if layout == IN_IF:
        then_branch = helper.make_graph(rnn, "then", [], [helper.make_tensor_value_info(
            "hidden", TensorProto.FLOAT, None)])
        else_branch = helper.make_graph(
            [helper.make_node("ReduceMean", ["x"], ["average"], axes=[1], keepdims=0)], "else",
            [], [helper.make_tensor_value_info("average", TensorProto.FLOAT, None)])
        nodes += [helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
                  _const("floor", np.array(-1e9, np.float32)),
                  helper.make_node("Greater", ["peak", "floor"], ["always"]),
                  helper.make_node("If", ["always"], ["hidden"], then_branch=then_branch,
                                   else_branch=else_branch)]
    else:
        nodes += rnn
    nodes.append(helper.make_node("MatMul", ["hidden", "head.weight"], ["logits"]))
    graph = helper.make_graph(
        nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                      ["batch", STEPS, INPUTS])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _samples(path: Path, count: int = 16) -> Path:
    x = np.random.default_rng(1).standard_normal((count, STEPS, INPUTS)).astype(np.float32)
    np.savez(path, x=x)
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _saved_weights(path: Path) -> dict[str, np.ndarray]:
    """Every initializer and Constant value of the file, If branches included, by name."""
    found: dict[str, np.ndarray] = {}

    def visit(graph: onnx.GraphProto) -> None:
        found.update({t.name: numpy_helper.to_array(t) for t in graph.initializer})
        for node in graph.node:
            for attribute in node.attribute:
                if node.op_type == "Constant" and attribute.name == "value":
                    found[node.output[0]] = numpy_helper.to_array(attribute.t)
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)

    visit(onnx.load(str(path)).graph)
    return found


EXPECTED = {  # layout -> (layer names, weight keys, stored shapes)
    UNSQUEEZED: (("lstm.weight_ih", "lstm.weight_hh"), ("onnx::LSTM_7", "onnx::LSTM_8"),
                 ((GATES, INPUTS), (GATES, HIDDEN))),
    IN_IF: (("rnn.weight_ih", "rnn.weight_hh"), ("rnn.weight_ih", "rnn.weight_hh"),
            ((GATES, INPUTS), (GATES, HIDDEN))),
    NATIVE: (("lstm.weight_ih", "lstm.weight_hh"), ("onnx::LSTM_7", "onnx::LSTM_8"),
             ((1, GATES, INPUTS), (1, GATES, HIDDEN))),
    BIDIRECTIONAL: (("lstm.weight_ih", "lstm.weight_hh"), ("onnx::LSTM_7", "onnx::LSTM_8"),
                    ((2, GATES, INPUTS), (2, GATES, HIDDEN))),
}


@pytest.mark.parametrize("layout", [UNSQUEEZED, IN_IF, NATIVE])
def test_unsqueezed_weights_are_recurrent_layers_in_their_stored_shape(layout: str,
                                                                        tmp_path: Path) -> None:
    model = load_model(lstm_onnx(tmp_path / "lstm.onnx", layout))
    names, keys, shapes = EXPECTED[layout]
    found = {layer.name: layer for layer in model.layers}
    assert set(found) == {*names, "head"}
    for name, key, shape in zip(names, keys, shapes):
        layer = found[name]
        assert (layer.kind, layer.weight_key, tuple(layer.shape)) == ("LSTM", key, shape)
        assert layer.prunable and layer.quantizable


@pytest.mark.parametrize("layout, axis, scales", [
    (UNSQUEEZED, 0, (GATES,)), (IN_IF, 0, (GATES,)), (NATIVE, 1, (GATES,)),
    (BIDIRECTIONAL, None, (2, GATES))])
def test_four_bit_per_channel_scales_each_gate_row(layout: str, axis: int | None,
                                                   scales: tuple[int, ...],
                                                   tmp_path: Path) -> None:
    model = load_model(lstm_onnx(tmp_path / "lstm.onnx", layout))
    names, keys, shapes = EXPECTED[layout]
    plan = Plan.from_dict({"layers": {name: {"quantization": {
        "bits": 4, "granularity": "per-channel"}} for name in names}})
    compressed, _ = compress(model, plan, measure=False)  # runs the honesty check
    for key, shape in zip(keys, shapes):
        codes = compressed.quantized[key]
        assert tuple(codes.codes.shape) == shape and tuple(codes.scale.shape) == scales
        assert codes.axis == axis
        stored = compressed.backend.read(key)
        assert np.array_equal(stored, codes.dequantize().numpy())
        # Symmetric min-max per row: every row's largest magnitude is kept exactly, which a
        # scale shared by a direction (rows of very different sizes) would not do.
        original = model.backend.read(key).reshape(-1, shape[-1])
        rows = stored.reshape(-1, shape[-1])
        np.testing.assert_allclose(np.abs(rows).max(1), np.abs(original).max(1), rtol=1e-5)
        assert max(len(np.unique(row)) for row in rows) <= 15


@pytest.mark.parametrize("layout", [UNSQUEEZED, IN_IF, BIDIRECTIONAL])
def test_half_magnitude_zeroes_half_of_each_saved_weight_and_runs(layout: str,
                                                                  tmp_path: Path) -> None:
    source = lstm_onnx(tmp_path / "lstm.onnx", layout)
    model = load_model(source)
    names, keys, shapes = EXPECTED[layout]
    plan = Plan.from_dict({"layers": {name: {"pruning": {"method": "magnitude", "amount": 0.5}}
                                      for name in names}})
    compressed, _ = compress(model, plan, measure=False)
    saved = tmp_path / "pruned.onnx"
    compressed.backend.save(saved)
    weights, before = _saved_weights(saved), _saved_weights(source)
    for key, shape in zip(keys, shapes):
        assert weights[key].shape == shape
        assert np.count_nonzero(weights[key] == 0) == weights[key].size // 2, key
        kept = weights[key] != 0
        assert np.array_equal(weights[key][kept], before[key][kept])
        assert tuple(compressed.masks[key].shape) == shape
    x = np.load(_samples(tmp_path / "x.npz"))["x"]
    pruned, original = _run(saved, x), _run(source, x)
    assert pruned.shape == (len(x), CLASSES) and np.isfinite(pruned).all()
    assert not np.allclose(pruned, original)  # the LSTM computes with the pruned weights


def test_exact_sensitivity_sweeps_weights_inside_an_if_branch(tmp_path: Path) -> None:
    model = load_model(lstm_onnx(tmp_path / "lstm.onnx", IN_IF))
    data = open_data(str(_samples(tmp_path / "x.npz")), model.inputs)
    result = sweep(model, data, "exact", SweepSettings(sparsities=(0.0, 0.75), bits=(8, 2)))
    swept = {layer.name: layer for layer in result.layers}
    assert {"rnn.weight_ih", "rnn.weight_hh"} <= set(swept)
    for name in ("rnn.weight_ih", "rnn.weight_hh"):
        assert result.drops(swept[name], "bits")[-1] > 0.0, name  # 2 bits changes the answers
        assert swept[name].shape == (GATES, INPUTS if name.endswith("ih") else HIDDEN)


@pytest.mark.parametrize("layout", [NATIVE, BIDIRECTIONAL])
def test_a_sensitivity_level_is_the_weight_compression_stores(layout: str,
                                                              tmp_path: Path) -> None:
    """A 4-bit level of a ``[D, 4H, in]`` weight is measured with the very weight a 4-bit
    per-channel plan stores (scales per gate row), fed back in the stored shape."""
    from engine.sensitivity_backends import layer_levels

    model = load_model(lstm_onnx(tmp_path / "lstm.onnx", layout))
    settings = SweepSettings(sparsities=(0.0,), bits=(8, 4))
    layer = next(layer for layer in model.layers if layer.name == "lstm.weight_ih")
    level = layer_levels(model.backend, layer, settings).level("bits", 4)
    plan = Plan.from_dict({"layers": {layer.name: {"quantization": {
        "bits": 4, "granularity": settings.quantization.granularity}}}})
    compressed, _ = compress(model, plan, measure=False)
    stored = compressed.backend.read(layer.weight_key)
    assert np.array_equal(level.weight.numpy().reshape(stored.shape), stored)
    data = open_data(str(_samples(tmp_path / "x.npz")), model.inputs)
    result = sweep(model, data, "exact", settings, layers=[layer.name])
    assert result.drops(result.layers[0], "bits")[-1] >= 0.0
    assert tuple(result.layers[0].shape) == tuple(layer.shape)


def test_a_flat_weight_reshaped_for_matmul_is_a_layer_but_not_one_mixed_with_activations(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["proj.weight", "shape"], ["matrix"]),
         helper.make_node("MatMul", ["x", "matrix"], ["y"], name="proj"),
         helper.make_node("Transpose", ["y"], ["y_t"]),
         helper.make_node("Concat", ["other", "y_t"], ["mixed"], axis=1),  # part activation
         helper.make_node("MatMul", ["x", "mixed"], ["logits"], name="mixed_proj")],
        "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", INPUTS])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal(INPUTS * INPUTS).astype(np.float32),
                                 "proj.weight"),
         numpy_helper.from_array(np.array([INPUTS, INPUTS], np.int64), "shape"),
         numpy_helper.from_array(rng.standard_normal((INPUTS, 2)).astype(np.float32),
                                 "other")])
    path = tmp_path / "flat.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = load_model(path)
    assert [(layer.name, layer.kind, tuple(layer.shape)) for layer in model.layers] == [
        ("proj", "MatMul", (INPUTS * INPUTS,))]
    assert model.layers[0].macs == INPUTS * INPUTS  # per sample, in the shape MatMul reads
    x = np.ones((3, INPUTS), np.float32)
    assert _run(path, x).shape == (3, 2 + 3)


class _TakesXAndRate(torch.nn.Module):
    """A streaming-model signature, as Silero VAD's TorchScript: forward(x, sr)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        return self.head(x) * float(sr)


def test_data_with_an_input_the_model_does_not_take_is_refused_in_one_line(
        tmp_path: Path) -> None:
    path = tmp_path / "rate.pt"
    torch.jit.save(torch.jit.script(_TakesXAndRate()), str(path))
    model = load_model(path)
    npz = tmp_path / "x_state.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x=rng.standard_normal((4, 16)).astype(np.float32),
             state=np.zeros((4, 2, 8), np.float32))
    data = open_data(str(npz), model.inputs)
    with pytest.raises(SlimscopeError) as raised:
        TorchRunner(model.module).run(next(iter(data.batches(4)))[0])
    message = str(raised.value)
    assert "'state'" in message and "'x', 'sr'" in message and "\n" not in message
    # inputs all named as the model names them still go through, as do unnamed positional ones
    assert torch_arguments(model.module, {"x": np.ones((2, 16), np.float32),
                                          "sr": np.array(16000)})[1] == 16000
    assert len(torch_arguments(model.module, {"input": np.ones((2, 16), np.float32)})) == 1

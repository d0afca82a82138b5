"""Recurrent weights (LSTM/GRU/RNN) as layers, and score outputs in sensitivity (issue 13).

Silero VAD holds most of its weights in an LSTM cell and outputs one speech probability per
chunk. The stand-ins here have the same shape of problem: unless ``weight_ih`` / ``weight_hh``
are layers, a 0.3 size target is out of reach; unless a single probability is scored as a
value, every sensitivity level reads "no drop".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import factories_recurrent as recurrent
from engine.allocate import allocate
from engine.compress import compress
from engine.data import open_data
from engine.errors import SlimscopeError
from engine.evaluate import TorchRunner, evaluate
from engine.export import export
from engine.formats import LoadOptions, load_model
from engine.methods.base import weight_layers
from engine.model import Model
from engine.plan import Plan
from engine.sensitivity import SweepSettings, sweep

RNN_LAYERS = ("rnn.weight_ih", "rnn.weight_hh")
KINDS = ("eager", "script", "program")


def _open(kind: str, folder: Path) -> Model:
    if kind == "eager":
        return load_model(recurrent.vad_module_file(folder / "vad.pt"), LoadOptions(trust=True))
    if kind == "script":
        return load_model(recurrent.vad_script(folder / "vad_script.pt"))
    return load_model(recurrent.vad_program(folder / "vad.pt2"))


@pytest.fixture
def chunks(tmp_path: Path) -> Path:
    return recurrent.chunks(tmp_path / "chunks.npz")


def _plan(layers: dict[str, dict]) -> Plan:
    return Plan.from_dict({"layers": layers})


@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_weights_are_layers(kind: str, tmp_path: Path) -> None:
    model = _open(kind, tmp_path)
    found = {layer.name: layer for layer in model.layers}
    for name in RNN_LAYERS:
        layer = found[name]
        assert (layer.kind, layer.weight_key, layer.shape) == \
            ("LSTM", name, (4 * recurrent.HIDDEN, layer.shape[1]))
        assert layer.prunable and layer.quantizable
        assert layer.bias_key == name.replace("weight", "bias")
    assert [layer.name for layer in model.layers] == ["conv", *RNN_LAYERS, "head"]


def test_gru_layers_are_named_by_their_parameters() -> None:
    names = {(found.name, found.kind) for found in weight_layers(recurrent.sequence_vad())}
    assert ("gru.weight_ih_l0", "GRU") in names
    assert ("gru.weight_hh_l1_reverse", "GRU") in names
    assert len([name for name, kind in names if kind == "GRU"]) == 8


@pytest.mark.parametrize("kind", KINDS)
def test_magnitude_half_prunes_recurrent_weights_by_half(kind: str, tmp_path: Path) -> None:
    model = _open(kind, tmp_path)
    plan = _plan({name: {"pruning": {"method": "magnitude", "amount": 0.5}}
                  for name in RNN_LAYERS})
    compressed, report = compress(model, plan, measure=False)  # runs the honesty check
    state = compressed.module.state_dict()
    for name in RNN_LAYERS:
        assert float((state[name] == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
        assert name in compressed.masks
        assert next(layer for layer in report.layers if layer.name == name).sparsity == \
            pytest.approx(0.5, abs=1e-3)
    original = model.module.state_dict()
    assert torch.equal(state["conv.weight"], original["conv.weight"])
    assert int((original["rnn.weight_ih"] == 0).sum()) == 0  # the original is untouched


@pytest.mark.parametrize("kind", ["eager", "program"])
def test_recurrent_weights_quantize_and_cast(kind: str, tmp_path: Path) -> None:
    model = _open(kind, tmp_path)
    plan = _plan({"rnn.weight_ih": {"quantization": {"bits": 4}},
                  "rnn.weight_hh": {"quantization": {"bits": "fp16"}}})
    compressed, report = compress(model, plan, measure=False)
    assert compressed.quantized["rnn.weight_ih"].bits == 4
    assert len(torch.unique(compressed.module.state_dict()["rnn.weight_ih"][0])) <= 16
    assert str(compressed.cast["rnn.weight_hh"]) == "torch.float16"
    assert "rnn.bias_hh" in compressed.cast
    assert report.bytes_after < report.bytes_before


@pytest.mark.parametrize("method, section", [
    ("nm", {"pruning": {"method": "nm", "pattern": "2:4"}}),
    ("structured", {"pruning": {"method": "structured", "amount": 0.5}})])
def test_channel_and_nm_pruning_refuse_recurrent_weights(method: str, section: dict,
                                                         tmp_path: Path) -> None:
    model = _open("eager", tmp_path)
    with pytest.raises(SlimscopeError) as raised:
        compress(model, _plan({"rnn.weight_hh": section}), measure=False)
    message = str(raised.value)
    assert "rnn.weight_hh" in message and "\n" not in message


def test_target_size_03_is_reachable(tmp_path: Path, chunks: Path) -> None:
    model = _open("program", tmp_path)
    data = open_data(str(chunks), model.inputs)
    result = sweep(model, data, "exact", SweepSettings(sparsities=(0.0, 0.5, 0.75),
                                                       bits=(8, 4, 2)))
    assert set(RNN_LAYERS) <= {layer.name for layer in result.layers}
    allocation = allocate(result, target_ratio=0.3)
    _, report = compress(model, allocation.plan, measure=False)
    assert report.size_ratio <= 0.3 + 1e-6


def test_score_output_sensitivity_is_not_blind(tmp_path: Path, chunks: Path) -> None:
    model = _open("eager", tmp_path)
    data = open_data(str(chunks), model.inputs)
    result = sweep(model, data, "exact", SweepSettings(sparsities=(0.0,), bits=(8, 2)))
    assert (result.metric, result.secondary_metric) == ("score_fidelity", "mse")
    assert result.baseline == pytest.approx(1.0)
    assert 0.0 < result.chance < 1.0  # always answering the median is not a perfect score
    for layer in result.layers:
        if layer.name in RNN_LAYERS:
            assert result.drops(layer, "bits")[-1] > 0.0, layer.name  # 2 bits
            assert result.drops(layer, "bits", secondary=True)[-1] > 0.0, layer.name
    # At 8 bits the p > 0.5 decisions all agree, and the fidelity still sees the change.
    compressed, _ = compress(model, _plan({"rnn.weight_hh": {"quantization": {"bits": 8}}}),
                             measure=False)
    metrics = evaluate(TorchRunner(compressed.module), data, reference=TorchRunner(model.module))
    assert metrics.agreement == 1.0
    assert metrics.kl_divergence is None
    assert 0.0 < 1.0 - metrics.score_fidelity < 0.01 and metrics.mse > 0.0


def test_class_outputs_keep_agreement_and_kl() -> None:
    from engine.evaluate import MetricTotals

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((6, 10))
    totals = MetricTotals()
    totals.add_reference(reference + 0.01 * rng.standard_normal((6, 10)), reference)
    totals.samples = 6
    metrics = totals.metrics(False, True)
    assert metrics.agreement is not None and metrics.kl_divergence is not None
    assert metrics.score_fidelity is None and "score_fidelity" not in metrics.to_dict()


@pytest.mark.parametrize("fmt", ["onnx", "onnx-fp16"])
def test_program_with_lstm_cell_exports_to_onnx(fmt: str, tmp_path: Path,
                                                chunks: Path) -> None:
    model = _open("program", tmp_path)
    data = open_data(str(chunks), model.inputs)
    plan = _plan({name: {"pruning": {"method": "magnitude", "amount": 0.5},
                         "quantization": {"bits": 8}} for name in RNN_LAYERS})
    compressed, _ = compress(model, plan, measure=False)
    out = tmp_path / f"vad_{fmt}.onnx"
    result = export(compressed, model, out, format=fmt, data=data, measure=False)
    assert result.kept, result.verification.summary()
    if fmt == "onnx":
        x = np.load(chunks)["x"][:1]
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(got, TorchRunner(compressed.module).run(x), atol=1e-5)


def test_exact_sweep_of_recurrent_weights_matches_the_naive_definition(tmp_path: Path,
                                                                       chunks: Path) -> None:
    from engine.sensitivity import sweep_module

    model = _open("script", tmp_path)
    data = open_data(str(chunks), model.inputs)
    settings = SweepSettings(sparsities=(0.0, 0.5), bits=(8, 3))
    exact = sweep(model, data, "exact", settings, layers=list(RNN_LAYERS))
    naive = sweep_module(recurrent.tiny_vad(), data, "naive", settings, layers=list(RNN_LAYERS))
    for got, want in zip(exact.layers, naive.layers):
        for axis in ("sparsity", "bits"):
            assert got.curves[axis].metric == pytest.approx(want.curves[axis].metric, abs=1e-6)
            assert got.curves[axis].bytes == want.curves[axis].bytes


def test_fast_estimate_refuses_score_outputs_in_one_line(tmp_path: Path, chunks: Path) -> None:
    model = _open("eager", tmp_path)
    with pytest.raises(SlimscopeError, match="use the exact or datafree method") as raised:
        sweep(model, open_data(str(chunks), model.inputs), "fast", SweepSettings(bits=(8,)))
    assert "\n" not in str(raised.value)

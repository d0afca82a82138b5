"""Real models' inputs and runtimes: TorchScript compression, static-batch torch.export, several
named inputs (float + int64 ids, a state with its batch on axis 1, a scalar setting), synthetic
data per input spec, and PReLU kinds. Every model is a small stand-in built by
tests/factories_inputs.py."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from engine.compress import compress
from engine.data import NamedInputs, SyntheticNamedData, batch_length, open_data
from engine.errors import PlanError, SlimscopeError
from engine.evaluate import OnnxRunner, TorchRunner, evaluate, fixed_batch_of, runner_for
from engine.formats import load_model
from engine.plan import Plan
from tests import factories
from tests import factories_inputs as fi

PRUNE_AND_INT8 = {"defaults": {"pruning": {"method": "magnitude", "amount": 0.5},
                               "quantization": {"bits": 8}}}


# -- TorchScript -------------------------------------------------------------------------------
def test_torchscript_compress_prunes_quantizes_and_measures(tmp_path: Path) -> None:
    model = load_model(factories.write_torchscript(tmp_path))
    data = open_data("synthetic:16", model.inputs) if model.inputs else None
    if data is None:
        data = open_data(str(_digits_like(tmp_path)), [])
    compressed, report = compress(model, Plan.from_dict(PRUNE_AND_INT8), data)
    weights = {layer.name: layer for layer in report.layers}
    assert weights["conv"].sparsity == pytest.approx(0.5, abs=0.03)
    assert weights["fc"].bits == 8 and weights["fc"].sparsity == pytest.approx(0.5, abs=0.01)
    assert report.bytes_after < report.bytes_before
    assert report.metrics_after is not None and report.metrics_after["samples"] == 16
    assert report.latency_after_ms is not None
    # the original TorchScript module is untouched
    assert float((model.module.conv.weight == 0).float().mean()) < 0.1


def _digits_like(folder: Path) -> Path:
    path = folder / "digits_like.npz"
    np.savez(path, x=np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    return path


def test_structured_pruning_on_torchscript_is_refused_in_one_line(tmp_path: Path) -> None:
    model = load_model(factories.write_torchscript(tmp_path))
    plan = Plan.from_dict({"layers": {"conv": {"pruning": {"method": "structured",
                                                           "amount": 0.5}}}})
    with pytest.raises(PlanError, match="structured.*TorchScript") as error:
        compress(model, plan, None)
    assert "\n" not in str(error.value)


def test_torchscript_takes_named_inputs_and_int_arguments(tmp_path: Path) -> None:
    module = torch.jit.load(str(fi.write_rate_torchscript(tmp_path)))
    x = np.random.default_rng(0).standard_normal((6, fi.STATE_WIDTH)).astype(np.float32)
    batch = NamedInputs({"x": x, "sr": np.array(8000, np.int64)}, {"x": 0, "sr": None})
    expected = module(torch.from_numpy(x), 8000).detach().numpy()
    assert np.allclose(TorchRunner(module).run(batch), expected)


# -- torch.export with a static batch ---------------------------------------------------------
def test_static_batch_pt2_evaluates_ten_samples_like_the_eager_module(tmp_path: Path) -> None:
    path, eager = fi.write_static_batch_pt2(tmp_path)
    model = load_model(path)
    x = np.random.default_rng(0).standard_normal((10, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "ten.npy", x)
    data = open_data(str(tmp_path / "ten.npy"), model.inputs)
    runner = runner_for(model)
    metrics = evaluate(runner, data, reference=TorchRunner(eager), batch_size=4)
    assert metrics.samples == 10 and metrics.max_abs_diff < 1e-5
    # a deep copy (what compression works on) loses torch's guard and the backend's mark,
    # but still runs one sample at a time: its graph says batch 1
    duplicate = copy.deepcopy(model.module)
    assert fixed_batch_of(duplicate) == 1
    assert np.allclose(TorchRunner(duplicate).run(x), eager(torch.from_numpy(x)).detach().numpy(),
                       atol=1e-5)


# -- several named inputs ----------------------------------------------------------------------
def _text_batch(count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    mask = np.ones((count, 7), np.int64)
    mask[:, 5:] = 0
    return {"features": rng.standard_normal((count, fi.TEXT_FEATURES)).astype(np.float32),
            "input_ids": rng.integers(0, fi.TEXT_VOCAB, (count, 7)),
            "attention_mask": mask}


def test_two_input_onnx_from_an_npz_named_by_input(tmp_path: Path) -> None:
    path = fi.write_text_onnx(tmp_path)
    model = load_model(path)
    arrays = _text_batch(10)
    np.savez(tmp_path / "text.npz", **arrays, y=np.arange(10) % fi.TEXT_CLASSES)
    data = open_data(str(tmp_path / "text.npz"), model.inputs)
    assert len(data) == 10 and data.has_labels
    runner = runner_for(model)
    metrics = evaluate(runner, data, reference=OnnxRunner(path), batch_size=3)
    assert metrics.samples == 10 and metrics.agreement == 1.0 and metrics.accuracy is not None
    whole = OnnxRunner(path).session.run(None, arrays)[0]
    batches = [runner.run(inputs) for inputs, _ in data.batches(3)]
    assert np.allclose(np.concatenate(batches), whole, atol=1e-6)


def test_npz_missing_an_input_is_one_line(tmp_path: Path) -> None:
    model = load_model(fi.write_text_onnx(tmp_path))
    arrays = _text_batch(4)
    del arrays["attention_mask"]
    np.savez(tmp_path / "half.npz", **arrays)
    with pytest.raises(SlimscopeError, match="no array for the model input 'attention_mask'"):
        open_data(str(tmp_path / "half.npz"), model.inputs)


def test_synthetic_data_follows_every_input_spec(tmp_path: Path) -> None:
    model = load_model(fi.write_text_onnx(tmp_path))
    with pytest.raises(SlimscopeError, match="input-shape input_ids="):
        open_data("synthetic:8", model.inputs)  # the sequence length is not known
    shapes = {"input_ids": (1, 6), "attention_mask": (1, 6)}
    data = open_data("synthetic:8", model.inputs, shapes=shapes)
    assert isinstance(data, SyntheticNamedData) and data.synthetic and len(data) == 8
    inputs, labels = next(data.batches(8))
    assert labels is None and inputs["input_ids"].dtype == np.int64
    assert inputs["input_ids"].shape == (8, 6) and inputs["input_ids"].max() < fi.TEXT_VOCAB
    assert (inputs["attention_mask"] == 1).all() and inputs["features"].dtype == np.float32
    metrics = evaluate(runner_for(model), data, reference=runner_for(model))
    assert metrics.samples == 8 and metrics.agreement == 1.0


# -- a state with its batch on axis 1 and a scalar setting -------------------------------------
@pytest.mark.parametrize("static_batch", [None, 1])
def test_state_on_axis_one_and_scalar_constant(tmp_path: Path, static_batch: int | None) -> None:
    path = fi.write_stateful_onnx(tmp_path, static_batch)
    model = load_model(path)
    data = open_data(str(fi.write_stateful_npz(tmp_path, count=10)), model.inputs)
    assert len(data) == 10 and data.inputs.axes == {"x": 0, "state": 1, "sr": None}
    assert "sr scalar constant" in data.describe()
    head = numpy_helper.to_array(next(t for t in onnx.load(str(path)).graph.initializer
                                      if t.name == "head"))
    with np.load(tmp_path / "chunks.npz") as stored:
        expected = fi.stateful_reference(stored["x"], stored["state"], 8000, head)
    outputs = [runner_for(model).run(inputs) for inputs, _ in data.batches(4)]
    assert [len(o) for o in outputs] == [4, 4, 2]
    assert np.allclose(np.concatenate(outputs), expected, atol=1e-5)


def test_synthetic_scalar_needs_a_value_and_broadcasts_one(tmp_path: Path) -> None:
    model = load_model(fi.write_stateful_onnx(tmp_path))
    with pytest.raises(SlimscopeError, match="cannot guess the scalar input 'sr'") as error:
        open_data("synthetic:5", model.inputs)
    assert "\n" not in str(error.value)
    data = open_data("synthetic:5", model.inputs, shapes={"sr": (16000,)})
    inputs, _ = next(data.batches(2))
    assert inputs["state"].shape == (2, 2, fi.STATE_WIDTH) and int(inputs["sr"]) == 16000
    assert batch_length(inputs) == 2
    assert runner_for(model).run(inputs).shape == (2, fi.STATE_CLASSES)


def test_onnx_runner_refuses_one_array_for_several_inputs(tmp_path: Path) -> None:
    runner = OnnxRunner(fi.write_text_onnx(tmp_path))
    with pytest.raises(SlimscopeError, match="takes 3 inputs"):
        runner.run(np.zeros((2, fi.TEXT_FEATURES), np.float32))


# -- kinds -------------------------------------------------------------------------------------
def test_prelu_weights_in_a_state_dict_are_prelu(tmp_path: Path) -> None:
    model = load_model(fi.write_prelu_state_dict(tmp_path))
    kinds = {layer.name: layer.kind for layer in model.layers}
    assert kinds == {"conv1": "Conv2d", "prelu1": "PReLU", "dense": "Linear"}


def test_named_inputs_without_specs_sample_the_first_axis(tmp_path: Path) -> None:
    """TorchScript models declare no input specs: arrays with axes are sampled on axis 0."""
    np.savez(tmp_path / "two.npz", audio=np.zeros((6, 4), np.float32), sr=np.array(8000))
    data = open_data(str(tmp_path / "two.npz"), [])
    assert len(data) == 6 and data.inputs.axes == {"audio": 0, "sr": None}

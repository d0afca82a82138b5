"""Evaluation: the bundled demo's recorded accuracy, ONNX parity, metric arithmetic, cancelling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from engine import zoo
from engine.data import ArraySource, DigitsData
from engine.demo import DEMO_MODEL, DEMO_ONNX, demo_info
from engine.errors import NeedsModuleError, SlimscopeError
from engine.evaluate import (
    LatencyStats,
    Metrics,
    OnnxRunner,
    TorchRunner,
    evaluate,
    measure_latency,
    runner_for,
)
from engine.jobs import Cancelled, CancelToken
from engine.model import Model, TensorStore
from engine.onnx_tools import export_onnx


@pytest.fixture(scope="module")
def demo_module() -> nn.Module:
    with safe_open(str(DEMO_MODEL), "pt") as handle:
        arch = handle.metadata()[zoo.ARCH_METADATA_KEY]
    module = zoo.build(arch)
    module.load_state_dict(load_file(str(DEMO_MODEL)))
    return module.eval()


@pytest.fixture(scope="module")
def test_split() -> DigitsData:
    return DigitsData("test")


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    """A fixed linear map, so a test knows exactly what the 'model' outputs."""
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def samples(rows: list[list[float]], labels: list[int] | None = None) -> ArraySource:
    return ArraySource(np.array(rows, np.float32),
                       None if labels is None else np.array(labels, np.int64), "hand-made")


# -- the bundled demo -----------------------------------------------------------------------------
def test_demo_reaches_its_recorded_accuracy(demo_module: nn.Module, test_split: DigitsData) -> None:
    metrics = evaluate(TorchRunner(demo_module), test_split, batch_size=128)
    assert metrics.samples == demo_info()["test_samples"] == len(test_split)
    assert metrics.accuracy == pytest.approx(demo_info()["test_accuracy"], abs=1e-9)
    assert metrics.accuracy >= 0.97
    assert metrics.primary == metrics.accuracy and metrics.agreement is None


def test_demo_onnx_predicts_like_the_torch_module(demo_module: nn.Module,
                                                  test_split: DigitsData) -> None:
    metrics = evaluate(OnnxRunner(DEMO_ONNX), test_split, reference=TorchRunner(demo_module),
                       batch_size=200)
    assert metrics.agreement == 1.0
    assert metrics.accuracy == pytest.approx(demo_info()["test_accuracy"], abs=1e-9)
    assert metrics.max_abs_diff < 1e-3
    assert metrics.cosine_similarity == pytest.approx(1.0, abs=1e-6)


def test_torch_runner_leaves_the_module_untouched(demo_module: nn.Module,
                                                  test_split: DigitsData) -> None:
    demo_module.train()  # dropout and batch-norm statistics would change outputs and buffers
    before = {k: v.clone() for k, v in demo_module.state_dict().items()}
    try:
        runner = TorchRunner(demo_module)
        batch = test_split.inputs[:16]
        first, second = runner.run(batch), runner.run(batch)
        assert np.array_equal(first, second)
        assert all(m.training for m in demo_module.modules())
        after = demo_module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        demo_module.eval()


# -- metric arithmetic on hand-made cases ---------------------------------------------------------
def test_identical_models_agree_completely(demo_module: nn.Module) -> None:
    data = DigitsData("calibration")
    metrics = evaluate(TorchRunner(demo_module), data, reference=TorchRunner(demo_module))
    assert metrics.agreement == 1.0
    assert metrics.kl_divergence == pytest.approx(0.0, abs=1e-12)
    assert metrics.cosine_similarity == pytest.approx(1.0, abs=1e-12)
    assert metrics.max_abs_diff == 0.0


def test_swapping_two_classes_gives_the_known_agreement() -> None:
    # Eight samples whose argmax cycles over four classes; the candidate swaps classes 0 and 1.
    rows = [[5.0 if c == i % 4 else 0.0 for c in range(4)] for i in range(8)]
    swap = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    identity = [[1.0 if r == c else 0.0 for c in range(4)] for r in range(4)]
    metrics = evaluate(TorchRunner(linear(swap, [0] * 4)), samples(rows),
                       reference=TorchRunner(linear(identity, [0] * 4)), batch_size=3)
    assert metrics.agreement == 0.5
    assert metrics.max_abs_diff == 5.0
    # swapped rows: [5,0,0,0] . [0,5,0,0] = 0; kept rows: cosine 1
    assert metrics.cosine_similarity == pytest.approx(0.5)
    assert metrics.accuracy is None and metrics.primary == 0.5


def test_kl_and_cosine_match_hand_computation() -> None:
    identity = [[1.0, 0.0], [0.0, 1.0]]
    # reference logits [0, 0] -> p = (1/2, 1/2); candidate [ln 3, 0] -> q = (3/4, 1/4)
    metrics = evaluate(TorchRunner(linear(identity, [math.log(3), 0.0])), samples([[0.0, 0.0]]),
                       reference=TorchRunner(linear(identity, [0.0, 0.0])))
    assert metrics.kl_divergence == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # reference [1, 0] vs candidate [1, 1]: cosine 1/sqrt(2), largest difference 1
    metrics = evaluate(TorchRunner(linear(identity, [0.0, 1.0])), samples([[1.0, 0.0]]),
                       reference=TorchRunner(linear(identity, [0.0, 0.0])))
    assert metrics.cosine_similarity == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert metrics.max_abs_diff == pytest.approx(1.0)


def test_accuracy_and_cross_entropy_with_labels() -> None:
    identity = [[1.0, 0.0], [0.0, 1.0]]
    data = samples([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]], labels=[0, 1, 1])
    metrics = evaluate(TorchRunner(linear(identity, [0.0, 0.0])), data)
    assert metrics.accuracy == pytest.approx(2 / 3)
    expected_loss = (2 * math.log1p(math.exp(-2)) + math.log1p(math.exp(2))) / 3
    assert metrics.loss == pytest.approx(expected_loss, rel=1e-6)
    as_dict = metrics.to_dict()
    assert as_dict["primary"] == as_dict["accuracy"] and as_dict["samples"] == 3
    assert as_dict["kl_divergence"] is None


def test_label_outside_the_outputs_is_an_error() -> None:
    identity = [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(SlimscopeError, match="label 7 is outside the model's 2 outputs"):
        evaluate(TorchRunner(linear(identity, [0.0, 0.0])), samples([[1.0, 0.0]], labels=[7]))


# -- progress and cancellation -------------------------------------------------------------------
class CountingRunner:
    """A real runner that also counts how many batches it was given."""

    def __init__(self, inner: TorchRunner) -> None:
        self.inner = inner
        self.calls = 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.inner.run(batch)

    def with_threads(self, threads: int | None) -> CountingRunner:
        return self


def test_progress_reports_each_batch(demo_module: nn.Module) -> None:
    reports: list[float] = []
    evaluate(TorchRunner(demo_module), DigitsData("calibration"), batch_size=50,
             progress=lambda fraction, message="": reports.append(fraction))
    assert reports == pytest.approx([0.0, 50 / 128, 100 / 128, 1.0])


def test_cancel_stops_after_the_current_batch(demo_module: nn.Module,
                                              test_split: DigitsData) -> None:
    token = CancelToken()
    runner = CountingRunner(TorchRunner(demo_module))

    def cancel_on_first_batch(fraction: float, message: str = "") -> None:
        if fraction > 0:
            token.cancel()

    with pytest.raises(Cancelled):
        evaluate(runner, test_split, batch_size=10, progress=cancel_on_first_batch, cancel=token)
    assert runner.calls == 1
    token_set_before = CancelToken()
    token_set_before.cancel()
    with pytest.raises(Cancelled):
        evaluate(runner, test_split, cancel=token_set_before)
    assert runner.calls == 1


# -- runners ---------------------------------------------------------------------------------------
def test_onnx_runner_feeds_a_fixed_batch_model_any_batch(tmp_path: Path) -> None:
    layer = linear([[1.0, 2.0], [3.0, 4.0]], [0.5, -0.5])
    graph = export_onnx(layer, torch.zeros(1, 2), dynamic_batch=False)
    batch = np.arange(10, dtype=np.float32).reshape(5, 2)
    expected = TorchRunner(layer).run(batch)
    assert np.allclose(OnnxRunner(graph).run(batch), expected, atol=1e-6)
    (tmp_path / "fixed.onnx").write_bytes(graph.SerializeToString())
    assert np.allclose(OnnxRunner(tmp_path / "fixed.onnx").run(batch), expected, atol=1e-6)


def test_onnx_runner_rejects_garbage() -> None:
    with pytest.raises(SlimscopeError, match="onnxruntime cannot run this model"):
        OnnxRunner(b"definitely not onnx")


def test_runner_for_picks_the_module_or_explains() -> None:
    empty = TensorStore({}, {}, {}, {})
    layer = linear([[1.0]], [0.0])
    with_module = Model(path=Path("m.pt"), format="test", layers=[], tensors=empty, module=layer)
    assert isinstance(runner_for(with_module), TorchRunner)
    weights_only = Model(path=Path("w.safetensors"), format="test", layers=[], tensors=empty)
    with pytest.raises(NeedsModuleError, match="w.safetensors holds only weights"):
        runner_for(weights_only)


def test_measure_latency_restores_torch_threads(demo_module: nn.Module,
                                                test_split: DigitsData) -> None:
    threads_before = torch.get_num_threads()
    stats = measure_latency(TorchRunner(demo_module), test_split.inputs[:8], repeats=5, warmup=1)
    assert isinstance(stats, LatencyStats)
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms
    assert stats.repeats == 5 and stats.batch_size == 8 and stats.threads == 1
    assert torch.get_num_threads() == threads_before
    onnx_stats = measure_latency(OnnxRunner(DEMO_ONNX), test_split.inputs[:8], repeats=3,
                                 warmup=1, threads=2)
    assert onnx_stats.threads == 2 and onnx_stats.median_ms > 0
    assert set(stats.to_dict()) >= {"median_ms", "p90_ms"}


def test_metrics_primary_falls_back_to_agreement() -> None:
    assert Metrics(samples=4, agreement=0.75).primary == 0.75
    assert Metrics(samples=4, accuracy=0.5, agreement=0.75).primary == 0.5
    assert Metrics(samples=4).primary is None


def test_onnx_model_with_external_weights_runs_from_its_file(tmp_path) -> None:
    import numpy as np

    from engine.evaluate import runner_for
    from engine.formats import load_model
    from factories import write_onnx_external_data

    model = load_model(write_onnx_external_data(tmp_path))
    spec = model.inputs[0]
    shape = [d if isinstance(d, int) else 2 for d in spec.shape]
    outputs = runner_for(model).run(np.ones(shape, np.float32))
    assert outputs.shape[0] == shape[0] and np.isfinite(outputs).all()


def test_torch_export_files_evaluate(tmp_path) -> None:
    import numpy as np

    from engine.evaluate import runner_for
    from engine.formats import load_model
    from factories import TINY_CNN_INPUT, write_torch_export

    model = load_model(write_torch_export(tmp_path))
    outputs = runner_for(model).run(np.zeros(TINY_CNN_INPUT, np.float32))
    assert outputs.shape[0] == TINY_CNN_INPUT[0] and np.isfinite(outputs).all()

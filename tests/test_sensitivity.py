"""Sensitivity sweeps on real small models and the digits data: the exact method must reproduce
the naive loop on every graph shape it handles (skip connections, untraceable control flow,
batch-size-dependent values, a module called twice), the estimates must mean what they say,
and the results must survive JSON."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from engine.compressed import CompressedModel
from engine.data import ArraySource, DigitsData
from engine.demo import DEMO_MODEL
from engine.errors import SlimscopeError
from engine.formats import load_model
from engine.jobs import Cancelled, CancelToken
from engine.methods.base import keep_top
from engine.methods.quantize import quantize_tensor
from engine.sensitivity import (
    BASELINE,
    EXTRAPOLATED,
    MEASURED,
    Sensitivity,
    SweepSettings,
    fisher_diagonal,
    keep_masks,
    paired_drops,
    spearman,
    sweep,
    sweep_module,
)

SMALL = SweepSettings(sparsities=(0.0, 0.3, 0.6, 0.9), bits=(8, 4, 2))


class Residual(nn.Module):
    """conv -> bn -> relu, then a block whose input skips over two convs, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.conv2(F.relu(self.conv1(x))))
        return self.head(F.max_pool2d(x, 2).flatten(1))


class Untraceable(Residual):
    """Data-dependent control flow: torch.fx cannot trace `if` on a tensor's value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        if x.sum() > 0:
            x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(F.max_pool2d(x, 2).flatten(1))


class BatchSizeAhead(Residual):
    """Reads the batch size before the layers and uses it after them (a plain int)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        x = F.relu(self.conv2(F.relu(self.conv1(F.relu(self.bn(self.stem(x)))))))
        return self.head(F.max_pool2d(x, 2).reshape(batch, -1))


class CalledTwice(Residual):
    """conv1 runs twice, so compressing it changes two places in the graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.conv2(F.relu(self.conv1(F.relu(self.conv1(x))))))
        return self.head(F.max_pool2d(x, 2).flatten(1))


def seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def digits() -> DigitsData:
    return DigitsData("calibration")


def labelled_by(model: nn.Module, digits: DigitsData, count: int = 64) -> ArraySource:
    """Digits with the model's own top-1 as labels: its accuracy starts at 100%."""
    inputs = digits.inputs[:count]
    with torch.no_grad():
        labels = model(torch.from_numpy(inputs)).argmax(-1).numpy()
    return ArraySource(inputs, labels, "digits labelled by the model")


@pytest.fixture(scope="module")
def labelled_by_model(digits: DigitsData) -> ArraySource:
    return labelled_by(seeded(Residual), digits)


def assert_same(exact: Sensitivity, naive: Sensitivity, samples: int) -> None:
    """Same curves up to one sample flipping (batching can round differently), same bytes."""
    assert [layer.name for layer in exact.layers] == [layer.name for layer in naive.layers]
    for layer in exact.layers:
        other = naive.layer(layer.name)
        assert layer.curves.keys() == other.curves.keys()
        for axis, curve in layer.curves.items():
            assert curve.levels == other.curves[axis].levels
            assert curve.bytes == other.curves[axis].bytes, (layer.name, axis)
            assert curve.nonzero == other.curves[axis].nonzero, (layer.name, axis)
            measured = [i for i, s in enumerate(curve.status) if s != EXTRAPOLATED]
            ours = np.asarray(curve.metric)[measured]
            theirs = np.asarray(other.curves[axis].metric)[measured]
            assert np.max(np.abs(ours - theirs)) <= 1.0 / samples + 1e-9, (layer.name, axis)
            np.testing.assert_allclose(np.asarray(curve.secondary)[measured],
                                       np.asarray(other.curves[axis].secondary)[measured],
                                       rtol=1e-3, atol=1e-4)


# -- building blocks -------------------------------------------------------------------------
def test_keep_masks_are_keep_top_for_every_amount_even_with_ties() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 9)
    weight[weight.abs() < 0.3] = 0.0  # many exact zeros
    weight = torch.round(weight * 4) / 4  # and many equal magnitudes
    amounts = [0.0, 0.05, 1 / 3, 0.5, 0.61, 0.9, 0.95]
    for amount, mask in zip(amounts, keep_masks(weight.abs(), amounts)):
        assert torch.equal(mask, keep_top(weight.abs(), amount)), amount


def test_spearman_handles_ties_and_matches_a_hand_computed_value() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4): Pearson of the ranks
    assert spearman([0, 0, 1, 2], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)


# -- exact equals naive, whatever the graph ------------------------------------------------------
@pytest.mark.parametrize("cls, note", [
    (Residual, None),
    (Untraceable, "torch.fx cannot trace"),
    (BatchSizeAhead, None),
    (CalledTwice, "not called exactly once as a module (full forward passes instead): conv1"),
])
def test_exact_reproduces_the_naive_loop(cls: type[nn.Module], note: str | None,
                                         digits: DigitsData) -> None:
    model = seeded(cls)
    data = labelled_by(model, digits)
    settings = SweepSettings(sparsities=SMALL.sparsities, bits=SMALL.bits, chunk_size=24,
                             ranks=(0.5,) if cls is Residual else ())
    exact = sweep_module(model, data, "exact", settings)
    naive = sweep_module(model, data, "naive", settings)
    assert_same(exact, naive, len(data))
    if note is None:
        assert exact.notes == []
    else:
        assert any(note in line for line in exact.notes), exact.notes
    assert exact.metric == "accuracy" and exact.baseline == 1.0


def test_exact_on_the_demo_matches_naive_and_reads_agreement_without_labels() -> None:
    demo = load_model(DEMO_MODEL)
    test = DigitsData("test").head(150)
    unlabelled = ArraySource(DigitsData("test").inputs[:150], None, "unlabelled digits")
    settings = SweepSettings(sparsities=(0.0, 0.5, 0.9), bits=(4, 2))
    for data, layer in ((test, "features.7"), (unlabelled, "classifier.4")):
        exact = sweep(demo, data, "exact", settings, layers=[layer])
        naive = sweep_module(demo.module, data, "naive", settings, layers=[layer])
        assert_same(exact, naive, len(data))
    assert exact.metric == "agreement" and exact.secondary_metric == "kl_divergence"
    assert exact.baseline == 1.0 and exact.model == DEMO_MODEL.name


def test_collapse_stops_the_axis_and_fills_it_honestly(labelled_by_model: ArraySource) -> None:
    model = seeded(Residual)
    # collapse at any loss at all, one level per pass: only the first level is measured
    settings = SweepSettings(sparsities=(0.0, 0.3, 0.6, 0.9), bits=(8, 4, 2),
                             collapse_fraction=0.99, chunk_size=64, max_batch=64)
    result = sweep_module(model, labelled_by_model, "exact", settings, layers=["conv1"])
    curve = result.layer("conv1").curves["sparsity"]
    labels = labelled_by_model.labels
    assert result.chance == pytest.approx(np.bincount(labels).max() / len(labels))  # constant
    floor = result.chance + 0.99 * (result.baseline - result.chance)
    assert curve.metric[1] <= floor, "the test needs 30% sparsity to cost this model something"
    assert curve.status == [BASELINE, MEASURED, EXTRAPOLATED, EXTRAPOLATED]
    assert curve.metric[2:] == [curve.metric[1]] * 2
    assert curve.secondary[2:] == [curve.secondary[1]] * 2
    assert curve.bytes[1] > curve.bytes[2] > curve.bytes[3]  # sizes are still real
    naive = sweep_module(model, labelled_by_model, "naive", settings, layers=["conv1"])
    assert naive.layer("conv1").curves["sparsity"].metric[3] <= curve.metric[1] + 1e-9


def test_sweeps_leave_the_model_untouched_and_cancel_promptly(
        labelled_by_model: ArraySource) -> None:
    model = seeded(Residual).train()
    before = copy.deepcopy(model.state_dict())
    for method in ("exact", "fast", "datafree"):
        sweep_module(model, labelled_by_model, method, SMALL)
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())

    for method in ("exact", "fast", "naive"):
        token, calls = CancelToken(), []

        def progress(fraction: float, message: str = "", token=token, calls=calls) -> None:
            calls.append(message)
            if len(calls) == 2:
                token.cancel()

        with pytest.raises(Cancelled):
            sweep_module(model, labelled_by_model, method, SMALL, progress=progress,
                         cancel=token)
        assert len(calls) <= 3, (method, calls)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class CancelInsideTheSuffix(Residual):
    """Cancels its token when conv1 sees a batched suffix pass (more rows than the data has:
    several levels of `stem` at once), and records the batch sizes the head saw, to show the
    pass stops at the next node rather than at the end of the group."""

    def __init__(self, token: CancelToken, samples: int) -> None:
        super().__init__()
        self.token, self.samples, self.head_batches = token, samples, []
        self.conv1.register_forward_hook(self._conv1_ran)
        self.head.register_forward_hook(self._head_ran)

    def _conv1_ran(self, _: nn.Module, inputs: tuple[torch.Tensor], __: object) -> None:
        if len(inputs[0]) > self.samples:
            self.token.cancel()

    def _head_ran(self, _: nn.Module, inputs: tuple[torch.Tensor], __: object) -> None:
        self.head_batches.append(len(inputs[0]))


def test_exact_cancel_stops_a_suffix_pass_at_the_next_node(
        labelled_by_model: ArraySource) -> None:
    token = CancelToken()
    torch.manual_seed(0)
    model = CancelInsideTheSuffix(token, len(labelled_by_model)).eval()
    with pytest.raises(Cancelled):
        sweep_module(model, labelled_by_model, "exact", SMALL, layers=["stem"], cancel=token)
    assert token.cancelled and model.head_batches
    assert max(model.head_batches) <= len(labelled_by_model)  # no suffix pass reached the head


def test_methods_say_what_they_need(labelled_by_model: ArraySource) -> None:
    model = seeded(Residual)
    with pytest.raises(SlimscopeError, match="GiB of activations for 64 samples"):
        sweep_module(model, labelled_by_model, "exact", SweepSettings(cache_bytes=10_000))
    with pytest.raises(SlimscopeError, match="needs data"):
        sweep_module(model, None, "exact")
    with pytest.raises(SlimscopeError, match="unknown sensitivity method"):
        sweep_module(model, None, "guess")
    with pytest.raises(SlimscopeError, match="bit levels"):
        sweep_module(model, None, "datafree", SweepSettings(bits=(9,)))
    grouped = SweepSettings(quantization=SMALL.quantization.__class__(
        4, granularity="group", group_size=5))
    with pytest.raises(SlimscopeError, match="group_size"):
        sweep_module(model, None, "datafree", grouped)


# -- the estimates ---------------------------------------------------------------------------
def test_datafree_is_the_weight_noise_to_signal_ratio() -> None:
    model = seeded(Residual)
    result = sweep_module(model, None, "datafree", SMALL)
    weight = model.conv2.weight.detach()
    curve = result.layer("conv2").curves["sparsity"]
    pruned = weight * keep_top(weight.abs(), 0.6)
    expected = float((pruned - weight).square().sum() / weight.square().sum())
    assert curve.metric[2] == pytest.approx(expected, rel=1e-5)
    bits = result.layer("conv2").curves["bits"]
    quantized = quantize_tensor(weight, 4).dequantize()
    expected = float((quantized - weight).square().sum() / weight.square().sum())
    assert bits.metric[bits.levels.index(4)] == pytest.approx(expected, rel=1e-5)
    assert result.metric == "weight_nsr" and not result.higher_is_better


def test_fisher_with_single_samples_is_the_mean_squared_gradient(digits: DigitsData) -> None:
    model = seeded(Residual)
    inputs = torch.from_numpy(digits.inputs[:6])
    labels = digits.labels[:6]
    fisher, loss = fisher_diagonal(model, ["head"], [inputs], [labels], micro_batch=1)
    grads = []
    for x, y in zip(inputs, labels):
        model.zero_grad()
        F.cross_entropy(model(x[None]), torch.tensor([int(y)])).backward()
        grads.append(model.head.weight.grad.clone())
    model.zero_grad()
    torch.testing.assert_close(fisher["head"], torch.stack(grads).square().mean(0))
    expected_loss = F.cross_entropy(model(inputs), torch.from_numpy(labels)).item()
    assert loss == pytest.approx(expected_loss, rel=1e-5)


def test_fast_estimate_grows_with_compression_and_tracks_the_measured_loss() -> None:
    demo = load_model(DEMO_MODEL)
    settings = SweepSettings(sparsities=(0.0, 0.3, 0.6, 0.9, 0.95), bits=(8, 4, 3, 2))
    fast = sweep(demo, DigitsData("calibration"), "fast", settings)
    for layer in fast.layers:
        for curve in layer.curves.values():
            assert np.all(np.diff(curve.delta) > 0), layer.name
            assert curve.status[1:] == ["estimated"] * (len(curve.levels) - 1)
    exact = sweep(demo, DigitsData("test"), "exact", settings)  # = naive, as tested above
    drops, measured_loss = paired_drops(fast, exact, secondary_b=True)
    assert spearman(drops, measured_loss) > 0.6


# -- results as data -------------------------------------------------------------------------
def test_results_round_trip_through_json_and_draw_as_a_heat_map(tmp_path) -> None:
    result = sweep_module(seeded(Residual), None, "datafree",
                          SweepSettings(sparsities=SMALL.sparsities, bits=SMALL.bits, ranks=(0.5,)))
    path = tmp_path / "sens.json"
    result.save(path)
    loaded = Sensitivity.load(path)
    assert loaded.to_dict() == result.to_dict()
    names, levels, matrix = loaded.heatmap("sparsity")
    assert names == ["stem", "conv1", "conv2", "head"] and levels == [0.0, 0.3, 0.6, 0.9]
    assert matrix.shape == (4, 4) and np.all(matrix[:, 0] == 0) and np.all(matrix[:, -1] > 0)
    rank_names, rank_levels, _ = loaded.heatmap("rank")
    assert rank_levels == [1.0, 0.5] and "head" in rank_names
    bits = loaded.layer("head").curves["bits"]
    weight = seeded(Residual).head.weight
    q = quantize_tensor(weight, 2)
    from engine.compress import tensor_storage_bytes

    stored = tensor_storage_bytes(CompressedModel(nn.Module(), quantized={"w": q}), "w",
                                  q.dequantize())
    assert bits.bytes[bits.levels.index(2)] == stored
    path.write_text('{"version": 99}')
    with pytest.raises(SlimscopeError, match="version"):
        Sensitivity.load(path)

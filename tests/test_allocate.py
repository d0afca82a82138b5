"""Allocation on the demo model's real sensitivity results: bytes counted as compress() counts
them, the dynamic program against brute force over every combination, the Pareto front, and
plans that replay through the CLI and beat a uniform plan of the same size."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.allocate import (
    Option,
    allocate,
    predict_plan,
    layer_options,
    pareto_front,
    parse_size,
    plan_from_choices,
    predicted_bytes,
    uniform_choices,
)
from engine.cli import main
from engine.compress import compress, tensor_storage_bytes
from engine.data import DigitsData
from engine.demo import DEMO_MODEL
from engine.errors import PlanError
from engine.evaluate import TorchRunner, evaluate
from engine.formats import load_model
from engine.methods.apply import apply_plan
from engine.model import Model
from engine.plan import Plan, Quantization
from engine.sensitivity import Sensitivity, SweepSettings, sweep
from engine.storage import storage_bytes

GRID = SweepSettings(sparsities=(0.0, 0.5, 0.9), bits=(8, 4, 2))
RESOLUTION = 2048


@pytest.fixture(scope="module")
def demo() -> Model:
    return load_model(DEMO_MODEL)


@pytest.fixture(scope="module")
def datafree(demo: Model) -> Sensitivity:
    return sweep(demo, None, "datafree", GRID)


def every_plan(options: list[list[Option]]) -> tuple[np.ndarray, np.ndarray]:
    """Layer bytes and cost of every combination of one option per layer (brute force)."""
    sizes, costs = np.zeros(1, dtype=np.int64), np.zeros(1)
    for opts in options:
        sizes = (sizes[:, None] + np.array([o.bytes for o in opts])[None, :]).ravel()
        costs = (costs[:, None] + np.array([o.cost for o in opts])[None, :]).ravel()
    return sizes, costs


def best_within(sizes: np.ndarray, costs: np.ndarray, budget: float) -> float:
    fitting = costs[sizes <= budget]
    return float(fitting.min()) if fitting.size else np.inf


# -- bytes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_storage_bytes_is_the_rule_compress_counts_by(demo: Model, symmetric: bool) -> None:
    for sparsity, bits in itertools.product((0.0, 0.8), (8, 2)):
        plan = Plan.from_dict({"defaults": {
            "pruning": {"method": "magnitude", "amount": sparsity},
            "quantization": {"bits": bits, "symmetric": symmetric}}})
        compressed = apply_plan(demo.module, plan)
        for key, q in compressed.quantized.items():
            tensor = compressed.module.get_parameter(key).detach()
            overhead = q.scale.numel() * 4 + (0 if symmetric else q.zero_point.numel())
            assert storage_bytes(tensor.numel(), int(torch.count_nonzero(tensor)), bits,
                                 overhead) == tensor_storage_bytes(compressed, key, tensor), key


def test_predicted_bytes_never_undercount_and_are_exact_on_one_axis(
        demo: Model, datafree: Sensitivity) -> None:
    for sparsity, bits in itertools.product(GRID.sparsities, (None, *GRID.bits)):
        choices = uniform_choices(datafree, sparsity, bits)
        _, report = compress(demo, plan_from_choices(datafree, choices), measure=False)
        predicted = predicted_bytes(datafree, choices)
        assert report.bytes_before == datafree.model_bytes
        if sparsity == 0.0 or bits is None:
            assert report.bytes_after == predicted, (sparsity, bits)
        else:  # quantizing also zeroes small weights: the file can only be smaller
            assert report.bytes_after <= predicted, (sparsity, bits)
            assert report.bytes_after >= 0.9 * predicted, (sparsity, bits)


@pytest.mark.parametrize("granularity", ["per-channel", "group"])
def test_rank_options_are_sized_exactly_and_replay(demo: Model, granularity: str) -> None:
    """Every (rank, bits) option's predicted bytes are what compress() stores for its plan;
    group-quantized ranks whose factor rows the groups do not divide are not offered."""
    quantization = Quantization(8, True, granularity, 16 if granularity == "group" else None)
    settings = SweepSettings(sparsities=(0.0,), bits=(8, 4), ranks=(0.5, 0.1), quantization=quantization)
    # features.0's rows (9 weights) take no 16-groups at all; the others' do
    result = sweep(demo, None, "datafree", settings,
                   layers=["features.3", "features.7", "classifier.1", "classifier.4"])
    kept = {entry.name: entry.bytes_after for entry in compress(demo, Plan(), measure=False)[1].layers}
    seen = 0
    for layer in result.layers:
        bias_bytes = kept[layer.name] - layer.curves["bits"].bytes[0]  # the bias stays as it is
        for option in layer_options(result, layer):
            if option.rank is None:
                continue
            seen += 1
            if option.quantized and granularity == "group":
                assert option.rank % 16 == 0, (layer.name, option)
            plan = plan_from_choices(result, {layer.name: option})
            compressed, report = compress(demo, plan, measure=False)
            assert layer.name in compressed.low_rank
            stored = next(entry.bytes_after for entry in report.layers if entry.name == layer.name)
            assert stored == option.bytes + bias_bytes, (layer.name, option)
            assert predict_plan(result, plan, demo.layers).approximate == []
    assert seen >= 4


def test_rank_options_only_ever_help_the_prediction(demo: Model) -> None:
    ranked = sweep(demo, None, "datafree",
                   SweepSettings(sparsities=(0.0, 0.5, 0.9), bits=(8, 4, 2), ranks=(0.5, 0.125)))
    plain = Sensitivity.from_dict(ranked.to_dict())
    for layer in plain.layers:
        layer.curves.pop("rank", None)
    for fraction in (0.25, 0.1, 0.06, 0.045):
        with_ranks = allocate(ranked, target_ratio=fraction, resolution=RESOLUTION)
        without = allocate(plain, target_ratio=fraction, resolution=RESOLUTION)
        assert with_ranks.drop <= without.drop + 1e-12, fraction
    assert any(option.rank for option in allocate(ranked, target_ratio=0.04).choices.values())


# -- the optimization ----------------------------------------------------------------------------
def test_dynamic_program_matches_brute_force_at_every_budget(datafree: Sensitivity) -> None:
    options = [layer_options(datafree, layer) for layer in datafree.layers]
    sizes, costs = every_plan(options)
    layers = len(options)
    for fraction in (0.05, 0.07, 0.1, 0.15, 0.3, 0.6):
        budget = int(fraction * datafree.model_bytes)
        result = allocate(datafree, target_bytes=budget, resolution=RESOLUTION)
        layer_budget = budget - datafree.fixed_bytes
        slack = layers * layer_budget / RESOLUTION  # each option rounded up by < one unit
        assert result.bytes <= budget
        assert result.drop >= best_within(sizes, costs, layer_budget) - 1e-12
        assert result.drop <= best_within(sizes, costs, layer_budget - slack) + 1e-12
        assert result.bytes == predicted_bytes(datafree, result.choices)
        assert result.plan.resolve(load_model(DEMO_MODEL).layers)


def test_pareto_front_is_monotone_and_optimal(datafree: Sensitivity) -> None:
    options = [layer_options(datafree, layer) for layer in datafree.layers]
    sizes, costs = every_plan(options)
    front = pareto_front(datafree, resolution=RESOLUTION)
    assert len(front) > 20
    assert all(a.bytes < b.bytes and a.drop > b.drop for a, b in zip(front, front[1:]))
    slack = len(options) * sizes.max() / RESOLUTION
    assert front[-1].drop == 0.0 and front[-1].bytes == datafree.fixed_bytes + sizes.max()
    assert front[0].bytes <= datafree.fixed_bytes + sizes.min() + slack
    for point in front:
        layer_bytes = point.bytes - datafree.fixed_bytes
        assert best_within(sizes, costs, layer_bytes) <= point.drop + 1e-12
        assert point.drop <= best_within(sizes, costs, layer_bytes - slack) + 1e-12
        assert point.ratio == pytest.approx(point.bytes / datafree.model_bytes)


def test_max_drop_finds_the_smallest_plan_within_it(datafree: Sensitivity) -> None:
    options = [layer_options(datafree, layer) for layer in datafree.layers]
    sizes, costs = every_plan(options)
    for max_drop in (0.0, 0.01, 0.1, 1.0):
        result = allocate(datafree, max_drop=max_drop, resolution=RESOLUTION)
        assert result.drop <= max_drop
        smallest = datafree.fixed_bytes + sizes[costs <= max_drop].min()
        slack = len(options) * (result.bytes - datafree.fixed_bytes) / RESOLUTION
        assert result.bytes <= (smallest + slack) * 1.002


def test_noise_cannot_buy_budget(datafree: Sensitivity) -> None:
    """A level that measured better than the baseline, or better than a lighter level, costs
    what the lighter level cost: gains are noise, more compression is no better."""
    noisy = Sensitivity.from_dict(datafree.to_dict())
    layer = noisy.layer("classifier.1")
    curve = layer.curves["sparsity"]
    curve.delta = [0.0, -0.2, 0.05]  # weight_nsr: lower is better, so -0.2 is a "gain"
    by_level = {(o.sparsity, o.bits): o.cost for o in layer_options(noisy, layer)
                if not o.quantized}
    assert by_level[(0.5, 32)] == 0.0 and by_level[(0.9, 32)] == 0.05
    curve.delta = [0.0, 0.3, 0.1]
    by_level = {(o.sparsity, o.bits): o.cost for o in layer_options(noisy, layer)
                if not o.quantized}
    assert by_level[(0.9, 32)] == 0.3


@pytest.mark.parametrize("text, expected", [
    ("0.25", (None, 0.25)), ("1/16", (None, 1 / 16)), ("1", (None, 1.0)),
    ("200000", (200000, None)), ("180KiB", (180 * 1024, None)), ("1.5MB", (1_500_000, None)),
    ("2 mib", (2 * 1024**2, None)),
])
def test_sizes_read_as_ratios_or_bytes(text: str, expected: tuple) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1/0", "12 parsecs", "-3"])
def test_bad_sizes_are_one_line_errors(text: str) -> None:
    with pytest.raises(PlanError, match="not a size"):
        parse_size(text)


def test_impossible_targets_say_what_is_possible(datafree: Sensitivity) -> None:
    with pytest.raises(PlanError, match="below the smallest these levels allow"):
        allocate(datafree, target_ratio=0.001)
    with pytest.raises(PlanError, match="exactly one target"):
        allocate(datafree, target_ratio=0.1, max_drop=0.1)


# -- end to end ----------------------------------------------------------------------------------
def test_allocation_beats_the_uniform_plan_of_the_same_size(demo: Model) -> None:
    test = DigitsData("test")
    settings = SweepSettings(sparsities=(0.0, 0.25, 0.5, 0.75, 0.9), bits=(8, 4, 3, 2))
    exact = sweep(demo, test, "exact", settings)
    uniform = plan_from_choices(exact, uniform_choices(exact, 0.5, 3))
    uniform_model, uniform_report = compress(demo, uniform, measure=False)
    uniform_accuracy = evaluate(TorchRunner(uniform_model.module), test).accuracy
    result = allocate(exact, target_bytes=uniform_report.bytes_after)
    allocated_model, report = compress(demo, result.plan, measure=False)
    accuracy = evaluate(TorchRunner(allocated_model.module), test).accuracy
    assert report.bytes_after <= result.bytes <= uniform_report.bytes_after
    assert uniform_accuracy < exact.baseline - 0.03, "the uniform plan should cost > 3 points"
    assert accuracy >= exact.baseline - 0.01


def test_cli_sensitivity_then_plan_then_compress(tmp_path: Path, capsys) -> None:
    sens_path, plan_path = tmp_path / "sens.json", tmp_path / "plan.yaml"
    assert main(["sensitivity", "demo", "--method", "fast", "--sparsities", "0:0.9:0.3",
                 "--bits", "8,4,3", "-o", str(sens_path)]) == 0
    sens = Sensitivity.load(sens_path)
    assert sens.method == "fast" and "calibration" in sens.data
    assert [layer.name for layer in sens.layers] == \
        ["features.0", "features.3", "features.7", "classifier.1", "classifier.4"]
    assert main(["plan", "demo", "--sensitivity", str(sens_path), "--target-size", "1/8",
                 "-o", str(plan_path), "--report", str(tmp_path / "alloc.json")]) == 0
    predicted = json.loads((tmp_path / "alloc.json").read_text())["predicted"]
    assert predicted["ratio"] <= 1 / 8
    assert main(["compress", "demo", "--plan", str(plan_path), "-o",
                 str(tmp_path / "out.safetensors"), "--no-measure",
                 "--report", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bytes_after"] <= predicted["bytes"]
    assert main(["plan", "demo", "--sensitivity", str(sens_path), "--max-drop", "1e-6",
                 "-o", str(tmp_path / "small.json")]) == 0
    assert Plan.load(tmp_path / "small.json").layers
    capsys.readouterr()

    other = tmp_path / "other.json"
    sens.layers[0].shape = (1, 2, 3)
    sens.save(other)
    assert main(["plan", "demo", "--sensitivity", str(other), "--target-size", "0.2",
                 "-o", str(tmp_path / "x.yaml")]) == 2
    assert "features.0" in capsys.readouterr().err


def _datafree_demo() -> Sensitivity:
    return sweep(load_model(DEMO_MODEL), None, "datafree")


def test_levels_measured_as_nan_are_never_chosen() -> None:
    """A model that outputs NaN at some level (or an edited file) leaves NaN in a curve: NaN
    compares false both ways, and the allocator took such levels as free."""
    sens = _datafree_demo()
    poisoned = sens.layers[1].curves["bits"]
    poisoned.delta = [poisoned.delta[0]] + [float("nan")] * (len(poisoned.delta) - 1)
    allocation = allocate(sens, target_ratio=0.2)
    layer = sens.layers[1]
    assert allocation.choices[layer.name].bits == layer.float_bits  # only float is measured
    assert np.isfinite(allocation.drop)
    quantized = [name for name, option in allocation.choices.items() if option.quantized]
    assert quantized  # the other layers still reach the target with their measured levels


def test_a_sensitivity_of_only_nan_levels_says_so() -> None:
    sens = _datafree_demo()
    for layer in sens.layers:
        for curve in layer.curves.values():
            curve.delta = [float("nan")] * len(curve.delta)
    with pytest.raises(PlanError, match=r"1\.0000\); \d+ levels measured as NaN or infinite"):
        allocate(sens, target_ratio=0.3)
    assert allocate(sens, max_drop=0.01).plan.to_dict().get("layers", {}) == {}

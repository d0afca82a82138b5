"""Plans checked by measurement: a largest drop the compressed demo model really keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.allocate import allocate
from engine.cli import main
from engine.compress import compress
from engine.data import ArraySource, DigitsData
from engine.demo import DEMO_MODEL
from engine.errors import PlanError
from engine.evaluate import TorchRunner, evaluate
from engine.formats import load_model
from engine.model import Model
from engine.plan import Plan
from engine.plan_check import allocate_within_measured_drop, check_allocation
from engine.sensitivity import Sensitivity, SweepSettings, sweep

GRID = SweepSettings(sparsities=(0.0, 0.25, 0.5, 0.75, 0.9), bits=(8, 4, 3, 2))
#: On this grid the additive prediction for a 5-point limit measures ~15 points.
MAX_DROP = 0.05


@pytest.fixture(scope="module")
def demo() -> Model:
    return load_model(DEMO_MODEL)


@pytest.fixture(scope="module")
def test_split() -> DigitsData:
    return DigitsData("test")


@pytest.fixture(scope="module")
def exact(demo: Model, test_split: DigitsData) -> Sensitivity:
    return sweep(demo, test_split, "exact", GRID)


def measured_accuracy(model: Model, plan: Plan, data: DigitsData) -> float:
    compressed, _ = compress(model, plan, measure=False)
    accuracy = evaluate(TorchRunner(compressed.module), data).accuracy
    assert accuracy is not None
    return accuracy


def test_checked_max_drop_holds_where_the_prediction_breaks_it(
        demo: Model, test_split: DigitsData, exact: Sensitivity) -> None:
    unchecked = allocate(exact, max_drop=MAX_DROP)
    baseline = exact.baseline
    assert baseline - measured_accuracy(demo, unchecked.plan, test_split) > MAX_DROP, \
        "the test needs a limit the additive prediction breaks"

    checked = allocate_within_measured_drop(exact, demo, test_split, MAX_DROP)
    assert checked.metric_name == "accuracy" and checked.baseline == pytest.approx(baseline)
    assert checked.chosen.drop <= MAX_DROP
    assert len(checked.trials) <= 6 + 1
    # what it reports is what compressing the plan it returns measures
    assert baseline - measured_accuracy(demo, checked.plan, test_split) == \
        pytest.approx(checked.chosen.drop)
    # and it is the smallest plan among those it measured that fit
    fitting = [t.bytes for t in checked.trials if t.drop <= MAX_DROP]
    assert checked.chosen.bytes == min(fitting)
    assert checked.chosen.bytes <= checked.chosen.allocation.bytes  # the prediction never undercounts


def test_a_plan_that_fits_at_once_is_measured_once(
        demo: Model, test_split: DigitsData, exact: Sensitivity) -> None:
    checked = allocate_within_measured_drop(exact, demo, test_split, 1.0)
    assert len(checked.trials) == 1 and checked.chosen.drop <= 1.0
    sized = check_allocation(exact, demo, test_split, allocate(exact, target_ratio=1 / 8))
    assert sized.chosen.bytes <= sized.chosen.allocation.bytes <= demo.nbytes / 8
    assert sized.chosen.metric == pytest.approx(exact.baseline - sized.chosen.drop)


def test_what_cannot_be_measured_is_refused_in_one_line(
        demo: Model, test_split: DigitsData) -> None:
    datafree = sweep(demo, None, "datafree", GRID)
    with pytest.raises(PlanError, match="weight_nsr.*cannot measure"):
        allocate_within_measured_drop(datafree, demo, test_split, 0.01)
    unlabelled = ArraySource(test_split.inputs[:64], None, "digits without labels")
    agreement = sweep(demo, unlabelled, "exact", GRID)  # agreement needs no labels
    checked = check_allocation(agreement, demo, unlabelled, allocate(agreement, target_ratio=0.2))
    assert checked.metric_name == "agreement" and checked.baseline == 1.0
    fast = sweep(demo, unlabelled, "fast", GRID)  # its loss is against the model's own top-1
    with pytest.raises(PlanError, match="needs labels"):
        check_allocation(fast, demo, unlabelled, allocate(fast, target_ratio=0.2))


def test_cli_plan_check_searches_and_reports(tmp_path: Path, capsys,
                                             exact: Sensitivity) -> None:
    sens_path, plan_path, report_path = (tmp_path / name for name in
                                         ("sens.json", "plan.yaml", "report.json"))
    exact.save(sens_path)
    assert main(["plan", "demo", "--sensitivity", str(sens_path), "--max-drop", str(MAX_DROP),
                 "--check", "demo", "-o", str(plan_path), "--report", str(report_path)]) == 0
    err = capsys.readouterr().err
    assert "tried: predicted drop" in err and "measured on demo digits (test)" in err
    report = json.loads(report_path.read_text())
    assert report["checked"]["chosen"]["drop"] <= MAX_DROP
    assert Plan.load(plan_path).to_dict() == report["plan"]
    assert main(["plan", "demo", "--sensitivity", str(sens_path), "--max-drop", "0.01",
                 "--check", "no/such/folder", "-o", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "x.yaml").exists()

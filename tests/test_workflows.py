"""The use cases are written once (engine.workflows): the CLI and the app make the same plans and
reports from the same inputs, results for another model are refused by names and shapes, and
recovery reports every step as a typed event while the progress runs to 100 %.

The demo model and its data are real; the app side runs the real panel and the real job body.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import workflows
from engine.cli import main
from engine.data import DataSpec
from engine.demo import DEMO_MODEL
from engine.errors import SlimscopeError
from engine.formats import load_model
from engine.model import Model
from engine.plan import Plan
from engine.sensitivity import Sensitivity

WAIT_MS = 60_000
#: A small exact sweep: enough levels for allocation to choose, few enough to take seconds.
SWEEP_ARGS = ["--method", "exact", "--sparsities", "0,0.5,0.9", "--bits", "8,4", "--samples", "128"]
PLAN = {"defaults": {"pruning": {"method": "magnitude", "amount": 0.5},
                     "quantization": {"bits": 8}},
        "recovery": {"steps": 8, "eval_every": 4}}
#: Report fields that are timings, which no two runs share.
TIMINGS = ("latency_before_ms", "latency_after_ms")


@pytest.fixture(scope="module")
def demo() -> Model:
    return load_model(DEMO_MODEL)


@pytest.fixture(scope="module")
def sens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sens") / "sens.json"
    assert main(["sensitivity", "demo", *SWEEP_ARGS, "-o", str(path)]) == 0
    return path


def without_timings(report: dict) -> dict:
    report = {key: value for key, value in report.items() if key not in TIMINGS}
    if report.get("recovery"):
        report["recovery"] = {k: v for k, v in report["recovery"].items() if k != "seconds"}
    return report


# -- engine only --------------------------------------------------------------------------------
def test_data_spec_fills_the_demo_defaults_only_for_the_demo() -> None:
    assert DataSpec().effective(True) == DataSpec("demo", "demo:calibration", "demo:train")
    assert DataSpec().effective(False) == DataSpec()
    assert DataSpec("x.npz").effective(True) == DataSpec("x.npz")  # the user's data, no demo mix
    assert DataSpec(None, "demo", limit=5).effective(True).limit == 5
    assert [path for _role, path in DataSpec("demo", "a.npz").read_inputs()] == \
        [None, Path("a.npz"), None]


def test_cli_sweep_is_the_workflow_sweep(demo: Model, sens_file: Path) -> None:
    from engine.sensitivity import SweepSettings

    settings = SweepSettings(sparsities=(0.0, 0.5, 0.9), bits=(8, 4))
    ours = workflows.sweep(demo, DataSpec(limit=128), "exact", settings)  # the demo's own data
    theirs = Sensitivity.load(sens_file)
    assert ours.data == theirs.data and ours.baseline == theirs.baseline
    assert [layer.to_dict() for layer in ours.layers] == [layer.to_dict() for layer in theirs.layers]


def test_sweep_without_data_names_the_method_that_needs_none(tmp_path: Path) -> None:
    model = load_model(DEMO_MODEL)
    model.path = tmp_path / "not_the_demo.safetensors"  # no demo data for other models
    with pytest.raises(SlimscopeError, match="the exact method needs data .*datafree"):
        workflows.sweep(model, DataSpec(), "exact")


def test_results_for_another_model_are_refused_by_name_and_by_shape(demo: Model,
                                                                    sens_file: Path) -> None:
    sens = Sensitivity.load(sens_file)
    workflows.check_fits(sens, demo)
    sens.layers[1].shape = (3, 2, 1)
    with pytest.raises(SlimscopeError, match=r"another model: layer 'features.3' is \(64, 32, 3, 3\) in .* but \(3, 2, 1\)"):
        workflows.check_fits(sens, demo)
    sens = Sensitivity.load(sens_file)
    sens.layers[0].name, sens.layers[2].name = "encoder.0", "encoder.1"
    with pytest.raises(SlimscopeError, match=r"has no layer 'encoder.0' \(and 1 more\)"):
        workflows.check_fits(sens, demo)
    with pytest.raises(SlimscopeError, match="another model"):  # the app's allocation checks too
        workflows.allocate_plan(sens, demo, workflows.Target(target_ratio=0.3))


def test_compress_reports_each_recovery_step_and_the_progress_reaches_the_end(demo: Model) -> None:
    events: list[workflows.Event] = []
    progress: list[tuple[float, str]] = []
    outcome = workflows.compress(demo, PLAN, DataSpec().effective(workflows.is_demo(demo)),
                                 progress=lambda f, m="": progress.append((f, m)),
                                 on_event=events.append)
    steps = [event for event in events if isinstance(event, workflows.RecoveryStep)]
    assert [step.step for step in steps] == list(range(1, 9))
    assert {step.total for step in steps} == {8} and all(step.lr > 0 for step in steps)
    assert [step.step for step in steps if step.metric is not None] == [4, 8]
    assert outcome.history == steps and outcome.report.recovery["steps"] == 8
    assert progress[-1][0] == 1.0
    # recovery takes nearly all the time, so it spans nearly all of the bar: not 0.2..0.6
    at_last_step = next(f for f, m in progress if m.startswith("recovery step 8/8"))
    assert at_last_step >= 0.9
    first_step = next(f for f, m in progress if m.startswith("recovery step 1/8"))
    assert first_step <= 0.2


# -- the CLI and the app, from the same inputs --------------------------------------------------
@pytest.mark.parametrize("check", [False, True], ids=["predicted", "checked"])
def test_cli_and_app_allocate_the_same_plan(qtbot, tmp_path: Path, sens_file: Path,
                                           check: bool) -> None:
    pytest.importorskip("PySide6")
    from gui.analysis import AnalysisState
    from gui.panels.pareto import ParetoPanel
    from gui.project import DataChoice
    from gui.session import Session

    plan_path, report_path = tmp_path / "plan.yaml", tmp_path / "report.json"
    argv = ["plan", "demo", "--sensitivity", str(sens_file), "--target-size", "0.3",
            "-o", str(plan_path), "--report", str(report_path)]
    assert main(argv + (["--check", "demo"] if check else [])) == 0
    cli_report = json.loads(report_path.read_text())

    session = Session()
    session.set_model(load_model(DEMO_MODEL), sweep=False)
    state = AnalysisState(session)
    state.set_sensitivity(Sensitivity.load(sens_file),  # the app checks on the sweep's data
                          DataChoice(spec="demo", method="exact", limit=0))
    panel = ParetoPanel(state, session.plan_document)
    qtbot.addWidget(panel)
    panel.size_edit.setText("0.3")
    panel.check_box.setChecked(check)
    job = panel.allocate()
    assert job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)
    try:
        assert session.plan_document.to_dict() == Plan.load(plan_path).to_dict()
        assert panel.last_outcome is not None
        app_report = json.loads(json.dumps(panel.last_outcome.to_dict(), default=str))
        assert app_report == cli_report
        assert ("checked" in app_report) == check
        assert ("Measured on" in panel.allocation_label.text()) == check
    finally:
        state.shutdown()
        session.shutdown()


def test_cli_and_app_compress_to_the_same_report(qtbot, tmp_path: Path) -> None:
    pytest.importorskip("PySide6")
    from gui.session import Session
    from gui.workers import compression_job

    plan_path, report_path = tmp_path / "plan.yaml", tmp_path / "report.json"
    Plan.from_dict(PLAN).save(plan_path)
    assert main(["compress", "demo", "--plan", str(plan_path), "--report", str(report_path)]) == 0
    cli_report = json.loads(report_path.read_text())

    session = Session()
    session.set_model(load_model(DEMO_MODEL), sweep=False)
    job = compression_job(session.model, Plan.load(plan_path).to_dict(), session.effective_data())
    outcomes, steps = [], []
    job.succeeded.connect(outcomes.append)
    job.partial.connect(steps.append)
    job.run_here()  # the very body the app's worker runs
    session.shutdown()
    app_report = json.loads(json.dumps(outcomes[0].report.to_dict(), default=str))
    assert without_timings(app_report) == without_timings(cli_report)
    assert [step.step for step in steps] == list(range(1, 9))

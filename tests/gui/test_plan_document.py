"""Every plan edit is one undo step, undo restores the exact plan, and the file replays in the CLI."""

from pathlib import Path

import pytest

from engine.errors import PlanError
from engine.formats import load_model
from engine.demo import DEMO_MODEL
from engine.plan import Plan
from gui.plan_document import PlanDocument


@pytest.fixture
def document(qtbot) -> PlanDocument:
    return PlanDocument()


def test_each_edit_is_one_undo_step_and_undo_restores_exactly(document, qtbot) -> None:
    seen = []
    document.changed.connect(lambda: seen.append(document.to_dict()))
    document.set_defaults({"quantization": {"bits": 8, "granularity": "per-channel"}})
    document.set_layers(["features.0", "features.3"], {"pruning": {"method": "magnitude",
                                                                    "amount": 0.3}})
    document.set_layers(["features.0"], "keep")
    assert document.undo_stack.count() == 3
    assert document.layer_sections("features.0") == "keep"
    assert document.layer_sections("features.3")["pruning"]["amount"] == 0.3
    document.undo_stack.undo()
    assert document.layer_sections("features.0")["pruning"]["amount"] == 0.3
    document.undo_stack.undo()
    document.undo_stack.undo()
    assert document.to_dict() == Plan().to_dict()
    document.undo_stack.redo()
    assert document.to_dict()["defaults"]["quantization"]["bits"] == 8
    assert len(seen) == 7  # three edits, three undos, one redo: one signal each

def test_invalid_edit_leaves_plan_and_stack_untouched(document) -> None:
    document.set_layers(["classifier.1"], {"pruning": {"method": "magnitude", "amount": 0.5}})
    before = document.to_dict()
    with pytest.raises(PlanError):
        document.set_layers(["classifier.1"], {"quantisation": {"bits": 4}})
    with pytest.raises(PlanError):
        document.replace({"defaults": {"pruning": {"amount": 1.5}}, "bogus": 1})
    assert document.to_dict() == before
    assert document.undo_stack.count() == 1


def test_resolve_reports_layer_errors_in_one_line(document) -> None:
    model = load_model(DEMO_MODEL)
    document.set_layers(["no.such.layer"], {"pruning": {"amount": 0.5}})
    resolved, error = document.resolve(model.layers)
    assert resolved == {} and "no.such.layer" in error and "\n" not in error
    document.undo_stack.undo()
    resolved, error = document.resolve(model.layers)
    assert error is None and set(resolved) == set(model.layer_names())


def test_saved_plan_replays_identically(document, tmp_path: Path) -> None:
    document.set_defaults({"pruning": {"method": "magnitude-global", "amount": 0.5}})
    document.set_layers(["classifier.4"], "keep")
    path = document.save(tmp_path / "plan.yaml")
    assert Plan.load(path).to_dict() == document.to_dict()
    assert document.undo_stack.isClean()
    other = PlanDocument()
    other.load(path)
    assert other.to_dict() == document.to_dict()

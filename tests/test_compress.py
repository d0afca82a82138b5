"""compress() on the real demo model, and the `compress` CLI replaying a saved plan exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main
from engine.compress import compress
from engine.data import DigitsData
from engine.demo import DEMO_MODEL
from engine.formats import load_model
from engine.methods.apply import apply_plan
from engine.plan import Plan

PLAN_50_INT8 = {
    "defaults": {
        "pruning": {"method": "magnitude-global", "amount": 0.5},
        "quantization": {"bits": 8, "granularity": "per-channel"},
    }
}


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_MODEL)


def test_half_sparse_int8_demo_keeps_accuracy_within_one_point(demo) -> None:
    before = {k: v.clone() for k, v in demo.module.state_dict().items()}
    compressed, report = compress(demo, Plan.from_dict(PLAN_50_INT8), DigitsData("test"),
                                  calibration=DigitsData("calibration"))
    acc_before = report.metrics_before["accuracy"]
    acc_after = report.metrics_after["accuracy"]
    assert acc_before >= 0.97
    assert acc_after >= acc_before - 0.01
    prunable = [layer for layer in report.layers if layer.kind in ("Conv2d", "Linear")]
    total = sum(layer.params_before for layer in prunable)
    weighted_sparsity = sum(layer.sparsity * layer.params_before for layer in prunable) / total
    assert weighted_sparsity == pytest.approx(0.5, abs=0.01)
    assert all(layer.bits == 8 for layer in prunable)
    # 50% zeros + 8-bit codes: well under a quarter of fp32, with masks and scales included.
    assert report.size_ratio < 0.2
    assert report.latency_before_ms > 0 and report.latency_after_ms > 0
    for key, tensor in demo.module.state_dict().items():  # the original is never modified
        assert torch.equal(tensor, before[key]), key
    assert compressed.module is not demo.module


def test_weights_only_model_compresses_without_a_metric(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(4, 3).state_dict(), path)
    compressed, report = compress(load_model(path), Plan.from_dict(PLAN_50_INT8))
    assert compressed.module is None and report.metrics_after is None
    assert "no accuracy figure: the file holds weights only, no graph" in report.notes


def test_plan_replayed_from_yaml_by_cli_is_bit_identical_to_api(tmp_path: Path, demo) -> None:
    plan_path = tmp_path / "plan.yaml"
    Plan.from_dict(PLAN_50_INT8).save(plan_path)
    output = tmp_path / "out.safetensors"
    code = main(["compress", str(DEMO_MODEL), "--plan", str(plan_path), "-o", str(output),
                 "--no-measure"])
    assert code == 0
    from_cli = load_file(str(output))
    from_api = apply_plan(demo.module, Plan.load(plan_path)).module.state_dict()
    assert from_cli.keys() == from_api.keys()
    for key in from_api:
        assert torch.equal(from_cli[key], from_api[key]), key
    # The written file is a runnable demo model again (architecture carried in metadata).
    reloaded = load_model(output)
    assert reloaded.module is not None


def test_cli_bad_plan_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    plan_path = tmp_path / "bad.yaml"
    plan_path.write_text("layers:\n  no.such.layer:\n    pruning: {amount: 0.5}\n")
    code = main(["compress", str(DEMO_MODEL), "--plan", str(plan_path), "-o",
                 str(tmp_path / "out.pt"), "--no-measure"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("slimscope: error:") and "no.such.layer" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out.pt").exists()


def test_cli_refuses_to_overwrite_the_input_model(tmp_path: Path, capsys) -> None:
    model_path = tmp_path / "model.safetensors"
    model_path.write_bytes(DEMO_MODEL.read_bytes())
    plan_path = tmp_path / "plan.json"
    Plan.from_dict(PLAN_50_INT8).save(plan_path)
    code = main(["compress", str(model_path), "--plan", str(plan_path), "-o", str(model_path),
                 "--no-measure"])
    assert code == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert model_path.read_bytes() == DEMO_MODEL.read_bytes()


def test_plan_recovery_section_fine_tunes_and_keeps_the_sparsity(demo) -> None:
    plan = Plan.from_dict({
        "defaults": {"pruning": {"method": "magnitude", "amount": 0.9},
                     "quantization": {"bits": 4, "granularity": "per-channel"}},
        "recovery": {"steps": 40, "optimizer": "adam", "lr": 0.002, "eval_every": 20},
    })
    compressed, report = compress(demo, plan, DigitsData("test"),
                                  calibration=DigitsData("calibration"),
                                  train_data=DigitsData("train"))
    assert report.recovery["steps"] == 40
    assert report.metrics_after["accuracy"] > report.metrics_one_shot["accuracy"] + 0.2
    for layer in report.layers:
        if layer.kind in ("Conv2d", "Linear"):
            assert layer.sparsity == pytest.approx(0.9, abs=0.01), layer.name
            assert layer.bits == 4


def test_recovery_without_training_data_is_refused_before_any_work(demo) -> None:
    plan = Plan.from_dict({"defaults": {"pruning": {"amount": 0.5}}, "recovery": {"steps": 5}})
    with pytest.raises(Exception, match="needs training data"):
        compress(demo, plan, DigitsData("test"))


def test_invalid_recovery_section_names_the_field(demo) -> None:
    plan = Plan.from_dict({"defaults": {"pruning": {"amount": 0.5}},
                           "recovery": {"steps": 5, "optimiser": "sgd"}})
    with pytest.raises(Exception, match="optimiser"):
        compress(demo, plan, DigitsData("test"), train_data=DigitsData("train"))


def test_nan_weights_are_refused_by_compression_and_sensitivity(tmp_path: Path) -> None:
    from engine.errors import SlimscopeError
    from engine.sensitivity import sweep
    from factories import write_nan_weights

    model = load_model(write_nan_weights(tmp_path))
    from engine.backends.torch_module import TorchModuleBackend

    model.module = torch.nn.Linear(1, 1)  # a runnable stand-in: the weights are what is checked
    model.backend = TorchModuleBackend(model.module)
    for run in (lambda: compress(model, Plan.from_dict(PLAN_50_INT8)),
                lambda: sweep(model, DigitsData("test"))):
        with pytest.raises(SlimscopeError, match="NaN/Inf weights; .* would spread them"):
            run()

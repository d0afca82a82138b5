"""Bias correction: the mean output error on the calibration set becomes exactly zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.errors import PlanError
from engine.methods.apply import apply_plan
from engine.plan import Plan

QUANT_2BIT = {"quantization": {"bits": 2, "granularity": "per-channel"}}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def batches_of(x: torch.Tensor, size: int = 16) -> list[tuple[torch.Tensor, None]]:
    return [(x[i:i + size], None) for i in range(0, len(x), size)]


def layer_input(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return torch.cat(seen)


def mean_per_channel(y: torch.Tensor) -> torch.Tensor:
    return y.transpose(0, 1).reshape(y.shape[1], -1).double().mean(1)


@pytest.mark.parametrize("sections", [QUANT_2BIT,
                                      {"pruning": {"method": "magnitude", "amount": 0.7}},
                                      {"pruning": {"method": "obs", "amount": 0.6}, **QUANT_2BIT}])
def test_mean_output_error_is_zero_on_the_calibration_set(sections):
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="reflect"),
                          nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    x = torch.randn(48, 3, 8, 8) + 0.5  # a non-zero input mean, as after a ReLU
    plan = Plan.from_dict({"defaults": {**sections, "bias_correction": True}})
    corrected = apply_plan(model, plan, calibration=batches_of(x))
    plain = apply_plan(model, Plan.from_dict({"defaults": sections}), calibration=batches_of(x))
    for name in ("0", "2", "5"):
        layer, original = corrected.module.get_submodule(name), model.get_submodule(name)
        inputs = layer_input(corrected.module, name, x)  # what the layer sees once compressed
        with torch.no_grad():
            got = mean_per_channel(layer(inputs))
            wanted = mean_per_channel(original(inputs))  # the uncompressed layer, same inputs
        assert torch.allclose(got, wanted, atol=1e-5), name
        # the weights are what pruning / quantization made; only the bias moved
        assert torch.equal(layer.weight, plain.module.get_submodule(name).weight)
        assert not torch.equal(layer.bias, plain.module.get_submodule(name).bias)


def test_a_conv_without_bias_is_corrected_through_the_batchnorm_after_it():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(40, 2, 6, 6) + 1.0
    plan = Plan.from_dict({"defaults": {**QUANT_2BIT, "bias_correction": True}})
    out = apply_plan(model, plan, calibration=batches_of(x))
    with torch.no_grad():
        got = mean_per_channel(out.module[1](out.module[0](x)))
        wanted = mean_per_channel(model[1](model[0](x)))
    assert torch.allclose(got, wanted, atol=1e-5)
    assert not torch.equal(out.module[1].running_mean, model[1].running_mean)
    assert torch.equal(out.module[1].weight, model[1].weight)  # the BatchNorm's own parameters stay


def test_nothing_to_correct_is_a_note_and_keep_layers_stay_identical():
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 3))
    plan = Plan.from_dict({"defaults": {**QUANT_2BIT, "bias_correction": True},
                           "layers": {"2": "keep"}})
    out = apply_plan(model, plan, calibration=batches_of(torch.randn(32, 6)))
    assert out.notes == ["0: no bias and no BatchNorm right after it; bias correction skipped"]
    assert torch.equal(out.module[2].bias, model[2].bias)


def test_plan_field_round_trips_resolves_by_priority_and_refuses_non_booleans(tmp_path):
    data = {"version": 1, "defaults": {**QUANT_2BIT, "bias_correction": True},
            "layers": {"b": {"bias_correction": False}, "c": "keep"}}
    plan = Plan.from_dict(data)
    path = tmp_path / "plan.yaml"
    plan.save(path)
    assert Plan.load(path).to_dict() == plan.to_dict()
    resolved = plan.resolve({"a": "Linear", "b": "Linear", "c": "Linear"})
    assert resolved["a"].bias_correction and not resolved["b"].bias_correction
    assert resolved["b"].quantization is not None and resolved["c"].keep
    assert resolved["a"].to_dict()["bias_correction"] is True
    with pytest.raises(PlanError) as caught:
        Plan.from_dict({"defaults": {"bias_correction": "yes"}})
    assert "bias_correction: expected true or false" in str(caught.value)
    assert "\n" not in str(caught.value)
    with pytest.raises(PlanError, match="needs calibration data"):
        apply_plan(nn.Sequential(nn.Linear(3, 3)), plan.__class__.from_dict(
            {"defaults": {**QUANT_2BIT, "bias_correction": True}}))

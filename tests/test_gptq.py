"""GPTQ against a reference written here from the paper's equations, and its plan fields."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.calibration_stats import collect_input_stats
from engine.errors import PlanError
from engine.methods.apply import apply_plan
from engine.methods.gptq import _Grid, gptq_quantize
from engine.methods.quantize import quantize_tensor
from engine.plan import Plan, Quantization


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


def calibration(samples: int = 96, features: int = 12) -> list[tuple[torch.Tensor, None]]:
    # correlated inputs, so compensation has something to do
    mixing = torch.randn(features, features)
    x = torch.randn(samples, features) @ mixing
    return [(x[i:i + 32], None) for i in range(0, samples, 32)]


def reference_gptq(weight: torch.Tensor, x: torch.Tensor, bits: int, damping: float = 0.01,
                   order: torch.Tensor | None = None, group_size: int | None = None
                   ) -> torch.Tensor:
    """The paper's Eq. (2)-(3), literally: quantize column q, update the columns F not yet
    quantized by -(w_q - quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q}, then remove q from H_F⁻¹ by
    Gaussian elimination. No Cholesky, no blocks. Symmetric min-max grid per row (per group,
    fitted on the updated weights when its first column comes up)."""
    w = weight.detach().to(torch.float64).clone()
    rows, cols = w.shape
    x = x.to(torch.float64)
    h = 2 * x.T @ x
    h += damping * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    order = torch.arange(cols) if order is None else order
    hinv = torch.linalg.inv(h)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().max(1).values / qmax
    remaining = list(order.tolist())
    for q in order.tolist():
        if group_size is not None and q % group_size == 0:
            scale = w[:, q:q + group_size].abs().max(1).values / qmax
        quantized = torch.clamp(torch.round(w[:, q] / scale), -qmax, qmax) * scale
        error = (w[:, q] - quantized) / hinv[q, q]
        remaining.remove(q)
        w[:, remaining] -= error[:, None] * hinv[q, remaining][None, :]
        w[:, q] = quantized
        hinv = hinv - hinv[:, [q]] @ hinv[[q], :] / hinv[q, q]
    return w


def test_gptq_on_a_two_layer_mlp_equals_the_papers_equations():
    model, batches = mlp(), calibration()
    plan = Plan.from_dict({"defaults": {"quantization": {"bits": 3, "method": "gptq"}}})
    out = apply_plan(model, plan, calibration=batches)
    x = torch.cat([b[0] for b in batches])
    first = reference_gptq(model[0].weight, x, 3)
    assert torch.allclose(out.module[0].weight.double(), first, atol=1e-6)
    # layer 2 is calibrated on what the quantized layer 1 really feeds it (sequential)
    hidden = torch.relu(x.double() @ first.T + model[0].bias.double())
    second = reference_gptq(model[2].weight, hidden, 3)
    assert torch.allclose(out.module[2].weight.double(), second, atol=1e-6)
    for key, layer in (("0.weight", out.module[0]), ("2.weight", out.module[2])):
        q = out.quantized[key]
        assert q.bits == 3 and int(q.codes.abs().max()) <= 3
        assert torch.equal(q.dequantize(), layer.weight.detach())


@pytest.mark.parametrize("act_order", [False, True])
def test_lazy_blocks_and_act_order_match_the_reference(act_order):
    weight, x = torch.randn(6, 24), calibration(64, 24)
    x = torch.cat([b[0] for b in x]).double()
    h = 2 * x.T @ x
    grid = _Grid(6, 24, 4, True, "minmax", None)
    grid.fit(0, weight.double())
    codes = gptq_quantize(weight, h, grid, act_order=act_order, block_size=5)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    expected = reference_gptq(weight, x, 4, order=order)
    assert torch.allclose(grid.values(codes.T, 0).T, expected, atol=1e-9)


def test_group_scales_are_fitted_on_the_updated_weights_like_the_reference():
    weight, x = torch.randn(4, 16), calibration(64, 16)
    x = torch.cat([b[0] for b in x]).double()
    grid = _Grid(4, 16, 3, True, "minmax", 4)
    codes = gptq_quantize(weight, 2 * x.T @ x, grid, fit_groups=True, block_size=6)
    values = torch.stack([grid.values(codes[:, j], j // 4) for j in range(16)], dim=1)
    assert torch.allclose(values, reference_gptq(weight, x, 3, group_size=4), atol=1e-9)


def output_error(weight: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (weight - new).T) ** 2).sum())


@pytest.mark.parametrize("settings", [
    {"granularity": "per-channel"},
    {"granularity": "group", "group_size": 4, "act_order": True},
    {"granularity": "group", "group_size": 4, "symmetric": False},
    {"granularity": "per-tensor", "range": "mse"},
])
def test_gptq_beats_round_to_nearest_on_the_calibration_outputs(settings):
    model, batches = nn.Sequential(nn.Linear(12, 8)), calibration()
    x = torch.cat([b[0] for b in batches])
    gptq = apply_plan(model, Plan.from_dict({"defaults": {"quantization": {
        "bits": 2, "method": "gptq", **settings}}}), calibration=batches)
    rtn = apply_plan(model, Plan.from_dict({"defaults": {"quantization": {
        "bits": 2, **{k: v for k, v in settings.items() if k != "act_order"}}}}))
    w = model[0].weight.detach()
    ratio = output_error(w, gptq.module[0].weight.detach(), x) / \
        output_error(w, rtn.module[0].weight.detach(), x)
    assert ratio < (0.8 if settings["granularity"] == "per-channel" else 1.0)
    q = gptq.quantized["0.weight"]  # stored like round-to-nearest's, decoding to the weights
    reference = quantize_tensor(w, 2, settings.get("symmetric", True), settings["granularity"],
                                settings.get("group_size"))
    assert q.codes.dtype == reference.codes.dtype and q.scale.shape == reference.scale.shape
    assert torch.equal(q.dequantize(), gptq.module[0].weight.detach())


def test_conv_gptq_uses_the_patches_and_keeps_pruned_weights_zero():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 6, 1))
    batches = [(torch.randn(8, 4, 6, 6), None) for _ in range(2)]
    plan = Plan.from_dict({"defaults": {"pruning": {"method": "magnitude", "amount": 0.5},
                                        "quantization": {"bits": 3, "method": "gptq"}}})
    out = apply_plan(model, plan, calibration=batches)
    for key in ("0.weight", "2.weight"):
        weight = dict(out.module.named_parameters())[key]
        assert int((weight[~out.masks[key]] != 0).sum()) == 0
        assert torch.equal(out.quantized[key].dequantize(), weight.detach())
    stats = collect_input_stats(model, ["0"], batches)["0"]
    assert stats.xtx.shape == (2, 18, 18) and stats.mean.shape == (2, 18)


def test_plan_round_trip_keeps_the_gptq_fields(tmp_path):
    data = {"version": 1, "defaults": {"quantization": {
        "bits": 4, "method": "gptq", "act_order": True, "damping": 0.05,
        "granularity": "group", "group_size": 4}}}
    plan = Plan.from_dict(data)
    path = tmp_path / "plan.yaml"
    plan.save(path)
    again = Plan.load(path)
    assert again.to_dict() == plan.to_dict()
    resolved = again.resolve([("fc", "Linear", (3, 8)), ("bn", "BatchNorm2d", (3,))])
    assert resolved["fc"].quantization == Quantization(4, True, "group", 4, "minmax", "gptq",
                                                       True, 0.05)
    assert resolved["bn"].keep  # a default GPTQ section skips kinds it cannot take
    # round-to-nearest plans keep their old form: no method field written
    assert "method" not in Plan.from_dict({"defaults": {"quantization": {"bits": 8}}}
                                          ).to_dict()["defaults"]["quantization"]


@pytest.mark.parametrize("section, words", [
    ({"bits": 4, "method": "awq2"}, "is not one of rtn, gptq"),
    ({"bits": 4, "act_order": True}, "only for method 'gptq'"),
    ({"bits": 4, "method": "gptq", "damping": 0}, "must be a number in (0, 1]"),
    ({"bits": 4, "method": "gptq", "damping": "lots"}, "must be a number in (0, 1]"),
    ({"bits": 4, "method": "gptq", "act_order": "yes"}, "expected true or false"),
    ({"bits": "fp16", "method": "gptq"}, "cannot go with method 'gptq'"),
])
def test_bad_gptq_fields_are_refused_in_one_line(section, words):
    with pytest.raises(PlanError) as caught:
        Plan.from_dict({"defaults": {"quantization": section}})
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_gptq_refuses_without_calibration_or_on_a_kind_it_cannot_take():
    plan = Plan.from_dict({"defaults": {"quantization": {"bits": 4, "method": "gptq"}}})
    with pytest.raises(PlanError, match="needs calibration data"):
        apply_plan(mlp(), plan)
    explicit = Plan.from_dict({"layers": {"0": {"quantization": {"bits": 4, "method": "gptq"}}}})
    with pytest.raises(PlanError, match="cannot apply to Embedding") as caught:
        explicit.resolve([("0", "Embedding", (10, 4))])
    assert "\n" not in str(caught.value)
    with pytest.raises(PlanError, match="which a TorchScript module does not have"):
        apply_plan(torch.jit.script(mlp()), plan, calibration=calibration())


def test_input_statistics_match_a_direct_computation_in_one_pass_or_several():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 6))
    batches = [(torch.randn(7, 3, 5, 5), None) for _ in range(3)]
    x = torch.cat([b[0] for b in batches]).double()
    one = collect_input_stats(model, ["0", "3"], batches)
    split = collect_input_stats(model, ["0", "3"], batches, budget_bytes=1)  # a pass per layer
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    # per sample, as ONNX's; each piece is multiplied in float32, so float32's precision
    assert torch.allclose(one["0"].xtx[0], patches.T @ patches / 21, rtol=1e-5, atol=1e-5)
    assert torch.allclose(one["0"].mean[0], patches.mean(0))
    assert torch.allclose(one["0"].channel_mean_abs, x.abs().mean((0, 2, 3)))
    with torch.no_grad():
        hidden = model[:3](x.float()).double()
    assert torch.allclose(one["3"].xtx[0], hidden.T @ hidden / 21, rtol=1e-5, atol=1e-5)
    for name in one:
        assert torch.equal(one[name].xtx, split[name].xtx) and one[name].rows == split[name].rows

"""OBS-style pruning: exact sparsity, N:M patterns, compensation that really lowers the error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.calibration_stats import collect_input_stats
from engine.errors import PlanError
from engine.methods.apply import apply_plan
from engine.methods.base import keep_top
from engine.methods.obs import exact_obs_prune, obs_prune
from engine.plan import Plan, Pruning

SOLVERS = [exact_obs_prune, obs_prune]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def correlated(samples: int, features: int) -> torch.Tensor:
    """Like real activations: features of different scales sharing a common component."""
    return torch.randn(samples, features) * torch.rand(features) * 2 + torch.randn(samples, 1)


def output_error(weight: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x.double() @ (weight.double() - new.double()).T) ** 2).sum())


@pytest.mark.parametrize("solver", SOLVERS)
def test_uncorrelated_inputs_make_obs_plain_magnitude_pruning(solver):
    """With H = I nothing couples the weights: the cheapest removals are the smallest |w|
    (any split over rows), and nothing is compensated."""
    weight = torch.randn(3, 5).double()
    pruned, keep = solver(weight, torch.eye(5, dtype=torch.float64) * 2, n_prune=7)
    assert torch.equal(keep, keep_top(weight.abs(), 7 / 15))
    assert torch.allclose(pruned, weight * keep, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("amount", [0.3, 0.5, 0.73])
def test_exactly_the_requested_count_goes_and_the_error_beats_magnitude(solver, amount):
    weight, x = torch.randn(10, 64), correlated(256, 64)
    n = round(amount * weight.numel())
    pruned, keep = solver(weight, 2 * x.double().T @ x.double(), n_prune=n)
    assert int((~keep).sum()) == n and int((pruned == 0).sum()) == n
    assert torch.equal(pruned == 0, ~keep)
    magnitude = weight * keep_top(weight.abs(), amount)
    assert output_error(weight, pruned, x) < 0.8 * output_error(weight, magnitude, x)


@pytest.mark.parametrize("solver", SOLVERS)
def test_nm_pattern_holds_in_every_group(solver):
    weight, x = torch.randn(6, 16), correlated(100, 16)
    pruned, keep = solver(weight, 2 * x.double().T @ x.double(), nm=(2, 4))
    assert torch.equal((pruned != 0).reshape(6, 4, 4).sum(-1), torch.full((6, 4), 2))
    assert torch.equal(keep, pruned != 0)


def conv_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.Flatten(), nn.Linear(12 * 4 * 4, 10))


def conv_batches() -> list[tuple[torch.Tensor, None]]:
    return [(torch.randn(16, 8, 4, 4), None) for _ in range(2)]


@pytest.mark.parametrize("amount", [0.5, 0.7])
def test_plan_obs_leaves_exact_sparsity_masks_and_lower_error_than_magnitude(amount):
    model, batches = conv_model().eval(), conv_batches()
    with torch.no_grad():  # a BatchNorm with varied gains, as after training
        model[1].running_var.uniform_(0.2, 3.0)
        model[1].weight.uniform_(0.5, 2.0)
    plan = Plan.from_dict({"defaults": {"pruning": {"method": "obs", "amount": amount}}})
    out = apply_plan(model, plan, calibration=batches)
    magnitude = apply_plan(model, Plan.from_dict(
        {"defaults": {"pruning": {"method": "magnitude", "amount": amount}}}))
    for key in ("0.weight", "4.weight"):
        weight = dict(out.module.named_parameters())[key]
        assert int((weight == 0).sum()) == round(amount * weight.numel())
        assert torch.equal(out.masks[key], weight != 0)
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        reference = model(x)
        assert float((out.module(x) - reference).pow(2).mean()) < \
            float((magnitude.module(x) - reference).pow(2).mean())


def test_plan_obs_nm_on_a_conv_uses_nm_sparsitys_layout():
    model, batches = conv_model(), conv_batches()
    plan = Plan.from_dict({"layers": {"0": {"pruning": {"method": "obs", "pattern": "2:4"}}}})
    out = apply_plan(model, plan, calibration=batches)
    weight = out.module[0].weight
    groups = weight.movedim(1, -1).reshape(-1, 4)  # as engine.compress checks N:M
    assert int(torch.count_nonzero(groups, dim=1).max()) <= 2
    assert int((weight == 0).sum()) == weight.numel() // 2
    stats = collect_input_stats(model, ["0"], batches)["0"]
    assert stats.xtx.shape == (1, 72, 72)


def test_plan_round_trip_and_one_line_refusals(tmp_path):
    data = {"version": 1,
            "defaults": {"pruning": {"method": "obs", "amount": 0.6}},
            "layers": {"fc": {"pruning": {"method": "obs", "pattern": "2:4"}}}}
    plan = Plan.from_dict(data)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path).to_dict() == plan.to_dict() == data
    resolved = plan.resolve([("fc", "Linear", (4, 8)), ("conv", "Conv2d", (4, 2, 3, 3)),
                             ("emb", "Embedding", (10, 4))])
    assert resolved["fc"].pruning == Pruning("obs", pattern="2:4")
    assert resolved["conv"].pruning == Pruning("obs", amount=0.6)
    assert resolved["emb"].keep  # defaults skip kinds OBS cannot take
    for bad, words in (
            ({"method": "obs", "amount": 0.5, "pattern": "2:4"}, "not both"),
            ({"method": "obs"}, "amount: required"),
            ({"method": "obs", "amount": 1.5}, "must be a number in [0, 1)"),
            ({"method": "obs", "pattern": "5:4"}, "needs 1 <= N <= M"),
    ):
        with pytest.raises(PlanError) as caught:
            Plan.from_dict({"layers": {"fc": {"pruning": bad}}}).resolve(
                [("fc", "Linear", (4, 8))])
        assert words in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(PlanError, match="cannot apply to Embedding"):
        Plan.from_dict({"layers": {"emb": {"pruning": {"method": "obs", "amount": 0.5}}}}
                       ).resolve([("emb", "Embedding", (10, 4))])


def test_a_layer_the_calibration_never_reaches_is_refused_in_one_line():
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    plan = Plan.from_dict({"defaults": {"pruning": {"method": "obs", "amount": 0.5}}})
    with pytest.raises(PlanError, match="never reached it") as caught:
        apply_plan(Skips(), plan, calibration=[(torch.randn(4, 4), None)])
    assert "\n" not in str(caught.value)

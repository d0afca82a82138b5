"""Compression methods on small torch models built here; every check is on numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.errors import PlanError
from engine.methods import REGISTRY
from engine.methods.apply import apply_plan
from engine.methods.lowrank import rank_for_energy
from engine.methods.quantize import quantize_tensor
from engine.plan import PRUNING_METHODS, Plan


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12))


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def test_every_plan_pruning_method_is_registered():
    assert set(PRUNING_METHODS) <= set(REGISTRY)


# -- unstructured pruning ------------------------------------------------------------------
def test_magnitude_per_layer_exact_sparsity_and_smallest_go():
    model = mlp()
    plan = Plan.from_dict({
        "defaults": {"pruning": {"method": "magnitude", "amount": 0.3}},
        "layers": {"2": {"pruning": {"method": "magnitude", "amount": 0.5}}},
    })
    out = apply_plan(model, plan)
    w0, w2 = out.module[0].weight, out.module[2].weight
    assert zeros(w0) == round(0.3 * 512) == 154
    assert zeros(w2) == round(0.5 * 384) == 192
    for key, w, orig in (("0.weight", w0, model[0].weight), ("2.weight", w2, model[2].weight)):
        mask = out.masks[key]
        assert torch.equal(mask, w != 0)
        assert orig[~mask].abs().max() <= orig[mask].abs().min()
    assert zeros(out.module[0].bias) == 0  # biases are not pruned


def test_global_magnitude_one_threshold_across_layers():
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(0.1)  # a layer of small weights loses more under one threshold
    plan = Plan.from_dict({"defaults": {"pruning": {"method": "magnitude-global", "amount": 0.5}}})
    out = apply_plan(model, plan)
    originals = [model[0].weight, model[2].weight]
    masks = [out.masks["0.weight"], out.masks["2.weight"]]
    assert sum(int((~m).sum()) for m in masks) == round(0.5 * (512 + 384)) == 448
    pruned = torch.cat([w[~m].abs() for w, m in zip(originals, masks)])
    kept = torch.cat([w[m].abs() for w, m in zip(originals, masks)])
    assert pruned.max() <= kept.min()
    assert (~masks[1]).float().mean() > 0.9 > (~masks[0]).float().mean()


def test_nm_2_of_4_along_input_for_linear_and_conv():
    model = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(16, 8))
    plan = Plan.from_dict({"defaults": {"pruning": {"method": "nm", "pattern": "2:4"}}})
    out = apply_plan(model, plan)
    linear = out.module[2].weight.reshape(8, 4, 4)  # (out, groups, 4 consecutive inputs)
    conv = out.module[0].weight.permute(0, 2, 3, 1).reshape(-1, 2, 4)  # input channels last
    for groups in (linear, conv):
        assert torch.all((groups == 0).sum(-1) >= 2)
        assert torch.all((groups != 0).sum(-1) == 2)  # random weights: exactly 2 survive
    # the survivors of each group are its two largest magnitudes
    orig = model[2].weight.reshape(8, 4, 4).abs()
    kept = out.module[2].weight.reshape(8, 4, 4) != 0
    assert torch.all(orig.masked_fill(~kept, -1).amax(-1) >= orig.masked_fill(kept, -1).amax(-1))


def zero_input_model_and_data():
    """Inputs 0 and 1 are always zero, so their weights have exactly zero gradient."""
    model = nn.Sequential(nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight[:, :2] = 10.0  # the largest weights: magnitude pruning would keep them
    x = torch.randn(64, 6)
    x[:, :2] = 0
    labels = torch.randint(0, 3, (64,))
    batches = [(x[:32], labels[:32]), (x[32:], labels[32:])]
    return model, batches


@pytest.mark.parametrize("method", ["gradient", "taylor"])
@pytest.mark.parametrize("labelled", [True, False])
def test_gradient_pruning_prunes_zero_gradient_weights_first(method, labelled):
    model, batches = zero_input_model_and_data()
    if not labelled:
        batches = [(x, None) for x, _ in batches]
    plan = Plan.from_dict({"defaults": {"pruning": {"method": method, "amount": 6 / 18}}})
    out = apply_plan(model, plan, calibration=batches)
    mask = out.masks["0.weight"]
    assert not mask[:, :2].any() and mask[:, 2:].all()
    assert torch.equal(out.module[0].weight[:, 2:], model[0].weight[:, 2:])
    assert all(p.grad is None for p in out.module.parameters())
    magnitude = apply_plan(model, Plan.from_dict({"defaults": {"pruning": {"method": "magnitude", "amount": 6 / 18}}}))
    assert magnitude.masks["0.weight"][:, :2].all()  # the gradient made the difference


def test_gradient_pruning_without_data_is_a_plan_error():
    model, _ = zero_input_model_and_data()
    with pytest.raises(PlanError, match="layer '0'.*calibration"):
        apply_plan(model, Plan.from_dict({"defaults": {"pruning": {"method": "gradient", "amount": 0.5}}}))


# -- structured pruning --------------------------------------------------------------------
class ResidualConcatNet(nn.Module):
    """conv-bn-relu-conv-bn + residual add, then a concat of two branches, pool and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.branch_a = nn.Conv2d(16, 8, 1)
        self.branch_b = nn.Conv2d(16, 8, 3, padding=1)
        self.mix = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = torch.relu(x + y)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = torch.relu(self.mix(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_structured_removes_channels_and_fixes_dependents():
    model = ResidualConcatNet().eval()
    x = torch.randn(2, 3, 8, 8)
    plan = Plan.from_dict({"layers": {
        "stem.0": {"pruning": {"method": "structured", "amount": 0.25}},
        "conv1": {"pruning": {"method": "structured", "amount": 0.5}},
        "branch_a": {"pruning": {"method": "structured", "amount": 0.5}},
        "conv2": {"pruning": {"method": "structured", "amount": 0.5}},  # coupled to stem by the add
        "fc": {"pruning": {"method": "structured", "amount": 0.5}},  # its channels are the outputs
    }})
    with torch.no_grad():  # as a GUI worker might call it
        out = apply_plan(model, plan, example_inputs=x)
    net = out.module
    assert net(x).shape == (2, 10)
    assert out.channels == {"stem.0": (16, 12), "conv2": (16, 12), "conv1": (16, 8), "branch_a": (8, 4)}
    assert net.bn1.num_features == 8 and net.conv2.in_channels == 8
    assert net.bn2.num_features == 12 and net.branch_b.in_channels == 12
    assert net.mix.in_channels == 4 + 8  # the concat shrank with branch_a
    assert net.fc.out_features == 10
    assert params(net) < params(model)
    assert any(note.startswith("conv2:") for note in out.notes)
    assert any(note.startswith("fc:") for note in out.notes)
    assert model.conv1.out_channels == 16 and model.training is False


def test_structured_keeps_the_highest_norm_channels():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1, 7, dtype=torch.float32)[:, None].repeat(1, 4))
        model[0].bias.zero_()
        model[2].weight.fill_(1.0)
    plan = Plan.from_dict({"layers": {"0": {"pruning": {"method": "structured", "amount": 0.5}}}})
    out = apply_plan(model, plan, example_inputs=torch.randn(1, 4))
    assert out.module[0].weight[:, 0].tolist() == [4.0, 5.0, 6.0]
    assert out.module[2].weight.shape == (2, 3)


# -- quantization --------------------------------------------------------------------------
def test_int8_per_channel_error_is_within_half_a_step():
    w = torch.randn(16, 8, 3, 3)
    q = quantize_tensor(w, bits=8, symmetric=True, granularity="per-channel")
    assert q.codes.dtype == torch.int8 and q.scale.shape == (16,)
    assert int(q.codes.abs().max()) <= 127
    deq = (q.codes.float() - q.zero_point.float().reshape(-1, 1, 1, 1)) * q.scale.reshape(-1, 1, 1, 1)
    assert torch.equal(deq, q.dequantize())
    assert torch.all((w - deq).abs() <= q.scale.reshape(-1, 1, 1, 1) / 2 + 1e-6)
    assert torch.allclose(q.scale, w.reshape(16, -1).abs().amax(1) / 127)


def test_module_weight_is_the_dequantized_codes():
    model = mlp()
    plan = Plan.from_dict({"defaults": {"quantization": {"bits": 8}}})
    out = apply_plan(model, plan)
    assert torch.equal(out.module[0].weight, out.quantized["0.weight"].dequantize())
    assert not torch.equal(out.module[0].weight, model[0].weight)
    assert torch.equal(out.module[0].bias, model[0].bias)


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_wise_shapes_and_error(symmetric):
    for w, group, n_groups in ((torch.randn(8, 64), 16, 4), (torch.randn(8, 4, 3, 3), 12, 3)):
        q = quantize_tensor(w, bits=4, symmetric=symmetric, granularity="group", group_size=group)
        assert q.codes.shape == w.shape
        assert q.scale.shape == q.zero_point.shape == (8, n_groups)
        assert q.group_size == group and q.axis is None
        step = q.scale.reshape(8, n_groups, 1)
        err = (w.reshape(8, n_groups, group) - q.dequantize().reshape(8, n_groups, group)).abs()
        assert torch.all(err <= step / 2 + 1e-6)
        lo, hi = (-7, 7) if symmetric else (0, 15)
        assert lo <= int(q.codes.min()) and int(q.codes.max()) <= hi


def test_mse_range_beats_minmax_on_heavy_tails():
    w = torch.distributions.StudentT(df=3.0).sample((64, 64))  # max ≈ 30 standard deviations
    errors = {}
    for method in ("minmax", "mse"):
        q = quantize_tensor(w, bits=4, granularity="per-tensor", range_method=method)
        errors[method] = float((w - q.dequantize()).pow(2).mean())
    assert errors["mse"] < 0.5 * errors["minmax"]


@pytest.mark.parametrize(("symmetric", "codes"), [(True, {-1, 0, 1}), (False, {0, 1, 2, 3})])
def test_two_bit(symmetric, codes):
    w = torch.randn(32, 16)
    q = quantize_tensor(w, bits=2, symmetric=symmetric, granularity="per-channel")
    assert set(q.codes.unique().tolist()) <= codes
    # min-max range clips nothing, so every element is within half a step
    assert torch.all((w - q.dequantize()).abs() <= q.scale[:, None] / 2 + 1e-6)
    assert float((w - q.dequantize()).pow(2).mean()) < float(w.pow(2).mean())


def test_asymmetric_quantization_keeps_pruned_zeros_exactly():
    model = nn.Sequential(nn.Linear(64, 16))
    with torch.no_grad():
        model[0].weight.add_(0.8)  # all-positive-ish: asymmetric range sits off-centre
    plan = Plan.from_dict({"defaults": {
        "pruning": {"method": "magnitude", "amount": 0.4},
        "quantization": {"bits": 3, "symmetric": False, "granularity": "group", "group_size": 16},
    }})
    out = apply_plan(model, plan)
    mask, q = out.masks["0.weight"], out.quantized["0.weight"]
    w = out.module[0].weight
    assert int((~mask).sum()) == round(0.4 * 1024)
    assert torch.all(w[~mask] == 0)
    zero_codes = q.zero_point.reshape(16, 4, 1).expand(16, 4, 16).reshape(16, 64)
    assert torch.equal(q.codes[~mask], zero_codes[~mask])


@pytest.mark.parametrize(("fmt", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_float_cast_rounds_through_dtype(fmt, dtype):
    model = mlp()
    out = apply_plan(model, Plan.from_dict({"layers": {"2": {"quantization": {"bits": fmt}}}}))
    assert out.cast == {"2.weight": dtype, "2.bias": dtype}
    assert torch.equal(out.module[2].weight, model[2].weight.to(dtype).float())
    assert not torch.equal(out.module[2].weight, model[2].weight)
    assert torch.equal(out.module[0].weight, model[0].weight)


# -- low rank ------------------------------------------------------------------------------
def test_svd_rank_r_linear_error_and_output():
    model = nn.Sequential(nn.Linear(40, 30))
    out = apply_plan(model, Plan.from_dict({"layers": {"0": {"low_rank": {"rank": 5}}}}))
    pair = out.module[0]
    assert [tuple(p.weight.shape) for p in pair] == [(5, 40), (30, 5)]
    assert out.low_rank == {"0": 5}
    w = model[0].weight.detach().double()
    s = torch.linalg.svdvals(w)
    w_r = (pair[1].weight @ pair[0].weight).double()
    w_r = w_r.detach()
    assert abs(float(torch.linalg.matrix_norm(w - w_r)) - float(s[5:].pow(2).sum().sqrt())) < 1e-4
    x = torch.randn(7, 40)
    assert torch.allclose(out.module(x), x @ w_r.float().T + model[0].bias, atol=1e-5)
    assert params(out.module) == 5 * 40 + 30 * 5 + 30 < params(model)


def test_svd_conv_becomes_kxk_then_1x1():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1))
    out = apply_plan(model, Plan.from_dict({"layers": {"0": {"low_rank": {"rank": 4}}}}))
    first, second = out.module[0]
    assert first.weight.shape == (4, 8, 3, 3) and first.stride == (2, 2) and second.kernel_size == (1, 1)
    w = model[0].weight.detach().reshape(16, -1).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    w_r = (u[:, :4] * s[:4]) @ vh[:4]
    x = torch.randn(2, 8, 9, 9)
    expected = nn.functional.conv2d(x, w_r.float().reshape(16, 8, 3, 3), model[0].bias, stride=2, padding=1)
    assert torch.allclose(out.module(x), expected, atol=1e-5)


def test_energy_fraction_selects_the_rank():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    assert [rank_for_energy(s, e) for e in (0.5, 0.727, 0.73, 0.9, 0.95, 1.0)] == [1, 1, 2, 2, 3, 4]
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(48, 48))
    singular = torch.tensor([10.0, 5.0, 2.0] + [0.1] * 45)
    model = nn.Sequential(nn.Linear(48, 64, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(u[:, :48] * singular @ v.T)
    out = apply_plan(model, Plan.from_dict({"layers": {"0": {"low_rank": {"energy": 0.99}}}}))
    assert out.low_rank == {"0": 3}  # 129 of 129.45 = 99.65 %; two values keep only 96.6 %
    # with 16-wide quantization groups the rank rounds up so the second factor's input splits
    grouped = {"low_rank": {"energy": 0.99}, "quantization": {"bits": 4, "granularity": "group", "group_size": 16}}
    out = apply_plan(model, Plan.from_dict({"layers": {"0": grouped}}))
    assert out.low_rank == {"0": 16} and out.quantized["0.1.weight"].scale.shape == (64, 1)


def test_rank_that_would_not_shrink_the_layer_is_left_alone_with_a_note():
    model = nn.Sequential(nn.Linear(10, 8))
    out = apply_plan(model, Plan.from_dict({"layers": {"0": {"low_rank": {"rank": 8}}}}))
    assert isinstance(out.module[0], nn.Linear) and out.low_rank == {}
    assert out.notes and out.notes[0].startswith("0:")


# -- orchestration -------------------------------------------------------------------------
def test_all_stages_together_leave_the_original_untouched():
    model = ResidualConcatNet().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    plan = Plan.from_dict({
        "defaults": {"quantization": {"bits": 8}},
        "layers": {
            "conv1": {"pruning": {"method": "structured", "amount": 0.5}},
            "mix": {"pruning": {"method": "nm", "pattern": "2:4"}, "low_rank": {"rank": 4}},
            "branch_b": {"pruning": {"method": "taylor", "amount": 0.5}},
            "fc": {"quantization": {"bits": "fp16"}},
        },
        "activation_quant": {"calibration": "entropy"},
    })
    out = apply_plan(model, plan, calibration=[(x, None)])
    assert out.module(x).shape == (2, 10)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert isinstance(model.mix, nn.Conv2d)
    # low-rank split "mix", then 2:4 and int8 applied to both factors
    assert out.low_rank == {"mix": 4}
    assert {"mix.0.weight", "mix.1.weight", "branch_b.weight"} <= set(out.masks)
    assert {"mix.0.weight", "mix.1.weight", "conv1.weight"} <= set(out.quantized)
    assert torch.all(out.module.mix[0].weight[~out.masks["mix.0.weight"]] == 0)
    assert out.channels["conv1"] == (16, 8)
    assert out.quantized["conv1.weight"].codes.shape == (8, 16, 3, 3)
    assert out.cast == {"fc.weight": torch.float16, "fc.bias": torch.float16}
    assert out.activation_quant == {"calibration": "entropy"} and out.plan == plan.to_dict()

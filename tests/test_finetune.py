"""Recovery fine-tuning on a small real model and real data (scikit-learn digits).

The teacher is a 64-32-10 MLP trained here in about a second; students come from the real
compression pipeline (engine.methods.apply), so masks and codes look exactly as the app makes
them.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from engine.compressed import CompressedModel
from engine.errors import PlanError
from engine.finetune import (
    DEFAULT_STEPS,
    GradualPruning,
    RecoveryConfig,
    StepReport,
    magnitude_mask,
    recover,
    soft_threshold_,
)
from engine.jobs import CancelToken
from engine.methods.apply import apply_plan
from engine.plan import Plan
from engine.schedules import cosine_lr

WEIGHTS = ["0.weight", "2.weight"]


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    data = load_digits()
    inputs = (data.data / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    return {"x_train": inputs[:1200], "y_train": labels[:1200],
            "x_test": inputs[1200:], "y_test": labels[1200:]}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def teacher(digits) -> nn.Module:
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, labels = torch.from_numpy(digits["x_train"]), torch.from_numpy(digits["y_train"])
    for _ in range(10):
        for index in torch.randperm(len(inputs)).split(64):
            loss = F.cross_entropy(model(inputs[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert accuracy(model, digits) > 0.9
    return model.eval()


def accuracy(model: nn.Module, digits) -> float:
    with torch.no_grad():
        predictions = model(torch.from_numpy(digits["x_test"])).argmax(1).numpy()
    return float(np.mean(predictions == digits["y_test"]))


def compress(model: nn.Module, **defaults) -> CompressedModel:
    return apply_plan(model, Plan.from_dict({"version": 1, "defaults": defaults}))


def params(compressed: CompressedModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in compressed.module.named_parameters()}


def train_data(digits, labelled: bool = True):
    return digits["x_train"], digits["y_train"] if labelled else None


# --- keeping the compression ----------------------------------------------------------------


def test_pruned_weights_stay_exactly_zero_under_a_big_learning_rate(teacher, digits):
    student = compress(teacher, pruning={"method": "magnitude", "amount": 0.8})
    masks_before = {name: mask.clone() for name, mask in student.masks.items()}
    before = params(student)
    config = RecoveryConfig(steps=25, optimizer="sgd", lr=1.0, momentum=0.9,
                            schedule={"name": "constant"}, eval_every=0)

    zeros_each_step = []

    def check_zeros(report: StepReport) -> None:
        zeros_each_step.append(all(bool((student.module.get_parameter(n)[~masks_before[n]] == 0)
                                        .all()) for n in WEIGHTS))

    recover(student, teacher, train_data(digits), config, on_step=check_zeros)

    assert zeros_each_step == [True] * 25
    after = params(student)
    for name in WEIGHTS:
        mask = masks_before[name]
        assert torch.equal(student.masks[name], mask)
        assert int((after[name] == 0).sum()) >= int((~mask).sum()) == round(0.8 * mask.numel())
        assert not torch.equal(after[name][mask], before[name][mask])  # the rest did train


def test_proximal_step_gives_hand_computed_exact_zeros():
    # Student == teacher without labels: the distillation gradient is exactly zero, so after
    # one SGD step only the proximal step w <- sign(w)·max(|w| - lr·λ, 0) changes the weight.
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.05], [0.1, -0.3]]))
    teacher = copy.deepcopy(layer)
    config = RecoveryConfig(steps=1, optimizer="sgd", lr=0.1, momentum=0.0, l1=1.0,
                            schedule={"name": "constant"}, eval_every=0)
    inputs = np.array([[1.0, 2.0], [-1.0, 0.5]], dtype=np.float32)

    result = recover(CompressedModel(module=layer), teacher, (inputs, None), config)

    weight = layer.weight.detach()
    assert torch.equal(weight == 0, torch.tensor([[False, True], [True, False]]))
    assert weight[0, 0].item() == pytest.approx(0.4, abs=1e-7)
    assert weight[1, 1].item() == pytest.approx(-0.2, abs=1e-7)
    assert result.history[0].sparsity == 0.5


def test_soft_threshold_in_place():
    weight = torch.tensor([0.5, -0.05, 0.1, -0.3, 0.02, -0.1])
    soft_threshold_(weight, 0.1)
    assert weight.tolist() == pytest.approx([0.4, 0.0, 0.0, -0.2, 0.0, 0.0])
    assert int((weight == 0).sum()) == 4


def test_magnitude_mask_is_exact_and_never_unprunes():
    weight = torch.tensor([[0.3, -0.1, 0.2, 0.05], [0.4, 0.0, -0.7, 0.6]])
    mask = magnitude_mask(weight, 0.5)
    assert mask.tolist() == [[True, False, False, False], [True, False, True, True]]
    previous = torch.ones_like(mask)
    previous[0, 0] = False  # a large weight pruned earlier stays pruned and counts: 2 of 8 go
    mask = magnitude_mask(weight, 0.25, previous)
    assert mask.tolist() == [[False, True, True, True], [True, False, True, True]]
    assert int((~magnitude_mask(weight, 0.0, previous)).sum()) == 1  # the count never shrinks


@pytest.mark.parametrize(
    ("quantization", "low", "high"),
    [
        ({"bits": 4, "symmetric": True, "granularity": "per-channel"}, -7, 7),
        ({"bits": 3, "symmetric": False, "granularity": "group", "group_size": 16}, 0, 7),
    ],
)
def test_fake_quantized_training_stores_matching_codes(teacher, digits, quantization, low, high):
    student = compress(teacher, pruning={"method": "magnitude", "amount": 0.5},
                       quantization=quantization)
    codes_before = {name: q.codes.clone() for name, q in student.quantized.items()}
    config = RecoveryConfig(steps=30, lr=5e-3, eval_every=0)

    recover(student, teacher, train_data(digits), config)

    assert sorted(student.quantized) == WEIGHTS
    for name, q in student.quantized.items():
        weight = student.module.get_parameter(name).detach()
        assert torch.equal(weight, q.dequantize())
        assert low <= int(q.codes.min()) and int(q.codes.max()) <= high
        assert q.codes.dtype == codes_before[name].dtype
        assert not torch.equal(q.codes, codes_before[name])  # training moved weights across steps
        assert bool((weight[~student.masks[name]] == 0).all())
        # at most 2^bits distinct values per scale unit: the weight really sits on the grid
        units = weight.reshape(-1, quantization.get("group_size", weight[0].numel()))
        assert max(len(unit.unique()) for unit in units) <= 2 ** quantization["bits"]


def test_fp16_cast_weights_stay_representable(teacher, digits):
    student = compress(teacher, quantization={"bits": "fp16"})
    assert student.cast
    recover(student, teacher, train_data(digits), RecoveryConfig(steps=10, lr=1e-3, eval_every=0))
    for name, dtype in student.cast.items():
        weight = student.module.get_parameter(name).detach()
        assert torch.equal(weight, weight.to(dtype).to(torch.float32))


def test_gradual_pruning_follows_the_cubic_schedule(teacher, digits):
    student = compress(teacher, quantization=None)  # nothing compressed yet
    gradual = GradualPruning(initial_sparsity=0.2, final_sparsity=0.8, start_step=2,
                             end_step=12, frequency=5)
    config = RecoveryConfig(steps=15, lr=1e-3, gradual=gradual, eval_every=0)
    zeros: dict[int, dict[str, int]] = {}

    def count(report: StepReport) -> None:
        zeros[report.step] = {n: int((student.module.get_parameter(n) == 0).sum()) for n in WEIGHTS}

    result = recover(student, teacher, train_data(digits), config, on_step=count)

    # s_t = 0.8 + (0.2 - 0.8)(1 - (t - 2)/10)^3, recomputed at steps 2, 7 and 12
    assert gradual.sparsity_at(2) == pytest.approx(0.2)
    assert gradual.sparsity_at(7) == pytest.approx(0.725)
    assert gradual.sparsity_at(12) == pytest.approx(0.8)
    sizes = {"0.weight": 64 * 32, "2.weight": 32 * 10}
    expected = {name: {1: 0, 2: round(0.2 * n), 6: round(0.2 * n), 7: round(0.725 * n),
                       11: round(0.725 * n), 12: round(0.8 * n), 15: round(0.8 * n)}
                for name, n in sizes.items()}
    for name in WEIGHTS:
        assert {step: zeros[step][name] for step in expected[name]} == expected[name]
        assert int((~student.masks[name]).sum()) == round(0.8 * sizes[name])
    assert result.history[-1].sparsity == pytest.approx((1638 + 256) / (2048 + 320))


def test_gradual_end_beyond_the_run_is_refused(teacher, digits):
    config = RecoveryConfig(steps=10, gradual=GradualPruning(final_sparsity=0.5, end_step=20))
    with pytest.raises(PlanError, match="gradual.end_step"):
        recover(compress(teacher, quantization=None), teacher, train_data(digits), config)


# --- the run: schedule, checkpoints, cancel, seeds, distillation ------------------------------


def test_steps_follow_the_schedule(teacher, digits):
    config = RecoveryConfig(epochs=0.5, batch_size=100, lr=0.01, eval_every=0,
                            schedule={"name": "cosine", "warmup_steps": 2, "min_lr": 0.001})
    result = recover(compress(teacher, quantization=None), teacher, train_data(digits), config)
    assert result.total_steps == result.steps == 6  # half of 1200 // 100 batches
    assert [report.lr for report in result.history] == [
        cosine_lr(step, 0.01, 6, 2, 0.001) for step in range(6)]
    assert [report.step for report in result.history] == [1, 2, 3, 4, 5, 6]


def test_cancel_stops_within_a_step_and_restores_the_best_checkpoint(teacher, digits):
    student = compress(teacher, pruning={"method": "magnitude", "amount": 0.9})
    token = CancelToken()
    evaluated: list[tuple[float, dict[str, torch.Tensor]]] = []

    def eval_fn(module: nn.Module) -> float:
        score = accuracy(module, digits)
        evaluated.append((score, {n: p.detach().clone() for n, p in module.named_parameters()}))
        return score

    def stop_at_three(report: StepReport) -> None:
        if report.step == 3:
            token.cancel()

    config = RecoveryConfig(steps=50, lr=0.05, eval_every=2)
    result = recover(student, teacher, train_data(digits), config, eval_fn=eval_fn,
                     cancel=token, on_step=stop_at_three)

    assert result.cancelled
    assert result.steps == 3 and len(result.history) == 3
    assert len(evaluated) == 2  # before training and after step 2
    best = 0 if evaluated[0][0] > evaluated[1][0] else 1
    assert result.kept_step == 2 * best
    assert result.kept_metric == evaluated[best][0]
    for name, value in evaluated[best][1].items():
        assert torch.equal(student.module.get_parameter(name).detach(), value), name
    assert evaluated[1][0] > evaluated[0][0]  # distillation helped already, so step 2 was kept


def test_best_checkpoint_is_kept_at_the_end(teacher, digits):
    student = compress(teacher, pruning={"method": "magnitude", "amount": 0.9})
    one_shot = accuracy(student.module, digits)
    scores = []

    def eval_fn(module: nn.Module) -> float:
        scores.append(accuracy(module, digits))
        return scores[-1]

    result = recover(student, teacher, train_data(digits),
                     RecoveryConfig(steps=40, lr=5e-3, eval_every=10), eval_fn=eval_fn)

    assert result.initial_metric == pytest.approx(one_shot)
    assert len(scores) == 5  # steps 0, 10, 20, 30, 40
    assert result.kept_metric == max(scores)
    assert accuracy(student.module, digits) == pytest.approx(max(scores))
    assert max(scores) > one_shot
    assert [r.metric is not None for r in result.history].count(True) == 4


def test_same_seed_same_weights(teacher, digits):
    config = RecoveryConfig(steps=20, lr=5e-3, eval_every=0, seed=3)
    runs = []
    for seed in (3, 3, 4):
        student = compress(teacher, pruning={"method": "magnitude", "amount": 0.5},
                           quantization={"bits": 4})
        recover(student, teacher, train_data(digits), RecoveryConfig.from_dict(
            {**config.to_dict(), "seed": seed}))
        runs.append(params(student))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
    assert any(not torch.equal(runs[0][name], runs[2][name]) for name in runs[0])


def test_distillation_without_labels_approaches_the_teacher(teacher, digits):
    student = compress(teacher, pruning={"method": "magnitude", "amount": 0.7})
    test_inputs = torch.from_numpy(digits["x_test"])

    def kl_to_teacher() -> float:
        with torch.no_grad():
            return F.kl_div(F.log_softmax(student.module(test_inputs), 1),
                            F.log_softmax(teacher(test_inputs), 1),
                            reduction="batchmean", log_target=True).item()

    before = kl_to_teacher()
    result = recover(student, teacher, train_data(digits, labelled=False),
                     RecoveryConfig(steps=60, lr=5e-3, eval_every=0))
    after = kl_to_teacher()

    assert before > 0.05
    assert after < 0.5 * before
    assert result.history[-1].loss < result.history[0].loss


def test_teacher_and_global_torch_state_are_left_as_they_were(teacher, digits):
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    rng_before = torch.get_rng_state()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    recover(compress(teacher, quantization=None), teacher, train_data(digits),
            RecoveryConfig(steps=3, eval_every=0, seed=123))
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    assert not teacher.training
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before


# --- configuration ----------------------------------------------------------------------------


def test_config_round_trips_through_plain_data():
    config = RecoveryConfig(epochs=2, optimizer="sgd", nesterov=True, l1=1e-4,
                            schedule={"name": "step", "step_size": 50},
                            gradual=GradualPruning(final_sparsity=0.9, end_step=100))
    data = config.to_dict()
    assert data["gradual"] == {"final_sparsity": 0.9, "end_step": 100, "initial_sparsity": 0.0,
                               "start_step": 0, "frequency": 10}
    assert data["schedule"] == {"name": "step", "gamma": 0.5, "step_size": 50}
    assert RecoveryConfig.from_dict(data) == config
    assert RecoveryConfig.from_dict({"epochs": 2}).steps is None
    assert RecoveryConfig().steps == DEFAULT_STEPS == 500


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stepz": 10}, "recovery: unknown field 'stepz'"),
        ({"steps": 10, "epochs": 1}, "give steps or epochs, not both"),
        ({"steps": 0}, "recovery.steps must be an integer >= 1"),
        ({"epochs": -1}, "recovery.epochs must be a number > 0"),
        ({"lr": 0}, "recovery.lr must be a number > 0"),
        ({"optimizer": "rmsprop"}, "recovery.optimizer must be sgd or adam or adamw"),
        ({"momentum": 1.0}, "recovery.momentum must be a number in [0, 1)"),
        ({"nesterov": True}, "recovery.nesterov needs optimizer 'sgd'"),
        ({"alpha": 1.5}, "recovery.alpha must be a number in [0, 1]"),
        ({"temperature": 0}, "recovery.temperature must be a number > 0"),
        ({"l1": -0.1}, "recovery.l1 must be a number >= 0"),
        ({"batch_size": "64"}, "recovery.batch_size must be an integer >= 1"),
        ({"eval_every": -1}, "recovery.eval_every must be an integer >= 0"),
        ({"params": "0.weight"}, "recovery.params must be a list of parameter names"),
        ({"schedule": {"name": "warm"}}, "recovery.schedule.name must be one of"),
        ({"schedule": {"name": "plateau"}, "eval_every": 0}, "eval_every must be > 0"),
        ({"gradual": {"end_step": 10}}, "recovery.gradual.final_sparsity is required"),
        ({"gradual": {"final_sparsity": 1.0, "end_step": 10}},
         "recovery.gradual.final_sparsity must be a number in [0, 1)"),
        ({"gradual": {"final_sparsity": 0.5, "end_step": 5, "start_step": 5}},
         "recovery.gradual.end_step (5) must be after start_step (5)"),
        ({"gradual": {"final_sparsity": 0.5, "initial_sparsity": 0.6, "end_step": 5}},
         "initial_sparsity (0.6) must not exceed final_sparsity"),
        ({"gradual": {"final_sparsity": 0.5, "end_step": 5, "every": 2}},
         "recovery.gradual: unknown field 'every'"),
        ("fast", "recovery must be a mapping"),
    ],
)
def test_bad_configs_name_the_field(data, message):
    with pytest.raises(PlanError) as error:
        RecoveryConfig.from_dict(data)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_target_parameter_is_refused(teacher, digits):
    with pytest.raises(PlanError, match="'9.weight'"):
        recover(compress(teacher, quantization=None), teacher, train_data(digits),
                RecoveryConfig(steps=1, l1=0.1, params=["9.weight"]))

"""Learning-rate schedules: the documented formulas at hand-computed steps, and spec checking."""

from __future__ import annotations

import math

import pytest

from engine.errors import PlanError
from engine.schedules import (
    ReduceOnPlateau,
    build_schedule,
    check_spec,
    constant_lr,
    cosine_lr,
    exponential_lr,
    step_lr,
)


@pytest.mark.parametrize(
    ("spec", "steps_per_epoch", "expected"),
    [
        ({"name": "constant"}, None, {0: 0.1, 57: 0.1}),
        # lr · γ^step
        ({"name": "exponential", "gamma": 0.9}, None, {0: 0.1, 1: 0.09, 2: 0.081}),
        # lr · γ^floor(step / steps_per_epoch): flat within an epoch
        ({"name": "exponential", "gamma": 0.9, "per": "epoch"}, 10, {9: 0.1, 10: 0.09, 25: 0.081}),
        # lr · γ^floor(step / step_size)
        ({"name": "step", "gamma": 0.5, "step_size": 3}, None, {0: 0.1, 2: 0.1, 3: 0.05, 7: 0.025}),
        # warm-up lr·(step+1)/10, then half a cosine over the remaining 100 steps
        ({"name": "cosine", "warmup_steps": 10}, None,
         {0: 0.01, 4: 0.05, 9: 0.1, 10: 0.1, 60: 0.05, 110: 0.0}),
        ({"name": "cosine", "warmup_steps": 10, "min_lr": 0.01}, None, {60: 0.055, 110: 0.01}),
        # no warm-up: a fifth of the way down the cosine is lr·(1 + cos(π/5))/2
        ({"name": "cosine"}, None, {0: 0.1, 22: 0.1 * (1 + math.cos(math.pi / 5)) / 2, 55: 0.05}),
    ],
)
def test_schedules_give_the_documented_rates(spec, steps_per_epoch, expected):
    total = 110 if spec["name"] == "cosine" else 1000
    schedule = build_schedule(spec, lr=0.1, total_steps=total, steps_per_epoch=steps_per_epoch)
    for step, lr in expected.items():
        assert schedule.lr(step) == pytest.approx(lr, abs=1e-12), f"step {step}"


def test_formulas_are_pure_functions_of_the_step():
    assert constant_lr(5, lr=2.0) == 2.0
    assert step_lr(7, lr=1.0, gamma=0.5, step_size=3) == 0.25
    assert exponential_lr(3, lr=1.0, gamma=0.5) == 0.125
    assert exponential_lr(3, lr=1.0, gamma=0.5, steps_per_epoch=2) == 0.5
    assert cosine_lr(1, lr=1.0, total_steps=10, warmup_steps=4) == 0.5
    assert cosine_lr(1, lr=1.0, total_steps=10, warmup_steps=4) == 0.5  # same step, same rate


def test_plateau_drops_after_patience_and_stops_at_min_lr():
    schedule = ReduceOnPlateau(lr=1.0, patience=1, factor=0.5, min_lr=0.3)
    rates = []
    for score in [1.0, 2.0, 2.0, 2.0, 1.5, 2.0, 1.0, 1.0, 1.0, 3.0]:
        schedule.observe(score)
        rates.append(schedule.lr(step=0))
    # improvements at 1.0, 2.0, 3.0; two non-improving in a row (> patience 1) halve the rate,
    # and the second drop would go to 0.25, below min_lr.
    assert rates == [1.0, 1.0, 1.0, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3]


def test_plateau_threshold_ignores_tiny_improvements():
    schedule = build_schedule({"name": "plateau", "patience": 0, "factor": 0.1, "threshold": 0.01},
                              lr=1.0, total_steps=10)
    schedule.observe(0.5)
    schedule.observe(0.505)  # better, but not by more than the threshold
    assert schedule.lr(3) == pytest.approx(0.1)


def test_check_spec_fills_defaults():
    assert check_spec({"name": "cosine"}) == {"name": "cosine", "warmup_steps": 0, "min_lr": 0.0}
    assert check_spec({"name": "step", "step_size": 5})["gamma"] == 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "linear"}, "schedule.name must be one of"),
        ({}, "schedule.name must be one of"),
        ("cosine", "must be a mapping"),
        ({"name": "cosine", "warmup": 5}, "unknown option 'warmup'"),
        ({"name": "constant", "gamma": 0.5}, "unknown option 'gamma'"),
        ({"name": "cosine", "warmup_steps": -1}, "schedule.warmup_steps must be an integer >= 0"),
        ({"name": "cosine", "warmup_steps": 2.5}, "schedule.warmup_steps must be an integer"),
        ({"name": "step", "step_size": 0}, "schedule.step_size must be an integer >= 1"),
        ({"name": "step", "gamma": 0}, "schedule.gamma must be a number in (0, 1]"),
        ({"name": "exponential", "gamma": 1.5}, "schedule.gamma must be a number in (0, 1]"),
        ({"name": "exponential", "per": "batch"}, "schedule.per must be 'step' or 'epoch'"),
        ({"name": "plateau", "factor": 1.0}, "schedule.factor must be a number in (0, 1)"),
        ({"name": "plateau", "patience": True}, "schedule.patience must be an integer"),
        ({"name": "cosine", "min_lr": float("nan")}, "schedule.min_lr must be a number >= 0"),
    ],
)
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(PlanError) as error:
        check_spec(spec)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("spec", "steps_per_epoch", "message"),
    [
        ({"name": "cosine", "warmup_steps": 100}, None, "warmup_steps (100) must be below"),
        ({"name": "cosine", "min_lr": 0.5}, None, "min_lr (0.5) is above the learning rate"),
        ({"name": "exponential", "per": "epoch"}, None, "needs data of known length"),
    ],
)
def test_impossible_schedules_for_a_run(spec, steps_per_epoch, message):
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_schedule(spec, lr=0.1, total_steps=100, steps_per_epoch=steps_per_epoch)

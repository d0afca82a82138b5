"""Learning-rate schedules for recovery fine-tuning, as pure functions of the step.

`step` always counts the optimizer updates already made, so ``lr(step)`` is the rate of the
next update and ``lr(0)`` the rate of the first. Being pure functions, the GUI can draw a
schedule's whole curve before training starts, and a run replays exactly.

A schedule is chosen by a plain dict, as stored in a plan's ``recovery`` section, e.g.
``{"name": "cosine", "warmup_steps": 50, "min_lr": 1e-5}``; :func:`check_spec` validates it
and :func:`build_schedule` turns it into a :class:`Schedule`.

Formulas (``lr`` is the base rate from the config):

============  ==================================================================================
constant      ``lr``
exponential   ``lr · γ^step``, or with ``per: "epoch"`` ``lr · γ^floor(step / steps_per_epoch)``
step          ``lr · γ^floor(step / step_size)``
cosine        warm-up ``lr · (step + 1) / warmup_steps`` for ``step < warmup_steps``, then
              ``min_lr + (lr − min_lr) · (1 + cos(π · (step − W) / (total − W))) / 2``
plateau       ``lr`` until the observed score stops improving for more than ``patience``
              observations in a row, then ``max(lr · factor, min_lr)``, and so on
============  ==================================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Protocol

from engine.errors import PlanError


class Schedule(Protocol):
    """What fine-tuning asks of a schedule: the rate for a step, and a score to react to."""

    def lr(self, step: int) -> float: ...

    def observe(self, score: float) -> None:
        """Take an evaluation score (higher is better); only stateful schedules care."""


# --- the formulas -------------------------------------------------------------------------


def constant_lr(step: int, lr: float) -> float:
    """``lr`` at every step."""
    return lr


def step_lr(step: int, lr: float, gamma: float, step_size: int) -> float:
    """``lr · γ^floor(step / step_size)``: drops by `gamma` every `step_size` steps."""
    return lr * gamma ** (step // step_size)


def exponential_lr(step: int, lr: float, gamma: float, steps_per_epoch: int | None = None) -> float:
    """``lr · γ^step``; per epoch (``steps_per_epoch`` given) it is :func:`step_lr` by epochs."""
    if steps_per_epoch is not None:
        return step_lr(step, lr, gamma, steps_per_epoch)
    return lr * gamma**step


def cosine_lr(step: int, lr: float, total_steps: int, warmup_steps: int = 0,
              min_lr: float = 0.0) -> float:
    """Linear warm-up from ``lr / warmup_steps`` to ``lr``, then a half cosine down to `min_lr`.

    The warm-up starts above zero so that the first update already moves the weights.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + (lr - min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0


# --- schedules built from specs -----------------------------------------------------------


@dataclass
class FunctionSchedule:
    """A stateless schedule: one of the formulas above with its parameters bound."""

    formula: Callable[[int], float]

    def lr(self, step: int) -> float:
        return self.formula(step)

    def observe(self, score: float) -> None:
        """Stateless schedules ignore scores."""


class ReduceOnPlateau:
    """Multiply the rate by `factor` when the score has not improved for a while.

    A score improves when it beats the best so far by more than `threshold`. After more than
    `patience` non-improving observations in a row the rate drops (never below `min_lr`) and
    the count restarts, the same rule as ``torch.optim.lr_scheduler.ReduceLROnPlateau``.
    """

    def __init__(self, lr: float, patience: int = 2, factor: float = 0.5, min_lr: float = 0.0,
                 threshold: float = 0.0) -> None:
        self._lr = lr
        self.patience = patience
        self.factor = factor
        self.min_lr = min_lr
        self.threshold = threshold
        self._best = -math.inf
        self._bad = 0

    def lr(self, step: int) -> float:
        return self._lr

    def observe(self, score: float) -> None:
        if score > self._best + self.threshold:
            self._best = score
            self._bad = 0
            return
        self._bad += 1
        if self._bad > self.patience:
            self._lr = max(self._lr * self.factor, self.min_lr)
            self._bad = 0


@dataclass(frozen=True)
class _Option:
    default: Any
    check: Callable[[Any], bool]
    wanted: str


def number_in(low: float, high: float = math.inf, *, low_open: bool = False,
              high_open: bool = False) -> Callable[[Any], bool]:
    """A check for a finite real number in a range; bools are not numbers here."""

    def check(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below and math.isfinite(value)

    return check


def count_from(low: int) -> Callable[[Any], bool]:
    """A check for an integer (not a bool) of at least `low`."""
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= low


_GAMMA = _Option(0.5, number_in(0.0, 1.0, low_open=True), "a number in (0, 1]")
_MIN_LR = _Option(0.0, number_in(0.0), "a number >= 0")

#: schedule name -> its options with defaults and checks. One table drives checking and help.
OPTIONS: dict[str, dict[str, _Option]] = {
    "constant": {},
    "exponential": {
        "gamma": _Option(0.99, number_in(0.0, 1.0, low_open=True), "a number in (0, 1]"),
        "per": _Option("step", lambda value: value in ("step", "epoch"), "'step' or 'epoch'"),
    },
    "step": {"gamma": _GAMMA, "step_size": _Option(100, count_from(1), "an integer >= 1")},
    "cosine": {"warmup_steps": _Option(0, count_from(0), "an integer >= 0"), "min_lr": _MIN_LR},
    "plateau": {
        "patience": _Option(2, count_from(0), "an integer >= 0"),
        "factor": _Option(0.5, number_in(0.0, 1.0, low_open=True, high_open=True),
                          "a number in (0, 1)"),
        "min_lr": _MIN_LR,
        "threshold": _Option(0.0, number_in(0.0), "a number >= 0"),
    },
}


def check_spec(spec: Any, where: str = "schedule") -> dict[str, Any]:
    """The spec with defaults filled in; a :class:`PlanError` naming the field if it is wrong."""
    if not isinstance(spec, dict):
        raise PlanError(f"{where} must be a mapping with a 'name', not {spec!r}")
    name = spec.get("name")
    if name not in OPTIONS:
        raise PlanError(f"{where}.name must be one of {', '.join(OPTIONS)}, not {name!r}")
    options = OPTIONS[name]
    unknown = sorted(set(spec) - set(options) - {"name"})
    if unknown:
        allowed = ", ".join(options) or "no options"
        raise PlanError(f"{where}: unknown option {unknown[0]!r} for {name!r} (allowed: {allowed})")
    checked: dict[str, Any] = {"name": name}
    for key, option in options.items():
        value = spec.get(key, option.default)
        if not option.check(value):
            raise PlanError(f"{where}.{key} must be {option.wanted}, not {value!r}")
        checked[key] = value
    return checked


def build_schedule(spec: dict[str, Any], lr: float, total_steps: int,
                   steps_per_epoch: int | None = None) -> Schedule:
    """The schedule a (checked or raw) spec describes, for a run of `total_steps` updates."""
    spec = check_spec(spec)
    name = spec["name"]
    if "min_lr" in spec and spec["min_lr"] > lr:
        raise PlanError(f"schedule.min_lr ({spec['min_lr']}) is above the learning rate ({lr})")
    if name == "constant":
        return FunctionSchedule(partial(constant_lr, lr=lr))
    if name == "exponential":
        per_epoch = spec["per"] == "epoch"
        if per_epoch and steps_per_epoch is None:
            raise PlanError("schedule.per 'epoch' needs data of known length; use per 'step'")
        return FunctionSchedule(partial(exponential_lr, lr=lr, gamma=spec["gamma"],
                                        steps_per_epoch=steps_per_epoch if per_epoch else None))
    if name == "step":
        return FunctionSchedule(partial(step_lr, lr=lr, gamma=spec["gamma"],
                                        step_size=spec["step_size"]))
    if name == "cosine":
        if spec["warmup_steps"] >= total_steps:
            raise PlanError(f"schedule.warmup_steps ({spec['warmup_steps']}) must be below the "
                            f"number of training steps ({total_steps})")
        return FunctionSchedule(partial(cosine_lr, lr=lr, total_steps=total_steps,
                                        warmup_steps=spec["warmup_steps"], min_lr=spec["min_lr"]))
    return ReduceOnPlateau(lr, patience=spec["patience"], factor=spec["factor"],
                           min_lr=spec["min_lr"], threshold=spec["threshold"])

"""Recovery fine-tuning: win back the accuracy compression cost, without undoing the compression.

The compressed module (the student) learns from the original model (the teacher) by knowledge
distillation: temperature-softened KL divergence, scaled by T² so its gradients keep their size
as T grows (Hinton et al. 2015), mixed with cross-entropy when labels exist. Without labels it is
pure distillation, so any unlabelled data from the right domain will do.

What the compression decided stays decided while the weights move:

* pruned weights stay exactly zero: the forward pass multiplies by the mask (so their gradients
  are zero too) and the masks are re-applied after every update;
* quantized weights train with fake quantization and a straight-through estimator, using the
  recorded bits, granularity and symmetry; at the end they are quantized again, so
  ``compressed.quantized`` holds codes that decode to exactly the weights the module runs with;
* fp16/bf16 weights train as float32 "master" copies and run rounded to their storage type;
* low-rank layers keep their rank: they are two ordinary smaller layers.

Optionally an L1 proximal step (w ← sign(w)·max(|w| − lr·λ, 0) after each update) makes more
weights exactly zero, and gradual magnitude pruning raises sparsity along the cubic schedule of
Zhu & Gupta 2017, "To prune, or not to prune", updating the masks.

Steps are counted as updates done: step 0 is the input state, step k the state after k updates.
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from engine.compressed import CompressedModel, QuantizedWeight
from engine.errors import PlanError
from engine.jobs import NEVER_CANCELLED, CancelToken, Cancelled, Progress, no_progress
from engine.methods.base import keep_top
from engine.methods.quantize import quantize_tensor
from engine.schedules import build_schedule, check_spec, count_from, number_in

DEFAULT_STEPS = 500
OPTIMIZERS = ("sgd", "adam", "adamw")

ArrayLike = Union[np.ndarray, torch.Tensor]
Batch = tuple[ArrayLike, Union[ArrayLike, None]]
#: Training data: ``(inputs, labels or None)`` arrays (or an object with ``inputs`` and
#: ``labels``, like engine.data.ArraySource) that recovery shuffles and batches itself; a
#: callable ``epoch -> batches``; or a re-iterable collection of batches.
TrainData = Union[tuple[ArrayLike, Union[ArrayLike, None]], Callable[[int], Iterable[Batch]],
                  Iterable[Batch]]
#: Scores the module as it would be stored (higher is better), e.g. validation accuracy.
EvalFn = Callable[[nn.Module], float]


# --- configuration ------------------------------------------------------------------------

_Check = tuple[Callable[[Any], bool], str]
_POSITIVE: _Check = (number_in(0.0, low_open=True), "a number > 0")
_NON_NEGATIVE: _Check = (number_in(0.0), "a number >= 0")
_FRACTION: _Check = (number_in(0.0, 1.0, high_open=True), "a number in [0, 1)")


def _optional(check: _Check) -> _Check:
    test, wanted = check
    return (lambda value: value is None or test(value), f"{wanted} or null")


def _checked_fields(instance: Any, checks: dict[str, _Check], where: str) -> None:
    for name, (test, wanted) in checks.items():
        value = getattr(instance, name)
        if not test(value):
            raise PlanError(f"{where}.{name} must be {wanted}, not {value!r}")


def _from_mapping(cls: type, data: Any, where: str) -> dict[str, Any]:
    """`data` as keyword arguments for dataclass `cls`, refusing anything it does not know."""
    if not isinstance(data, dict):
        raise PlanError(f"{where} must be a mapping, not {data!r}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise PlanError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(known)})")
    return dict(data)


@dataclass
class GradualPruning:
    """Magnitude pruning that grows with training (Zhu & Gupta 2017).

    At steps ``start_step, start_step + frequency, …`` and at ``end_step`` each target weight's
    mask is recomputed to the sparsity
    ``s_t = s_f + (s_i − s_f) · (1 − (t − start_step) / (end_step − start_step))³``:
    fast pruning while the network is still redundant, gentle near the end. Pruned weights
    never come back.
    """

    final_sparsity: float
    end_step: int
    initial_sparsity: float = 0.0
    start_step: int = 0
    frequency: int = 10

    def __post_init__(self) -> None:
        _checked_fields(self, {
            "final_sparsity": _FRACTION, "initial_sparsity": _FRACTION,
            "start_step": (count_from(0), "an integer >= 0"),
            "end_step": (count_from(1), "an integer >= 1"),
            "frequency": (count_from(1), "an integer >= 1"),
        }, "recovery.gradual")
        if self.end_step <= self.start_step:
            raise PlanError(f"recovery.gradual.end_step ({self.end_step}) must be after "
                            f"start_step ({self.start_step})")
        if self.initial_sparsity > self.final_sparsity:
            raise PlanError(f"recovery.gradual.initial_sparsity ({self.initial_sparsity}) must "
                            f"not exceed final_sparsity ({self.final_sparsity})")

    def sparsity_at(self, step: int) -> float:
        """The cubic schedule's sparsity after `step` updates (flat outside start..end)."""
        span = self.end_step - self.start_step
        progress = min(max((step - self.start_step) / span, 0.0), 1.0)
        drop = self.initial_sparsity - self.final_sparsity
        return self.final_sparsity + drop * (1.0 - progress) ** 3

    def due(self, step: int) -> bool:
        """Whether masks are recomputed after `step` updates."""
        if not self.start_step <= step <= self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.frequency == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> GradualPruning:
        kwargs = _from_mapping(cls, data, "recovery.gradual")
        missing = [name for name in ("final_sparsity", "end_step") if name not in kwargs]
        if missing:
            raise PlanError(f"recovery.gradual.{missing[0]} is required")
        return cls(**kwargs)


@dataclass
class RecoveryConfig:
    """How to fine-tune; plain data, stored as a plan's ``recovery`` section.

    Give `steps` or `epochs`, not both (neither means :data:`DEFAULT_STEPS` steps). `alpha` is
    the weight of the label loss; the distillation loss gets ``1 − alpha`` (all of it for
    batches without labels). `l1` is the proximal strength λ. `params` names the weights that
    `l1` and `gradual` act on (default: every parameter with two or more dimensions: conv and
    linear kernels). `eval_every` 0 evaluates only before and after training.
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 2e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "cosine"})
    temperature: float = 2.0
    alpha: float = 0.5
    l1: float = 0.0
    gradual: GradualPruning | None = None
    params: list[str] | None = None
    seed: int = 0
    eval_every: int = 50

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise PlanError("recovery: give steps or epochs, not both")
        if self.steps is None and self.epochs is None:
            self.steps = DEFAULT_STEPS
        _checked_fields(self, {
            "steps": _optional((count_from(1), "an integer >= 1")),
            "epochs": _optional(_POSITIVE),
            "batch_size": (count_from(1), "an integer >= 1"),
            "optimizer": (lambda value: value in OPTIMIZERS, " or ".join(OPTIMIZERS)),
            "lr": _POSITIVE,
            "momentum": (number_in(0.0, 1.0, high_open=True), "a number in [0, 1)"),
            "nesterov": (lambda value: isinstance(value, bool), "true or false"),
            "weight_decay": _NON_NEGATIVE,
            "temperature": _POSITIVE,
            "alpha": (number_in(0.0, 1.0), "a number in [0, 1]"),
            "l1": _NON_NEGATIVE,
            "params": (lambda value: value is None or (isinstance(value, list) and all(
                isinstance(name, str) for name in value)), "a list of parameter names or null"),
            "seed": (count_from(0), "an integer >= 0"),
            "eval_every": (count_from(0), "an integer >= 0"),
        }, "recovery")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise PlanError("recovery.nesterov needs optimizer 'sgd' with momentum > 0")
        self.schedule = check_spec(self.schedule, "recovery.schedule")
        if self.schedule["name"] == "plateau" and self.eval_every == 0:
            raise PlanError("recovery.eval_every must be > 0 for the 'plateau' schedule, "
                            "which reacts to evaluations")
        if isinstance(self.gradual, dict):
            self.gradual = GradualPruning.from_dict(self.gradual)
        elif not (self.gradual is None or isinstance(self.gradual, GradualPruning)):
            raise PlanError(f"recovery.gradual must be a mapping or null, not {self.gradual!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> RecoveryConfig:
        """Parse a plan's ``recovery`` section; wrong or unknown fields raise :class:`PlanError`."""
        return cls(**_from_mapping(cls, data, "recovery"))


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepReport:
    """One update, for live plots: `metric` only on evaluation steps, `sparsity` only when
    L1 or gradual pruning is on (fraction of exact zeros in the targeted weights)."""

    step: int
    loss: float
    lr: float
    metric: float | None = None
    sparsity: float | None = None
    #: Updates the run will make in all (0: not said), so a watcher can show "step of total".
    total: int = 0


@dataclass
class RecoveryResult:
    """What a run did. `kept_step` is the step whose weights `compressed.module` now holds
    (0: the input state), `kept_metric` their score."""

    steps: int
    total_steps: int
    cancelled: bool
    history: list[StepReport]
    initial_metric: float | None
    kept_step: int
    kept_metric: float | None
    seconds: float


# --- quantization -------------------------------------------------------------------------


def requantize(weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
    """Quantize `weight` with `like`'s bits, symmetry and granularity, scales from min/max.

    The range method a plan may have used ("mse") is not recorded in QuantizedWeight, and a
    clipping search every step would be slow, so training and the final codes both use min/max.
    """
    if like.axis not in (None, 0):
        raise PlanError(f"cannot retrain weights quantized along axis {like.axis}; only axis 0")
    granularity = "group" if like.group_size else "per-channel" if like.axis == 0 else "per-tensor"
    return quantize_tensor(weight, like.bits, like.symmetric, granularity, like.group_size)


def _straight_through(weight: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """`stored` in the forward pass, the identity in the backward pass."""
    return weight + (stored - weight).detach()


# --- the constraints compression imposes --------------------------------------------------


def magnitude_mask(weight: torch.Tensor, sparsity: float,
                   previous: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask zeroing the ``round(sparsity · n)`` smallest |w|; weights `previous` pruned
    stay pruned (they go first, and the count never shrinks)."""
    score = weight.detach().abs().clone()
    count = round(sparsity * score.numel())
    if previous is not None:
        score[~previous] = -1.0
        count = max(count, int((~previous).sum()))
    return keep_top(score, count / score.numel()).to(weight.device)


def soft_threshold_(weight: torch.Tensor, threshold: float) -> None:
    """The L1 proximal step in place: ``w ← sign(w) · max(|w| − threshold, 0)``."""
    weight.copy_(weight.sign() * (weight.abs() - threshold).clamp_min(0.0))


class _Constraints:
    """The compression's decisions about a module's weights, applied while they train.

    The module's parameters are float "master" weights; :meth:`effective` is what the model
    runs with (fake-quantized, cast-rounded, masked) and what :meth:`finalize` writes back.
    """

    def __init__(self, compressed: CompressedModel, targets: list[str] | None) -> None:
        self.compressed = compressed
        self.params = dict(compressed.module.named_parameters())
        for kind, names in (("mask", compressed.masks), ("quantized weight", compressed.quantized),
                            ("cast", compressed.cast), ("recovery.params", targets or [])):
            missing = sorted(set(names) - set(self.params))
            if missing:
                raise PlanError(f"{kind} {missing[0]!r} is not a parameter of the module")
        self.masks = {name: mask.to(torch.bool).clone() for name, mask in compressed.masks.items()}
        self.targets = targets if targets is not None else [
            name for name, param in self.params.items() if param.dim() >= 2]

    @property
    def constrained(self) -> list[str]:
        names = set(self.masks) | set(self.compressed.quantized) | set(self.compressed.cast)
        return sorted(names)

    def effective(self, name: str) -> torch.Tensor:
        weight = self.params[name]
        if name in self.compressed.quantized:
            stored = requantize(weight, self.compressed.quantized[name]).dequantize()
            weight = _straight_through(weight, stored.to(weight.dtype))
        if name in self.compressed.cast:
            rounded = weight.detach().to(self.compressed.cast[name]).to(weight.dtype)
            weight = _straight_through(weight, rounded)
        if name in self.masks:
            weight = weight * self.masks[name]
        return weight

    def effective_params(self) -> dict[str, torch.Tensor]:
        return {name: self.effective(name) for name in self.constrained}

    @torch.no_grad()
    def apply_masks_(self) -> None:
        for name, mask in self.masks.items():
            self.params[name].mul_(mask)

    @torch.no_grad()
    def soft_threshold_(self, threshold: float) -> None:
        for name in self.targets:
            soft_threshold_(self.params[name], threshold)

    @torch.no_grad()
    def prune_to_(self, sparsity: float) -> None:
        for name in self.targets:
            self.masks[name] = magnitude_mask(self.params[name], sparsity, self.masks.get(name))
        self.apply_masks_()

    @torch.no_grad()
    def sparsity(self) -> float:
        zeros = sum(int((self.params[name] == 0).sum()) for name in self.targets)
        total = sum(self.params[name].numel() for name in self.targets)
        return zeros / max(total, 1)

    @contextmanager
    def stored_weights(self) -> Iterator[None]:
        """Temporarily give the module the weights it would be stored with, e.g. to evaluate."""
        with torch.no_grad():
            masters = {name: self.params[name].detach().clone() for name in self.constrained}
            for name in self.constrained:
                self.params[name].copy_(self.effective(name))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, master in masters.items():
                    self.params[name].copy_(master)

    @torch.no_grad()
    def finalize(self) -> None:
        """Write the stored weights into the module and the codes and masks into `compressed`."""
        for name, like in list(self.compressed.quantized.items()):
            self.compressed.quantized[name] = requantize(self.params[name], like)
        for name in self.constrained:
            self.params[name].copy_(self.effective(name))
        self.compressed.masks.update(self.masks)


@dataclass
class _Checkpoint:
    step: int
    metric: float | None
    state: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]


def _snapshot(module: nn.Module, constraints: _Constraints, step: int,
              metric: float | None) -> _Checkpoint:
    state = {key: value.detach().clone() for key, value in module.state_dict().items()}
    return _Checkpoint(step, metric, state, {n: m.clone() for n, m in constraints.masks.items()})


def _restore(module: nn.Module, constraints: _Constraints, checkpoint: _Checkpoint) -> None:
    module.load_state_dict(checkpoint.state)
    constraints.masks = {name: mask.clone() for name, mask in checkpoint.masks.items()}


# --- data ---------------------------------------------------------------------------------


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor))


def _as_inputs(value: ArrayLike) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    return tensor.to(torch.float32) if tensor.is_floating_point() else tensor


def _epochs(data: TrainData, batch_size: int, seed: int
            ) -> tuple[Callable[[int], Iterable[Batch]], int | None]:
    """One epoch's batches by epoch number, and the batches per epoch when that is known."""
    if hasattr(data, "inputs") and hasattr(data, "labels"):
        data = (data.inputs, data.labels)  # an in-memory data source
    if isinstance(data, tuple) and len(data) == 2 and _is_array(data[0]):
        inputs = _as_inputs(data[0])
        labels = None if data[1] is None else torch.as_tensor(data[1], dtype=torch.long)
        count = len(inputs)
        per_epoch = max(count // batch_size, 1)  # drop a ragged last batch: BN dislikes tiny ones

        def shuffled(epoch: int) -> Iterator[Batch]:
            generator = torch.Generator().manual_seed(seed * 7919 + epoch)
            order = torch.randperm(count, generator=generator)
            for start in range(0, per_epoch * batch_size, batch_size):
                index = order[start:start + batch_size]
                yield inputs[index], None if labels is None else labels[index]

        return shuffled, per_epoch
    if callable(data):
        return data, None

    def passes(epoch: int) -> Iterable[Batch]:
        if epoch > 0 and iter(data) is data:
            raise ValueError("the training batches ran out; pass a list of batches or a "
                             "callable epoch -> batches to train for more than one pass")
        return data

    return passes, len(data) if hasattr(data, "__len__") else None


def _endless(epochs: Callable[[int], Iterable[Batch]]
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    for epoch in itertools.count():
        empty = True
        for inputs, labels in epochs(epoch):
            empty = False
            labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
            yield _as_inputs(inputs), labels
        if empty:
            raise ValueError("the training data gave no batches")


# --- the loss and the loop ----------------------------------------------------------------


def _class_last(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) outputs as (N·..., C) rows, so per-pixel or per-token outputs distil too."""
    if logits.dim() <= 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                      temperature: float, alpha: float) -> torch.Tensor:
    """``alpha · CE(student, labels) + (1 − alpha) · T² · KL(teacher_T ‖ student_T)``,
    pure KD without labels; ``_T`` is softmax at temperature T."""
    student, teacher = _class_last(student), _class_last(teacher)
    kd = F.kl_div(F.log_softmax(student / temperature, dim=-1),
                  F.log_softmax(teacher / temperature, dim=-1),
                  reduction="batchmean", log_target=True) * temperature**2
    if labels is None:
        return kd
    return alpha * F.cross_entropy(student, labels.reshape(-1)) + (1.0 - alpha) * kd


def _make_optimizer(config: RecoveryConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay)
    optimizer = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return optimizer(params, lr=config.lr, weight_decay=config.weight_decay)


def _distil_step(student: nn.Module, teacher: nn.Module, constraints: _Constraints,
                 optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor | None],
                 device: torch.device, config: RecoveryConfig) -> float:
    """One optimizer update of the student through its stored (constrained) weights."""
    inputs, labels = batch
    inputs = inputs.to(device)
    labels = None if labels is None else labels.to(device)
    with torch.no_grad():
        teacher_logits = teacher(inputs)
    student_logits = functional_call(student, constraints.effective_params(), (inputs,))
    loss = distillation_loss(student_logits, teacher_logits, labels, config.temperature,
                             config.alpha)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Same seed, same run: seeded RNG (the caller's is left as it was) and deterministic
    kernels where torch has them. The deterministic switch is process-wide while it lasts."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


def recover(compressed: CompressedModel, teacher: nn.Module, train_data: TrainData,
            config: RecoveryConfig | None = None, *, eval_fn: EvalFn | None = None,
            progress: Progress = no_progress, cancel: CancelToken = NEVER_CANCELLED,
            on_step: Callable[[StepReport], None] | None = None) -> RecoveryResult:
    """Fine-tune `compressed.module` in place against `teacher`, keeping the compression.

    With `eval_fn`, the module is scored before training, every ``eval_every`` steps and at
    the end, and the best-scoring state is the one kept (while gradual pruning is still under
    way, states are not eligible: they are not yet as sparse as asked). Without it, the
    latest state is kept.

    Cancelling does not raise: fine-tuning is useful at any point, so a cancelled run returns
    ``cancelled=True`` with the module restored to the best state checkpointed so far (the
    input state if none qualified), ready to use or export.
    """
    config = config or RecoveryConfig()
    started = time.perf_counter()
    student = compressed.module
    device = next(student.parameters()).device
    constraints = _Constraints(compressed, config.params)
    epochs, per_epoch = _epochs(train_data, config.batch_size, config.seed)
    if config.steps is not None:
        total = config.steps
    elif per_epoch is None:
        raise PlanError("recovery.epochs needs training data of known length; give steps instead")
    else:
        total = max(math.ceil(config.epochs * per_epoch), 1)
    gradual = config.gradual
    if gradual is not None and gradual.end_step > total:
        raise PlanError(f"recovery.gradual.end_step ({gradual.end_step}) is beyond the last "
                        f"training step ({total})")
    schedule = build_schedule(config.schedule, config.lr, total, per_epoch)
    track_sparsity = gradual is not None or config.l1 > 0

    def eligible(step: int) -> bool:
        return gradual is None or step >= gradual.end_step

    def evaluate() -> float | None:
        if eval_fn is None:
            return None
        with constraints.stored_weights(), torch.no_grad():
            student.eval()
            try:
                return float(eval_fn(student))
            finally:
                student.train()

    history: list[StepReport] = []
    teacher_was_training = teacher.training
    teacher.eval()
    student.train()
    initial_metric = evaluate()
    kept = _snapshot(student, constraints, 0, initial_metric)
    kept_eligible = eligible(0)
    step = 0
    cancelled = False
    try:
        with _seeded(config.seed):
            if gradual is not None and gradual.due(0):
                constraints.prune_to_(gradual.sparsity_at(0))
            trainable = [param for param in student.parameters() if param.requires_grad]
            optimizer = _make_optimizer(config, trainable)
            batches = _endless(epochs)
            losses: list[float] = []
            while step < total:
                cancel.check()
                lr = schedule.lr(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = _distil_step(student, teacher, constraints, optimizer, next(batches),
                                    device, config)
                step += 1
                if config.l1 > 0:
                    constraints.soft_threshold_(lr * config.l1)
                if gradual is not None and gradual.due(step):
                    constraints.prune_to_(gradual.sparsity_at(step))
                constraints.apply_masks_()
                losses.append(loss)

                metric = None
                if step == total or (config.eval_every and step % config.eval_every == 0):
                    metric = evaluate()
                    schedule.observe(metric if metric is not None else -float(np.mean(losses)))
                    losses.clear()
                    better = (metric is None or not kept_eligible or kept.metric is None
                              or metric >= kept.metric)
                    if eligible(step) and better:
                        kept, kept_eligible = _snapshot(student, constraints, step, metric), True
                report = StepReport(step, loss, lr, metric,
                                    constraints.sparsity() if track_sparsity else None, total)
                history.append(report)
                progress(step / total, f"recovery step {step}/{total}, loss {report.loss:.4f}")
                if on_step is not None:
                    on_step(report)
    except Cancelled:
        cancelled = True
    finally:
        # Also on errors, so `compressed` is always consistent: module, codes and masks agree.
        teacher.train(teacher_was_training)
        _restore(student, constraints, kept)
        constraints.finalize()
    return RecoveryResult(steps=step, total_steps=total, cancelled=cancelled, history=history,
                          initial_metric=initial_metric, kept_step=kept.step,
                          kept_metric=kept.metric, seconds=time.perf_counter() - started)

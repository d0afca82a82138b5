"""Per-layer input statistics of a torch module, from forward hooks over calibration batches.

Error-compensating methods (GPTQ, OBS pruning, bias correction, activation-aware scaling) need,
for each weight layer, what its input looks like: the second moments ``XᵀX`` (the layer-wise
Hessian is ``H = 2 XᵀX``), the mean input column (bias correction) and each input channel's
mean magnitude (activation-aware scaling). This module collects them with forward pre-hooks.

The shapes follow :func:`engine.sensitivity_backends.collect_input_moments` (the ONNX Runtime
path), so a method can take either:

* ``Linear``: rows of ``X`` are every position of every sample (all leading dims flattened);
  ``xtx`` is ``[1, in, in]``.
* ``Conv1d`` / ``Conv2d``: rows are the patches the convolution reads (its own padding mode,
  stride and dilation applied, via ``unfold``), ``xtx`` is ``[groups, d, d]`` with
  ``d = in/groups * kernel size`` in the order of ``weight.reshape(out, -1)``'s columns.

``xtx`` is summed over rows and divided by the number of *samples* (as the ONNX path does), so
``trace(ΔW xtx ΔWᵀ)`` is the expected squared output change per sample. Accumulation is in
float64, one batch (in pieces of :data:`PIECE` samples for convolutions) at a time; only the
accumulators of the requested layers are held, never the activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import PlanError
from engine.formats.guard import quote
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress

if TYPE_CHECKING:
    from engine.methods.base import Batch


def _submodule(module: nn.Module, name: str) -> nn.Module:
    # deferred: engine.methods imports the methods, which import this module
    from engine.methods.base import submodule

    return submodule(module, name)


def _layer_kind(layer: nn.Module) -> str:
    from engine.methods.base import layer_kind

    return layer_kind(layer)


#: Layer types whose input statistics can be collected (and GPTQ/OBS can compensate).
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: Samples unfolded at once for a convolution: bounds the im2col buffer.
PIECE = 8
#: Rows whose Gram matrix is multiplied in float32 before it joins the float64 sum.
ROWS_PER_PRODUCT = 4096
#: Memory for the XᵀX accumulators of one pass (as engine.sensitivity_backends.MOMENT_BYTES):
#: more layers than fit take more passes.
STATS_BYTES = 1 << 30


@dataclass
class InputStats:
    """One layer's input statistics (see the module docstring for the shapes)."""

    #: ``[groups, d, d]`` float64: Σ xxᵀ over rows, divided by `samples` (``[groups, 0, 0]``
    #: when only first moments were asked for).
    xtx: torch.Tensor
    #: ``[groups, d]`` float64: the mean row (im2col column for a convolution).
    mean: torch.Tensor
    #: ``[in_channels]`` float64: mean |x| per input channel of the raw input.
    channel_mean_abs: torch.Tensor
    rows: int
    samples: int

    @property
    def groups(self) -> int:
        return int(self.mean.shape[0])

    def hessian(self, group: int = 0) -> torch.Tensor:
        """``H = 2 XᵀX / rows`` for one group: the layer-wise squared-error Hessian per row.

        Dividing by rows instead of samples changes nothing in GPTQ/OBS (they are invariant to
        scaling H), but keeps the numbers near the inputs' own scale."""
        return 2.0 * self.xtx[group] * (self.samples / max(self.rows, 1))


class _Stop(BaseException):
    """Raised by a hook to end a forward pass once every wanted layer has been seen (not an
    Exception, so a model's own ``except Exception`` cannot swallow it)."""


class _Accumulator:
    """Running sums for one layer; fed by its forward pre-hook."""

    def __init__(self, name: str, layer: nn.Module, second_moments: bool = True) -> None:
        self.name, self.layer = name, layer
        weight = layer.weight
        groups = getattr(layer, "groups", 1)
        d = weight[0].numel()
        self.second_moments = second_moments
        self.xtx = torch.zeros(groups, *((d, d) if second_moments else (0, 0)),
                               dtype=torch.float64)
        self.sum = torch.zeros(groups, d, dtype=torch.float64)
        channels = weight.shape[1] * groups if isinstance(layer, nn.Conv1d | nn.Conv2d) \
            else weight.shape[1]
        self.abs_sum = torch.zeros(channels, dtype=torch.float64)
        self.abs_count = 0
        self.rows = 0
        self.calls = 0

    def add(self, x: torch.Tensor) -> None:
        self.calls += 1
        x = x.detach()
        if isinstance(self.layer, nn.Linear):
            rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
            self._add_rows(rows.unsqueeze(0))
            self.abs_sum += rows.abs().sum(0)
            self.abs_count += rows.shape[0]
            return
        for start in range(0, x.shape[0], PIECE):
            piece = x[start:start + PIECE].to(torch.float64)
            self._add_rows(_patches(self.layer, piece))
            per_channel = piece.transpose(0, 1).reshape(piece.shape[1], -1)
            self.abs_sum += per_channel.abs().sum(1)
            self.abs_count += per_channel.shape[1]

    def _add_rows(self, rows: torch.Tensor) -> None:
        """rows: ``[groups, n, d]`` float64. Each piece's Gram matrix is multiplied in float32
        (half the time of float64 on a CPU; the inputs are float32 anyway) and summed into the
        float64 accumulator, so rounding does not grow with the amount of data."""
        if self.second_moments:
            for start in range(0, rows.shape[1], ROWS_PER_PRODUCT):
                piece = rows[:, start:start + ROWS_PER_PRODUCT].to(torch.float32)
                self.xtx += torch.bmm(piece.transpose(1, 2), piece).to(torch.float64)
        self.sum += rows.sum(1)
        self.rows += rows.shape[1]

    def result(self, samples: int) -> InputStats:
        if not self.rows:
            raise PlanError(f"layer {quote(self.name)}: the calibration data never reached it "
                            "(the model computes it without calling the layer); "
                            "its input statistics cannot be collected")
        return InputStats(
            xtx=self.xtx / max(samples, 1),
            mean=self.sum / self.rows,
            channel_mean_abs=self.abs_sum / max(self.abs_count, 1),
            rows=self.rows,
            samples=samples,
        )


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[groups, n * positions, d]``: the patches a Conv1d/Conv2d reads from `x` (its padding
    mode applied), columns in the order of ``weight.reshape(out, -1)``."""
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    if isinstance(layer, nn.Conv1d):  # as a 2-D convolution of height 1
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [n, C*k, positions]
    n, width, positions = cols.shape
    groups = layer.groups
    grouped = cols.reshape(n, groups, width // groups, positions)
    return grouped.permute(1, 0, 3, 2).reshape(groups, n * positions, width // groups)


def check_supported(module: nn.Module, names: Iterable[str], what: str) -> None:
    """Refuse, in one line naming the layer, anything whose input statistics we cannot collect."""
    if isinstance(module, torch.jit.ScriptModule):
        raise PlanError(f"{what} needs forward hooks on an eager torch module; TorchScript has "
                        "none (open the model as a state_dict or pickled module)")
    for name in names:
        layer = _submodule(module, name)
        if not isinstance(layer, SUPPORTED):
            raise PlanError(f"layer {quote(name)} ({_layer_kind(layer)}): {what} works on Linear, "
                            "Conv1d and Conv2d layers only")


def _inputs_of(batch: Batch) -> Any:
    """A calibration batch's model inputs (batches are ``(inputs, labels or None)``)."""
    return batch[0]


def run_batch(module: nn.Module, batch: Batch) -> None:
    """Run `module` on one calibration batch (its inputs: a tensor, a tuple of positional
    arguments or a dict of named ones); the outputs are not needed, only the hooks' work."""
    _run(module, _inputs_of(batch))


def _run(module: nn.Module, inputs: Any) -> None:
    if isinstance(inputs, tuple):
        module(*inputs)
    elif isinstance(inputs, dict):
        module(**inputs)
    else:
        module(inputs)


def _samples(inputs: Any) -> int:
    first = inputs[0] if isinstance(inputs, tuple) else (
        next(iter(inputs.values())) if isinstance(inputs, dict) else inputs)
    return int(first.shape[0]) if hasattr(first, "shape") and first.dim() else 1


def collect_input_stats(
    module: nn.Module,
    names: Sequence[str],
    batches: Iterable[Batch],
    *,
    stop_early: bool = False,
    second_moments: bool = True,
    budget_bytes: int = STATS_BYTES,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> dict[str, InputStats]:
    """Input statistics of the named layers of `module`, in one pass over `batches`
    (``(inputs, labels or None)`` pairs, as :data:`engine.methods.base.Batch`).

    With `stop_early`, each forward pass ends (by an exception from the hook) once every named
    layer has been called as often as in the first batch's full pass: collecting one early
    layer then costs only the part of the network before it. Without `second_moments` only
    the means are collected (bias correction needs no more). Layers whose accumulators do not
    fit `budget_bytes` together are collected in further passes.
    """
    check_supported(module, names, "collecting layer-input statistics")
    batches = list(batches)
    passes_needed = _by_budget(module, names, budget_bytes if second_moments else None)
    if len(passes_needed) > 1:
        collected: dict[str, InputStats] = {}
        for i, group in enumerate(passes_needed):
            collected.update(collect_input_stats(
                module, group, batches, stop_early=stop_early, second_moments=second_moments,
                budget_bytes=budget_bytes, cancel=cancel,
                progress=lambda f, m, i=i: progress((i + f) / len(passes_needed), m)))
        return collected
    accumulators = {name: _Accumulator(name, _submodule(module, name), second_moments)
                    for name in names}
    calls_per_pass: dict[str, int] | None = None
    handles = []

    def hook_for(accumulator: _Accumulator):
        def hook(_layer: nn.Module, args: tuple[Any, ...]) -> None:
            accumulator.add(args[0])
            if calls_per_pass is not None and all(
                    a.calls >= expected for a, expected in
                    ((accumulators[n], calls_per_pass[n] * passes) for n in accumulators)):
                raise _Stop
        return hook

    for accumulator in accumulators.values():
        handles.append(accumulator.layer.register_forward_pre_hook(hook_for(accumulator)))
    samples = passes = 0
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                cancel.check()
                progress(i / max(len(batches), 1), "layer-input statistics")
                inputs = _inputs_of(batch)
                passes += 1
                try:
                    _run(module, inputs)
                except _Stop:
                    pass
                samples += _samples(inputs)
                if stop_early and calls_per_pass is None:
                    calls_per_pass = {n: a.calls for n, a in accumulators.items()}
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    progress(1.0, "layer-input statistics")
    return {name: accumulator.result(samples) for name, accumulator in accumulators.items()}


def _by_budget(module: nn.Module, names: Sequence[str], budget_bytes: int | None
               ) -> list[list[str]]:
    """`names` in groups whose float64 XᵀX accumulators fit `budget_bytes` (None: one group);
    a layer larger than the budget gets a pass of its own."""
    if budget_bytes is None:
        return [list(names)]
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        layer = _submodule(module, name)
        size = getattr(layer, "groups", 1) * layer.weight[0].numel() ** 2 * 8
        if groups[-1] and used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def forward_order(module: nn.Module, names: Sequence[str], batches: Iterable[Batch]) -> list[str]:
    """`names` in the order the forward pass first calls them (layers never called last, in
    the given order): sequential methods compress earlier layers first."""
    first: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(_layer: nn.Module, _args: Any, name: str = name) -> None:
            first.setdefault(name, len(first))
        handles.append(_submodule(module, name).register_forward_pre_hook(hook))
    was_training = module.training
    module.eval()
    try:
        batch = next(iter(batches), None)
        if batch is not None:
            with torch.no_grad():
                _run(module, _inputs_of(batch))
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    position = {name: i for i, name in enumerate(names)}
    return sorted(names, key=lambda n: (first.get(n, len(names) + position[n])))


def layer_by_layer(module: nn.Module, names: Sequence[str], context: Any, what: str,
                   second_moments: bool = True) -> Iterator[tuple[str, InputStats]]:
    """Each named layer with its input statistics, in forward order, collected just before it
    is yielded: a caller that changes the layer before asking for the next one has every later
    layer see the inputs the changed model really produces (GPTQ's and SparseGPT's sequential
    calibration). One layer's accumulators are held at a time.

    `context` is an :class:`engine.methods.base.Context`; its calibration batches are required.
    """
    batches = context.calibration
    if batches is None:
        raise PlanError(f"{what} needs calibration data (--data or --calibration)")
    batches = list(batches)
    if not batches:
        raise PlanError(f"{what} needs calibration data, and the calibration set is empty")
    check_supported(module, names, what)
    order = forward_order(module, names, batches)
    for i, name in enumerate(order):
        context.cancel.check()
        context.progress(i / max(len(order), 1), f"{what}: statistics of {name}")
        stats = collect_input_stats(module, [name], batches, stop_early=True,
                                    second_moments=second_moments, cancel=context.cancel)[name]
        yield name, stats

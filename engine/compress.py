"""compress(model, plan, data) -> (compressed, report): apply a plan and say honestly what it did.

The original model is never modified. The report lists, per layer, the sparsity, bits and rank
actually achieved and the bytes before and after; for the whole model, the size, the metric and
the CPU latency before and after. Sizes after compression count what an exporter that stores
integer codes (and, where it pays, a bitmask of the non-zeros) really has to write.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from engine.compressed import CompressedModel
from engine.data import DataSource
from engine.errors import SlimscopeError
from engine.evaluate import Metrics, TorchRunner, evaluate, measure_latency
from engine.finetune import RecoveryConfig, recover
from engine.jobs import NEVER_CANCELLED, CancelToken, Cancelled, Progress, no_progress, sub_progress
from engine.methods.apply import apply_plan
from engine.model import Model
from engine.plan import Plan
from engine.storage import storage_bytes

#: Calibration samples used by gradient methods and static activation quantization.
DEFAULT_CALIBRATION_SAMPLES = 128
CALIBRATION_BATCH = 32
FLOAT_BITS = 32


@dataclass
class LayerReport:
    name: str
    kind: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    sparsity: float
    bits: int
    rank: int | None = None
    channels: tuple[int, int] | None = None


@dataclass
class CompressionReport:
    layers: list[LayerReport]
    bytes_before: int
    bytes_after: int
    params_before: int
    params_after: int
    metrics_before: dict[str, Any] | None = None
    metrics_after: dict[str, Any] | None = None
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    data: str | None = None
    #: Metrics right after the one-shot step, before recovery fine-tuning (when the plan has it).
    metrics_one_shot: dict[str, Any] | None = None
    recovery: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["size_ratio"] = self.size_ratio
        return data


def stored_bits(compressed: CompressedModel, param_name: str, tensor: torch.Tensor) -> int:
    """Bits per element an exporter stores for one parameter."""
    if param_name in compressed.quantized:
        return compressed.quantized[param_name].bits
    if param_name in compressed.cast:
        return torch.finfo(compressed.cast[param_name]).bits
    return tensor.element_size() * 8


def tensor_storage_bytes(compressed: CompressedModel, param_name: str, tensor: torch.Tensor
                         ) -> int:
    """Bytes to store one parameter: packed codes (+ scales), and a non-zero bitmask if smaller.

    Sparse storage keeps a 1-bit mask per element plus the non-zero values, which pays once
    more than 1/bits of the weights are zero.
    """
    numel = tensor.numel()
    bits = stored_bits(compressed, param_name, tensor)
    quant = compressed.quantized.get(param_name)
    overhead = quant.overhead_bytes if quant is not None else 0
    return storage_bytes(numel, int(torch.count_nonzero(tensor)), bits, overhead)


def _layer_params(module: nn.Module, layer_name: str) -> dict[str, torch.Tensor]:
    """Parameters of a layer, including both factors of a low-rank replacement."""
    found: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner == layer_name or owner.startswith(layer_name + "."):
            found[name] = param.detach()
    return found


def build_report(original: nn.Module, compressed: CompressedModel, model: Model
                 ) -> CompressionReport:
    """Per-layer and whole-model sizes before and after, from the modules themselves."""
    work = compressed.module
    layers: list[LayerReport] = []
    for layer in model.layers:
        before = _layer_params(original, layer.name)
        after = _layer_params(work, layer.name)
        if not before:
            continue
        weights_after = [p for name, p in after.items() if name.endswith("weight")]
        numel = sum(p.numel() for p in weights_after)
        zeros = sum(int(p.numel() - torch.count_nonzero(p)) for p in weights_after)
        weight_names = [name for name in after if name.endswith("weight")]
        bits = min((stored_bits(compressed, n, after[n]) for n in weight_names),
                   default=FLOAT_BITS)
        layers.append(LayerReport(
            name=layer.name,
            kind=layer.kind,
            params_before=sum(p.numel() for p in before.values()),
            params_after=sum(p.numel() for p in after.values()),
            bytes_before=sum(p.numel() * p.element_size() for p in before.values()),
            bytes_after=sum(tensor_storage_bytes(compressed, n, p) for n, p in after.items()),
            sparsity=zeros / numel if numel else 0.0,
            bits=bits,
            rank=compressed.low_rank.get(layer.name),
            channels=compressed.channels.get(layer.name),
        ))
    state_before = original.state_dict()
    state_after = work.state_dict()
    return CompressionReport(
        layers=layers,
        bytes_before=sum(t.numel() * t.element_size() for t in state_before.values()),
        bytes_after=sum(tensor_storage_bytes(compressed, n, t) for n, t in state_after.items()),
        params_before=sum(p.numel() for p in original.parameters()),
        params_after=sum(p.numel() for p in work.parameters()),
        notes=list(compressed.notes),
    )


def calibration_batches(data: DataSource, samples: int = DEFAULT_CALIBRATION_SAMPLES
                        ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """A small re-iterable list of torch batches for gradient scores and structured tracing."""
    batches = []
    for inputs, labels in data.head(samples).batches(CALIBRATION_BATCH):
        batches.append((torch.from_numpy(np.ascontiguousarray(inputs)),
                        None if labels is None else torch.from_numpy(labels).long()))
    return batches


def compress(
    model: Model,
    plan: Plan,
    data: DataSource | None = None,
    *,
    calibration: DataSource | None = None,
    train_data: DataSource | None = None,
    measure: bool = True,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> tuple[CompressedModel, CompressionReport]:
    """Apply `plan` to a copy of `model`'s module; evaluate and time both when `data` is given.

    `calibration` feeds gradient-based pruning and structured tracing; it defaults to the
    first samples of `data`. When the plan has a `recovery` section, the compressed model is
    then fine-tuned against the original on `train_data`, keeping the checkpoint that scores
    best on `calibration` (never on the evaluation data).
    """
    original = model.require_module("compression")
    recovery = RecoveryConfig.from_dict(plan.recovery) if plan.recovery else None
    if recovery is not None and train_data is None:
        raise SlimscopeError("the plan's recovery section needs training data (--train-data)")
    model.require_finite("compression")
    calibration = calibration or data
    batches = calibration_batches(calibration) if calibration is not None else None
    example = _example_input(model, batches)
    measuring = measure and data is not None
    surgery_end = 0.2 if recovery else (0.6 if measuring else 1.0)
    compressed = apply_plan(
        original, plan, calibration=batches, example_inputs=example,
        progress=sub_progress(progress, 0.0, surgery_end), cancel=cancel,
    )
    one_shot: Metrics | None = None
    if recovery is not None and train_data is not None:
        if measuring:
            one_shot = evaluate(TorchRunner(compressed.module), data, cancel=cancel)
        result = recover(
            compressed, original, lambda epoch: _torch_batches(train_data, recovery.batch_size),
            recovery, eval_fn=_scorer(calibration) if calibration is not None and calibration.has_labels
            else None,
            progress=sub_progress(progress, surgery_end, 0.6), cancel=cancel)
        if result.cancelled:
            raise Cancelled("recovery fine-tuning was cancelled")
    report = build_report(original, compressed, model)
    if recovery is not None:
        report.recovery = {"steps": result.steps, "seconds": result.seconds,
                           "kept_step": result.kept_step, "kept_metric": result.kept_metric}
        report.metrics_one_shot = one_shot.to_dict() if one_shot else None
    if measuring:
        assert data is not None
        report.data = data.describe()
        _measure(original, compressed.module, data, report,
                 sub_progress(progress, 0.6, 1.0), cancel)
    progress(1.0, f"done: {report.size_ratio:.3f}x the size")
    return compressed, report


def _torch_batches(data: DataSource, batch_size: int
                   ) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    for inputs, labels in data.batches(batch_size):
        yield (torch.from_numpy(np.ascontiguousarray(inputs)),
               None if labels is None else torch.from_numpy(labels).long())


def _scorer(data: DataSource) -> Callable[[nn.Module], float]:
    """Checkpoint score for recovery: accuracy on labelled `data`."""
    def score(module: nn.Module) -> float:
        return float(evaluate(TorchRunner(module), data).accuracy or 0.0)
    return score


def _example_input(model: Model, batches: list | None) -> torch.Tensor | None:
    if batches:
        return batches[0][0]
    if model.inputs and model.inputs[0].is_static:
        return torch.zeros(model.inputs[0].shape)  # type: ignore[arg-type]
    return None


def _measure(original: nn.Module, work: nn.Module, data: DataSource, report: CompressionReport,
             progress: Progress, cancel: CancelToken) -> None:
    """Metric and single-thread latency before and after, on the same data."""
    before_runner, after_runner = TorchRunner(original), TorchRunner(work)
    before: Metrics = evaluate(before_runner, data, progress=sub_progress(progress, 0, 0.4),
                               cancel=cancel)
    after: Metrics = evaluate(after_runner, data, reference=before_runner,
                              progress=sub_progress(progress, 0.4, 0.8), cancel=cancel)
    report.metrics_before, report.metrics_after = before.to_dict(), after.to_dict()
    example = next(iter(data.batches(CALIBRATION_BATCH)))[0]
    progress(0.85, "timing the original")
    report.latency_before_ms = measure_latency(before_runner, example, repeats=20,
                                               cancel=cancel).median_ms
    progress(0.95, "timing the compressed model")
    report.latency_after_ms = measure_latency(after_runner, example, repeats=20,
                                              cancel=cancel).median_ms

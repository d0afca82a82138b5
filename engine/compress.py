"""compress(model, plan, data) -> (compressed, report): apply a plan and say honestly what it did.

The original model is never modified. The report lists, per layer, the sparsity, bits and rank
actually achieved and the bytes before and after; for the whole model, the size, the metric and
the CPU latency before and after. Sizes after compression count what an exporter that stores
integer codes (and, where it pays, a bitmask of the non-zeros) really has to write.

A model with a torch module is compressed module-wise (engine.methods.apply); any other (an ONNX
graph, weights only) tensor by tensor through its backend (engine.tensor_compress). Either way
the report is read off what is stored, and then every planned change is checked to have
happened (:func:`check_planned_changes`): a plan that silently did less is an error, not a
smaller number in a table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from engine.backends.base import RUN, TORCH_MODULE
from engine.backends.weights import WeightsBackend
from engine.compressed import CompressedModel
from engine.data import DataSource
from engine.errors import SlimscopeError
from engine.evaluate import (
    Metrics,
    Runner,
    TorchRunner,
    evaluate,
    fixed_batch_of,
    measure_latency,
    torch_arguments,
)
from engine.finetune import RecoveryConfig, StepReport, recover
from engine.formats.guard import quote
from engine.jobs import NEVER_CANCELLED, CancelToken, Cancelled, Progress, no_progress, sub_progress
from engine.methods.apply import apply_plan, module_layers
from engine.methods.base import is_weight_key, recurrent_layer_of
from engine.methods.quantize import FLOAT_DTYPES
from engine.model import Model, chunks
from engine.plan import LayerPlan, Plan
from engine.storage import storage_bytes
from engine.tensor_compress import apply_tensor_plan

#: Calibration samples used by gradient methods and static activation quantization.
DEFAULT_CALIBRATION_SAMPLES = 128
CALIBRATION_BATCH = 32
FLOAT_BITS = 32
#: Where recovery fine-tuning spans the progress bar: it takes nearly all of the time (300 demo
#: steps: ~9 s, against ~1 s for surgery and measuring together), so it gets nearly all of the bar.
RECOVERY_START, RECOVERY_END = 0.05, 0.95


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
        owner = recurrent_layer_of(name) or name.rsplit(".", 1)[0]
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
        weights_after = [p for name, p in after.items() if is_weight_key(name)]
        numel = sum(p.numel() for p in weights_after)
        zeros = sum(int(p.numel() - torch.count_nonzero(p)) for p in weights_after)
        weight_names = [name for name in after if is_weight_key(name)]
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


def calibration_batches(data: DataSource, samples: int = DEFAULT_CALIBRATION_SAMPLES,
                        module: nn.Module | None = None) -> list[tuple[Any, torch.Tensor | None]]:
    """A small re-iterable list of torch batches for gradient scores and structured tracing.

    With `module`, each batch's inputs are its positional arguments (a tuple when the model
    takes several named inputs) in pieces of its fixed batch size when it has one.
    """
    batch_size = (fixed_batch_of(module) if module is not None else None) or CALIBRATION_BATCH
    batches = []
    for inputs, labels in data.head(samples).batches(batch_size):
        if module is not None:
            arguments = torch_arguments(module, inputs)
            model_inputs: Any = arguments[0] if len(arguments) == 1 else arguments
        else:
            model_inputs = torch.from_numpy(np.ascontiguousarray(inputs))
        batches.append((model_inputs, None if labels is None else torch.from_numpy(labels).long()))
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
    on_step: Callable[[StepReport], None] | None = None,
) -> tuple[CompressedModel, CompressionReport]:
    """Apply `plan` to a copy of `model`; evaluate and time both when `data` is given.

    `calibration` feeds gradient-based pruning and structured tracing; it defaults to the
    first samples of `data`. When the plan has a `recovery` section, the compressed model is
    then fine-tuned against the original on `train_data`, keeping the checkpoint that scores
    best on `calibration` (never on the evaluation data); `on_step` hears of every update
    (loss, learning rate, metric), for live curves. A model without a torch module is
    compressed through its backend (:func:`compress_tensors`).
    """
    if model.module is None or not model.can(TORCH_MODULE):
        return compress_tensors(model, plan, data, calibration=calibration, measure=measure,
                                progress=progress, cancel=cancel)
    original = model.require_module("compression")
    recovery = RecoveryConfig.from_dict(plan.recovery) if plan.recovery else None
    if recovery is not None and train_data is None:
        raise SlimscopeError("the plan's recovery section needs training data (--train-data)")
    model.require_finite("compression")
    calibration = calibration or data
    batches = calibration_batches(calibration, module=original) if calibration is not None else None
    example = _example_input(model, batches)
    measuring = measure and data is not None
    surgery_end = RECOVERY_START if recovery else (0.6 if measuring else 1.0)
    recovery_end = RECOVERY_END if measuring else 1.0
    compressed = apply_plan(
        original, plan, calibration=batches, example_inputs=example, why_not=model.why_not,
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
            progress=sub_progress(progress, surgery_end, recovery_end), cancel=cancel,
            on_step=on_step)
        if result.cancelled:
            raise Cancelled("recovery fine-tuning was cancelled")
    report = build_report(original, compressed, model)
    check_planned_changes(model, compressed)
    if recovery is not None:
        report.recovery = {"steps": result.steps, "seconds": result.seconds,
                           "kept_step": result.kept_step, "kept_metric": result.kept_metric}
        report.metrics_one_shot = one_shot.to_dict() if one_shot else None
    if measuring:
        assert data is not None
        report.data = data.describe()
        _measure(TorchRunner(original), TorchRunner(compressed.module), data, report,
                 sub_progress(progress, recovery_end if recovery else 0.6, 1.0), cancel)
    progress(1.0, f"done: {report.size_ratio:.3f}x the size")
    return compressed, report


#: Why a weights-only compression has no metric (the report's note).
NO_GRAPH_NOTE = "no accuracy figure: the file holds weights only, no graph"


def compress_tensors(
    model: Model,
    plan: Plan,
    data: DataSource | None = None,
    *,
    calibration: DataSource | None = None,
    measure: bool = True,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> tuple[CompressedModel, CompressionReport]:
    """compress() for a model without a torch module: weights changed through its backend.

    The metric and latency come from the backend's runners, when the model can run; a file of
    weights alone has no metric, and its report says so. GPTQ and OBS collect their layer-input
    statistics from `calibration` (default: `data`).
    """
    assert model.backend is not None
    model.require_finite("compression")
    measuring = measure and data is not None and model.can(RUN)
    compressed, factors = apply_tensor_plan(
        model, plan, calibration=calibration or data,
        progress=sub_progress(progress, 0.0, 0.5 if measuring else 0.9), cancel=cancel)
    report = build_tensor_report(model, compressed, factors)
    check_planned_changes(model, compressed, factors)
    if not model.can(RUN):
        report.notes.append(NO_GRAPH_NOTE if isinstance(model.backend, WeightsBackend)
                            else f"no accuracy figure: {model.why_not(RUN)}")
    elif measuring:
        assert data is not None and compressed.backend is not None
        report.data = data.describe()
        _measure(model.backend.runner(), compressed.backend.runner(), data, report,
                 sub_progress(progress, 0.5, 1.0), cancel)
    progress(1.0, f"done: {report.size_ratio:.3f}x the size")
    return compressed, report


def _as_torch(array: np.ndarray) -> torch.Tensor:
    """A torch tensor of a stored numpy array (bf16 and read-only views included)."""
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: same bits as torch's
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _code_bits(model: Model, key: str) -> int | None:
    """The width of the integer codes a quantized file stores `key` as (its backend reads the
    decoded floats and writes changes back as codes on the same scale), or None."""
    decoders = getattr(model.tensors, "decoders", None)
    if not decoders or key not in decoders:
        return None
    return int(model.tensors.itemsizes[key] * 8)  # the store keeps the stored width, no read


def _stored_tensor_bytes(compressed: CompressedModel, key: str, array: np.ndarray,
                         native_bits: int | None = None) -> int:
    """tensor_storage_bytes for a numpy array, counted a chunk at a time; `native_bits` is the
    width the file stores an unchanged-format tensor in (int8 codes of a quantized file)."""
    if array.dtype.kind not in "fiub" and array.dtype.name != "bfloat16":
        return array.nbytes
    quant = compressed.quantized.get(key)
    if quant is not None:
        bits = quant.bits
    elif key in compressed.cast:
        bits = torch.finfo(compressed.cast[key]).bits
    else:
        bits = native_bits or array.dtype.itemsize * 8
    nonzero = sum(int(np.count_nonzero(chunk)) for chunk in chunks(array))
    return storage_bytes(array.size, nonzero, bits, quant.overhead_bytes if quant else 0)


def build_tensor_report(model: Model, compressed: CompressedModel,
                        factors: dict[str, tuple[str, ...]] | None = None) -> CompressionReport:
    """Per-layer and whole-model sizes before and after, from the tensors the backends store."""
    assert compressed.backend is not None
    factors = factors or {}
    after = compressed.backend
    layers: list[LayerReport] = []
    for layer in model.layers:
        weight_keys = list(factors.get(layer.weight_key, (layer.weight_key,)))
        bias_keys = [layer.bias_key] if layer.bias_key else []
        weights = {key: np.asarray(after.read(key)) for key in weight_keys}
        numel = sum(w.size for w in weights.values())
        zeros = sum(w.size - int(np.count_nonzero(w)) for w in weights.values())
        code_bits = {key: _code_bits(model, key) for key in weight_keys}
        bits = min(code_bits[key] or _stored_bits(compressed, key, w) for key, w in weights.items())
        stored = {**weights, **{key: np.asarray(after.read(key)) for key in bias_keys}}
        layers.append(LayerReport(
            name=layer.name,
            kind=layer.kind,
            params_before=layer.params,
            params_after=sum(v.size for v in stored.values()),
            bytes_before=layer.nbytes,
            bytes_after=sum(_stored_tensor_bytes(compressed, k, v, code_bits.get(k))
                            for k, v in stored.items()),
            sparsity=zeros / numel if numel else 0.0,
            bits=bits,
            rank=compressed.low_rank.get(layer.name),
        ))
    bytes_after = params_after = 0
    for key in model.tensors.unique_keys():
        for stored_key in factors.get(key, (key,)):
            value = np.asarray(after.read(stored_key))
            bytes_after += _stored_tensor_bytes(compressed, stored_key, value,
                                                _code_bits(model, stored_key))
            params_after += value.size
    return CompressionReport(
        layers=layers,
        bytes_before=model.nbytes,
        bytes_after=bytes_after,
        params_before=model.params,
        params_after=params_after,
        notes=list(compressed.notes),
    )


def _stored_bits(compressed: CompressedModel, key: str, array: np.ndarray) -> int:
    if key in compressed.quantized:
        return compressed.quantized[key].bits
    if key in compressed.cast:
        return torch.finfo(compressed.cast[key]).bits
    return array.dtype.itemsize * 8


# -- the honesty check -------------------------------------------------------------------
@dataclass
class _StoredLayer:
    """One layer as the check sees it: its plan, its tensors before, and as stored after."""

    name: str
    plan: LayerPlan
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    #: Keys in `after` that hold the layer's weight (two for a factorized layer).
    weight_keys: list[str]
    #: Keys in `after` whose storage is tied to a layer the plan changes.
    tied: set[str] = field(default_factory=set)


def check_planned_changes(model: Model, compressed: CompressedModel,
                          factors: dict[str, tuple[str, ...]] | None = None) -> None:
    """Raise one SlimscopeError line for the first planned change that the stored weights lack.

    Planned sparsity must be reached (within one element per output row), N:M groups hold at
    most N non-zeros, planned bits are stored as codes of that width that decode to the stored
    values, planned casts round-trip, planned ranks are applied, and a layer planned `keep` is
    byte-identical to the original. A change a method skipped and said so in the notes (a
    rank that would not pay, output channels structured pruning must keep) is reported, not
    hidden, and passes.
    """
    plan = Plan.from_dict(compressed.plan)
    layers = (_module_layers(model, compressed, plan) if compressed.module is not None
              else _backend_layers(model, compressed, plan, factors or {}))
    announced = {note.split(":", 1)[0] for note in compressed.notes}
    reshaped = any(lp.method == "structured" for lp in _prunings(plan))
    retrained = plan.recovery is not None
    global_layers: list[_StoredLayer] = []
    for layer in layers:  # one at a time: a weights-only file may be larger than memory
        if layer.plan.keep:
            if not retrained:
                _check_kept(layer, reshaped)
            continue
        _check_pruning(layer, compressed, layer.name in announced)
        _check_quantization(layer, compressed)
        _check_low_rank(layer, compressed, layer.name in announced)
        if layer.plan.pruning is not None and layer.plan.pruning.method == "magnitude-global":
            global_layers.append(_counts_only(layer))
    _check_global_sparsity(global_layers)


def _prunings(plan: Plan) -> Iterable[Any]:
    """Every pruning section the plan sets, at any level."""
    for sections in (plan.defaults, *plan.kinds.values(), *plan.patterns.values(),
                     *plan.layers.values()):
        if sections.get("pruning") is not None:
            yield sections["pruning"]


def _counts_only(layer: _StoredLayer) -> _StoredLayer:
    """The layer with its weights replaced by what the global check needs: zeros and rows."""
    weights = [layer.after[key] for key in layer.weight_keys]
    summary = {"zeros": torch.tensor(_zeros(weights)), "numel": torch.tensor(
        sum(w.numel() for w in weights)), "rows": torch.tensor(sum(w.shape[0] for w in weights))}
    return _StoredLayer(layer.name, layer.plan, {}, summary, [])


def _module_layers(model: Model, compressed: CompressedModel, plan: Plan
                   ) -> list[_StoredLayer]:
    """Layers of a torch module; a tied weight is listed under every layer that uses it."""
    assert model.module is not None and compressed.module is not None
    resolved = plan.resolve(module_layers(model.module))
    before = _params_by_layer(model.module, resolved)
    after = _params_by_layer(compressed.module, resolved)
    layers = [_StoredLayer(name, layer_plan, before[name], after[name],
                           [key for key in after[name] if is_weight_key(key)])
              for name, layer_plan in resolved.items()]
    changed = {tensor.data_ptr() for layer in layers if not layer.plan.keep
               for tensor in layer.after.values()}
    for layer in layers:  # a keep layer tied to a changed one changes with it
        layer.tied = {key for key, tensor in layer.after.items() if tensor.data_ptr() in changed}
    return layers


def _params_by_layer(module: nn.Module, names: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each layer's parameters (its own and its children's, e.g. two factors), in one pass."""
    found: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for param_name, param in module.named_parameters(remove_duplicate=False):
        recurrent = recurrent_layer_of(param_name)
        if recurrent in found:
            found[recurrent][param_name] = param.detach()
            continue
        parts = param_name.split(".")[:-1]
        for depth in range(1, len(parts) + 1):
            owner = ".".join(parts[:depth])
            if owner in found:
                found[owner][param_name] = param.detach()
    return found


def _backend_layers(model: Model, compressed: CompressedModel, plan: Plan,
                    factors: dict[str, tuple[str, ...]]) -> Iterator[_StoredLayer]:
    assert model.backend is not None
    if compressed.backend is None:
        raise SlimscopeError("the compressed model holds neither a module nor a backend")
    resolved = plan.resolve(model.layers)
    for layer in model.layers:
        bias = [layer.bias_key] if layer.bias_key else []
        weight_keys = list(factors.get(layer.weight_key, (layer.weight_key,)))
        before = {key: _as_torch(model.backend.read(key)) for key in [layer.weight_key, *bias]}
        after = {key: _as_torch(compressed.backend.read(key)) for key in [*weight_keys, *bias]}
        yield _StoredLayer(layer.name, resolved[layer.name], before, after, weight_keys)


def _fail(layer: _StoredLayer, planned: str, achieved: str) -> None:
    raise SlimscopeError(f"layer {quote(layer.name)}: the plan asks for {planned}, but the "
                         f"stored weights have {achieved}")


def _check_kept(layer: _StoredLayer, reshaped: bool) -> None:
    """A `keep` layer is byte-identical (unless structured pruning of a neighbour resized it)."""
    for key, before in layer.before.items():
        if key in layer.tied:
            continue
        after = layer.after.get(key)
        if after is None:
            _fail(layer, "keep", f"no tensor {quote(key)}")
        if after.shape != before.shape and reshaped:
            continue
        if after.dtype != before.dtype or after.shape != before.shape:
            _fail(layer, "keep", f"{quote(key)} as {after.dtype} {list(after.shape)} instead "
                  f"of {before.dtype} {list(before.shape)}")
        if not torch.equal(_bytes(after), _bytes(before)):
            changed = int((after != before).sum())
            _fail(layer, "keep", f"{changed} changed values in {quote(key)}")


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8)


def _zeros(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() - int(torch.count_nonzero(t)) for t in tensors)


def _check_pruning(layer: _StoredLayer, compressed: CompressedModel, announced: bool) -> None:
    pruning = layer.plan.pruning
    if pruning is None or pruning.method == "magnitude-global":  # global: checked as a whole
        return
    weights = [layer.after[key] for key in layer.weight_keys]
    if pruning.is_nm:  # groups laid out as engine.methods.nm_sparsity lays them
        n, m = pruning.nm
        for weight in weights:
            groups = weight.movedim(1, -1).reshape(-1, m)
            worst = int(torch.count_nonzero(groups, dim=1).max()) if groups.numel() else 0
            if worst > n:
                _fail(layer, f"N:M {n}:{m} sparsity", f"{worst} non-zeros in a group of {m}")
        return
    if pruning.method == "structured":
        before = layer.before[next(iter(layer.before))].shape[0]
        wanted = min(int(round((pruning.amount or 0.0) * before)), before - 1)
        now = weights[0].shape[0] if weights else before
        if wanted and now > before - wanted and not announced:
            _fail(layer, f"{wanted} of {before} output channels removed",
                  f"{before - now} removed")
        return
    numel = sum(w.numel() for w in weights)
    wanted = int(round((pruning.amount or 0.0) * numel)) - sum(w.shape[0] for w in weights)
    zeros = _zeros(weights)
    if zeros < wanted:
        _fail(layer, f"sparsity {pruning.amount:.3f} ({pruning.method})",
              f"sparsity {zeros / numel:.3f}")


def _check_global_sparsity(chosen: list[_StoredLayer]) -> None:
    """magnitude-global: one amount over all its layers together (each layer may differ);
    `chosen` hold counts (see _counts_only)."""
    if not chosen:
        return
    amount = chosen[0].plan.pruning.amount or 0.0
    zeros, numel, rows = (sum(int(layer.after[what]) for layer in chosen)
                          for what in ("zeros", "numel", "rows"))
    if zeros < int(round(amount * numel)) - rows:
        _fail(chosen[0], f"global sparsity {amount:.3f} over {len(chosen)} layers",
              f"{zeros / numel:.3f}")


def _check_quantization(layer: _StoredLayer, compressed: CompressedModel) -> None:
    quant = layer.plan.quantization
    if quant is None:
        return
    for key in layer.weight_keys:
        stored = layer.after[key]
        if quant.is_float:
            dtype = compressed.cast.get(key)
            if dtype != FLOAT_DTYPES[str(quant.bits)]:
                _fail(layer, f"a {quant.bits} cast", f"{dtype or stored.dtype} recorded")
            assert dtype is not None
            if not torch.equal(stored.to(dtype).to(stored.dtype), stored):
                _fail(layer, f"a {quant.bits} cast", f"values {quant.bits} cannot hold")
            continue
        codes = compressed.quantized.get(key)
        if codes is None:
            _fail(layer, f"{quant.bits}-bit codes", "no codes")
        lo, hi = ((-(2 ** (quant.bits - 1) - 1), 2 ** (quant.bits - 1) - 1) if quant.symmetric
                  else (0, 2 ** quant.bits - 1))
        low, high = int(codes.codes.min()), int(codes.codes.max())
        if codes.bits != quant.bits or low < lo or high > hi:
            _fail(layer, f"{quant.bits}-bit codes in [{lo}, {hi}]",
                  f"{codes.bits}-bit codes in [{low}, {high}]")
        decoded = codes.dequantize().to(stored.dtype).to(torch.float32)
        tolerance = 1e-3 * float(codes.scale.abs().max())
        if decoded.shape != stored.shape or not torch.allclose(
                decoded, stored.to(torch.float32), rtol=0.0, atol=tolerance):
            _fail(layer, f"{quant.bits}-bit codes", "values the codes do not decode to")


def _check_low_rank(layer: _StoredLayer, compressed: CompressedModel, announced: bool) -> None:
    low_rank = layer.plan.low_rank
    if low_rank is None or announced:
        return
    rank = compressed.low_rank.get(layer.name)
    if rank is None or len(layer.weight_keys) != 2:
        _fail(layer, "a low-rank factorization", "the layer whole")
    if low_rank.rank is not None and rank != low_rank.rank:
        _fail(layer, f"rank {low_rank.rank}", f"rank {rank}")


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


def _measure(before_runner: Runner, after_runner: Runner, data: DataSource,
             report: CompressionReport, progress: Progress, cancel: CancelToken) -> None:
    """Metric and single-thread latency before and after, on the same data."""
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

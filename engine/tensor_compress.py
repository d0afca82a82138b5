"""A plan applied to a model without a torch module (ONNX graph, weights only), tensor by tensor.

Magnitude (per layer and global), N:M, uniform 2..8-bit codes and fp16/bf16 casts need nothing
but the weight, so they run on any backend. The weights are read through the backend, turned
into torch tensors, and handed to the very same registered methods the torch path runs
(:mod:`engine.methods`): each planned weight sits in a small stand-in module under an alias
(``t0``, ``t1``, ...), so layer names of any spelling are safe and no maths is written twice.
The result is a new backend copy (``Backend.with_weights``): masks applied, codes dequantized,
casts rounded; the original backend is never changed.

GPTQ and OBS pruning need each layer's input statistics ``XᵀX``: for an ONNX graph they are
collected once, on the original model, by ONNX Runtime
(:func:`engine.sensitivity_backends.collect_input_moments`), and the weight is handed to the
same maths as the torch path (:func:`engine.methods.gptq.quantize_layer`,
:func:`engine.methods.obs.prune_layer`) laid out as ``[out, in]`` (a MatMul's ``[in, out]``
transposed) against them. Unlike the torch path, later layers' statistics are not re-collected
on the already-compressed earlier layers.

Methods that need more than the weight ask the backend first, before any work, and refuse in
one line naming the layer: gradient and Taylor pruning need gradients, structured pruning graph
surgery, low-rank a backend that can factorize (see :class:`Factorizing`), recovery training,
GPTQ and OBS an ONNX graph whose layer multiplies an activation directly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from engine.backends.base import (
    BIAS_CORRECTION, GRADIENTS, GRAPH_SURGERY, LOW_RANK, RUN, TRAIN, Backend)
from engine.compressed import CompressedModel, QuantizedWeight
from engine.errors import PlanError, SlimscopeError
from engine.formats.guard import quote
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress, sub_progress
from engine.methods import REGISTRY, STAGES, Context
from engine.methods.apply import method_names
from engine.methods.base import RECURRENT_KINDS
from engine.plan import LayerPlan, LowRank, Plan

if TYPE_CHECKING:
    from engine.data import DataSource

if TYPE_CHECKING:
    from engine.model import Layer, Model

#: Registered methods that work on a weight alone, so on every backend.
WEIGHT_ONLY_METHODS = frozenset({"magnitude", "magnitude-global", "nm", "uniform", "cast"})
#: Registered methods that compensate with layer-input statistics (ONNX graphs only here).
STATISTICS_METHODS = {"gptq": "GPTQ", "obs": "OBS pruning"}
#: Moment forms (engine.sensitivity_backends.input_forms) that hold the full XᵀX.
FULL_FORMS = ("right", "left", "gemm", "conv1x1", "patch")
#: Calibration samples statistics are collected on (as engine.compress's default).
CALIBRATION_SAMPLES = 128
#: Pruning method -> the capability it needs beyond the weight, and what it is called.
_PRUNING_NEEDS = {"gradient": (GRADIENTS, "gradient pruning"),
                  "taylor": (GRADIENTS, "Taylor pruning"),
                  "structured": (GRAPH_SURGERY, "structured pruning")}


@runtime_checkable
class Factorizing(Protocol):
    """A backend that can replace layers by two thinner ones (truncated SVD by graph rewrite).

    `settings` maps weight keys to their low-rank section; the answer is the rewritten copy and,
    per weight key actually factorized, the rank and the keys of the factors' weights (first,
    second). A weight left whole (the rank would not pay) is simply absent.
    """

    def factorize(self, settings: Mapping[str, LowRank]
                  ) -> tuple[Backend, dict[str, tuple[int, tuple[str, ...]]]]: ...


class _Holder(nn.Module):
    """One planned weight (and its bias, for casts) where the registered methods look for it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None


def check_tensor_plan(model: "Model", plan: Plan, resolved: Mapping[str, LayerPlan]) -> None:
    """Refuse, in one line naming the layer, any planned method this model's backend cannot do.

    Runs before any work, so a plan that cannot finish does not spend minutes first.
    """
    if plan.recovery and not model.can(TRAIN):
        raise SlimscopeError(f"the plan's recovery section cannot run on {model.path.name}: "
                             f"{model.why_not(TRAIN)}")
    compensated = {name: [m for m in method_names(p) if m in STATISTICS_METHODS]
                   for name, p in resolved.items() if not _is_awq(p)}
    forms = _forms(model, [model.layer(n).weight_key for n, p in resolved.items()
                           if compensated.get(n) or _is_awq(p)])
    coded = getattr(model.tensors, "decoders", {})
    for name, layer_plan in resolved.items():
        if layer_plan.quantization is not None and model.layer(name).weight_key in coded:
            raise PlanError(f"layer {quote(name)}: {quote(model.path.name)} already stores it as "
                            "integer codes on fixed scales; quantizing it again is not supported "
                            "(prune it, or open the float model it was made from)")
        if layer_plan.bias_correction and not layer_plan.keep and not model.can(BIAS_CORRECTION):
            raise PlanError(f"layer {quote(name)}: bias correction is not available for "
                            f"{model.path.name}: {model.why_not(BIAS_CORRECTION)}")
        for method_name in compensated.get(name, ()):
            _check_compensated(model, name, layer_plan, method_name, forms)
        if _is_awq(layer_plan):
            _check_awq(model, name, layer_plan, forms)
        pruning = layer_plan.pruning
        if pruning is not None and pruning.method in _PRUNING_NEEDS:
            capability, what = _PRUNING_NEEDS[pruning.method]
            if not model.can(capability):
                raise SlimscopeError(f"layer {quote(name)}: {what} is not available for "
                                     f"{model.path.name}: {model.why_not(capability)}")
            raise SlimscopeError(f"layer {quote(name)}: {what} on a {model.backend.name} model "
                                 "is not built yet; open a PyTorch module of the same model")
        if layer_plan.low_rank is not None:
            if not model.can(LOW_RANK):
                raise SlimscopeError(f"layer {quote(name)}: low-rank factorization is not "
                                     f"available for {model.path.name}: {model.why_not(LOW_RANK)}")
            if not isinstance(model.backend, Factorizing):
                raise SlimscopeError(f"layer {quote(name)}: low-rank factorization of a "
                                     f"{model.backend.name} model is not built yet")
            why_not_factorize = getattr(model.backend, "why_not_factorize", None)
            problem = why_not_factorize(model.layer(name).weight_key) if why_not_factorize else None
            if problem:
                raise SlimscopeError(f"layer {quote(name)}: {problem}")
            if layer_plan.pruning is not None or layer_plan.quantization is not None:
                raise PlanError(f"layer {quote(name)}: low-rank together with pruning or "
                                f"quantization is not built yet for {model.backend.name} models; "
                                "plan one of them for this layer")


def _forms(model: "Model", keys: list[str]) -> dict[str, tuple[str, bool]]:
    if not keys or model.onnx_model is None:
        return {}
    from engine.sensitivity_backends import input_forms  # deferred: it imports the sweep

    return input_forms(model, keys)


def _check_compensated(model: "Model", name: str, layer_plan: LayerPlan, method_name: str,
                       forms: Mapping[str, tuple[str, bool]]) -> None:
    """Refuse GPTQ/OBS where this backend cannot collect the layer's full input statistics."""
    what = STATISTICS_METHODS[method_name]
    if model.onnx_model is None or not model.can(RUN):
        raise PlanError(f"layer {quote(name)}: {what} needs layer-input statistics from running "
                        f"the model; {model.path.name} cannot run here (open a PyTorch module "
                        "or an ONNX graph of it)")
    form = forms.get(model.layer(name).weight_key, ("", False))
    if form[0] not in FULL_FORMS:
        raise PlanError(f"layer {quote(name)}: {what} needs its input statistics, which are "
                        "collected for MatMul, Gemm and 1-D/2-D Conv weights (explicit padding) "
                        "that multiply an activation directly; plan rtn/magnitude for it")
    quant = layer_plan.quantization
    if method_name == "gptq" and quant is not None and quant.granularity == "group" \
            and _transposed(form):
        raise PlanError(f"layer {quote(name)}: GPTQ with groups on a weight stored [in, out] "
                        "is not built yet; use per-channel granularity for it")


def _is_awq(layer_plan: LayerPlan) -> bool:
    quant = layer_plan.quantization
    return quant is not None and quant.method == "awq"


def _check_awq(model: "Model", name: str, layer_plan: LayerPlan,
               forms: Mapping[str, tuple[str, bool]]) -> None:
    """Refuse AWQ where its input-channel scale cannot be applied by graph rewrite."""
    if model.onnx_model is None or not model.can(RUN):
        raise PlanError(f"layer {quote(name)}: AWQ needs layer-input statistics and a graph "
                        f"rewrite; {model.path.name} is not a runnable ONNX graph (plan rtn or "
                        "gptq for it)")
    if forms.get(model.layer(name).weight_key, ("", False))[0] not in ("right", "gemm"):
        raise PlanError(f"layer {quote(name)}: AWQ is built for MatMul (X @ W) and Gemm weights "
                        "that multiply an activation directly; plan rtn or gptq for it")
    if layer_plan.pruning is not None or layer_plan.low_rank is not None:
        raise PlanError(f"layer {quote(name)}: AWQ together with pruning or low-rank is not "
                        "built yet; plan AWQ alone for this layer")


def _apply_awq(backend: Backend, awq: list[tuple["Layer", LayerPlan]],
               stats: Mapping[str, tuple[Any, bool]], result: CompressedModel,
               planned: set[str], cancel: CancelToken) -> Backend:
    """AWQ (engine.methods.awq) for the ONNX MatMul/Gemm weights in `awq`: per activation, one
    input-channel scale searched for the layers reading it, the activation divided by it in
    the graph (engine.methods.smoothquant.scale_inputs: a LayerNorm fold or a Mul), and the
    scaled weights rounded to nearest. Codes are kept ``[out, in]`` (MatMulNBits' layout)."""
    from engine.backends.onnx_graph import OnnxBackend
    from engine.methods.awq import rtn, search_scales
    from engine.methods.smoothquant import find_targets, scale_inputs

    proto = backend.full_proto()  # type: ignore[attr-defined]
    targets = find_targets(proto)
    by_weight = {t.weight: t for group in targets.values() for t in group}
    groups: dict[str, list[tuple["Layer", LayerPlan, Any]]] = defaultdict(list)
    for layer, layer_plan in awq:
        found = by_weight.get(layer.weight_key)
        if found is None:
            raise PlanError(f"layer {quote(layer.name)}: AWQ needs a 2-D MatMul/Gemm weight that "
                            "only this node reads and that multiplies an activation directly; "
                            "plan rtn or gptq for it")
        groups[found.activation].append((layer, layer_plan, found))
    scales: dict[str, np.ndarray] = {}
    replacements: dict[str, np.ndarray] = {}
    for activation, members in groups.items():
        cancel.check()
        settings = members[0][1].quantization
        assert settings is not None
        for layer, layer_plan, _ in members[1:]:
            if layer_plan.quantization != settings:
                raise PlanError(f"layer {quote(layer.name)} reads the same input as "
                                f"{quote(members[0][0].name)} but its AWQ settings differ; "
                                "give them the same quantization")
        layer_stats, _ = stats[members[0][0].weight_key]
        views = []
        for layer, _, found in members:
            stored = torch.from_numpy(np.array(backend.read(layer.weight_key), dtype=np.float32))
            views.append(stored.T if found.in_axis == 0 else stored)  # [out, in]
            if settings.granularity == "group" and stored.shape[found.in_axis] % settings.group_size:
                raise PlanError(f"layer {quote(layer.name)}: quantization.group_size "
                                f"{settings.group_size} does not divide its "
                                f"{stored.shape[found.in_axis]} inputs")
        s, error, errors = search_scales(views, layer_stats.xtx[0], layer_stats.channel_mean_abs,
                                         settings)
        exponent = min(errors, key=errors.get)
        ratio = error / errors[0.0] if errors.get(0.0) else 1.0
        scales[activation] = s.numpy()
        for (layer, _, found), view in zip(members, views):
            q = rtn((view.double() * s[None, :]).float(), settings)
            value = q.dequantize()
            replacements[layer.weight_key] = (value.T if found.in_axis == 0 else value).numpy()
            result.quantized[layer.weight_key] = q
            result.notes.append(f"{layer.name}: AWQ scale exponent {exponent:g}, calibration "
                                f"output error {ratio:.3f}x round to nearest's")
    proto, inserted = scale_inputs(proto, scales, {a: [m[2] for m in groups[a]] for a in scales},
                                   fold_matmul=False, keep=planned)
    if inserted:
        result.notes.append(f"AWQ: {len(inserted)} Mul nodes divide activations by their scale "
                            "(the rest folded into LayerNormalization)")
    return OnnxBackend(proto, backend.path).with_weights(replacements)  # type: ignore[attr-defined]


def _transposed(form: tuple[str, bool]) -> bool:
    """Whether the stored weight is ``[in, out]`` (MatMul X@W, Gemm without transB)."""
    return form[0] == "right" or (form[0] == "gemm" and not form[1])


def apply_tensor_plan(
    model: "Model",
    plan: Plan,
    *,
    calibration: "DataSource | None" = None,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> tuple[CompressedModel, dict[str, tuple[str, ...]]]:
    """Compress a copy of `model`'s weights as `plan` says; see the module docstring.

    `calibration` feeds GPTQ and OBS (their first :data:`CALIBRATION_SAMPLES` samples).
    Also answers, per weight key a backend factorized, the keys of the factors' weights.
    """
    assert model.backend is not None
    resolved = plan.resolve(model.layers)
    check_tensor_plan(model, plan, resolved)
    owners = _weight_owners(model, resolved)
    result = CompressedModel(
        module=None,
        plan=plan.to_dict(),
        activation_quant=plan.activation_quant.to_dict() if plan.activation_quant else None,
    )
    backend = model.backend
    low_rank = {layer.weight_key: layer_plan.low_rank for layer, layer_plan in owners
                if layer_plan.low_rank is not None}
    factors: dict[str, tuple[str, ...]] = {}
    if low_rank:
        progress(0.0, f"low-rank: {len(low_rank)} layers")
        assert isinstance(backend, Factorizing)
        backend, factorized = backend.factorize(low_rank)
        for layer, _ in owners:
            if layer.weight_key in factorized:
                result.low_rank[layer.name], factors[layer.weight_key] = factorized[layer.weight_key]
            elif layer.weight_key in low_rank:
                result.notes.append(f"{layer.name}: the requested rank would not reduce "
                                    "parameters; layer kept whole")
    awq = [(layer, layer_plan) for layer, layer_plan in owners if _is_awq(layer_plan)]
    work = [(layer, layer_plan) for layer, layer_plan in owners
            if not _is_awq(layer_plan) and any(m in WEIGHT_ONLY_METHODS or m in STATISTICS_METHODS
                                               for m in method_names(layer_plan))]
    stats = _statistics(model, work + awq, calibration, sub_progress(progress, 0.0, 0.5), cancel)
    if awq:
        planned = {key for layer, _ in owners for key in (layer.weight_key, layer.bias_key) if key}
        backend = _apply_awq(backend, awq, stats, result, planned, cancel)
    if work:
        replacements = _run_methods(model, work, result,
                                    sub_progress(progress, 0.5 if stats else 0.1, 0.95), cancel,
                                    stats)
        backend = backend.with_weights(replacements)
    result.backend = backend
    progress(1.0, "compression done")
    return result, factors


def _weight_owners(model: "Model", resolved: Mapping[str, LayerPlan]
                   ) -> list[tuple["Layer", LayerPlan]]:
    """One (layer, plan) per stored weight; layers that share a weight must share its plan."""
    first: dict[str, tuple["Layer", LayerPlan]] = {}
    for layer in model.layers:
        layer_plan = resolved[layer.name]
        owner = first.get(layer.weight_key)
        if owner is None:
            first[layer.weight_key] = (layer, layer_plan)
        elif owner[1] != layer_plan:
            raise PlanError(f"layer {quote(layer.name)} shares its weight with "
                            f"{quote(owner[0].name)} but the plan treats them differently; "
                            "give both the same settings")
    return [(layer, layer_plan) for layer, layer_plan in first.values() if not layer_plan.keep]


def _statistics(model: "Model", work: list[tuple["Layer", LayerPlan]],
                calibration: "DataSource | None", progress: Progress, cancel: CancelToken
                ) -> dict[str, tuple[Any, bool]]:
    """Per weight key GPTQ/OBS will change, its input statistics (an InputStats) and whether
    the stored weight is ``[in, out]``: one ONNX Runtime pass over the calibration data."""
    keys = [layer.weight_key for layer, layer_plan in work
            if _is_awq(layer_plan) or any(m in STATISTICS_METHODS for m in method_names(layer_plan))]
    if not keys:
        return {}
    if calibration is None:
        raise PlanError("GPTQ, AWQ and OBS pruning of this model need calibration data (--data "
                        "or --calibration)")
    from engine.calibration_stats import InputStats
    from engine.sensitivity_backends import collect_input_moments

    forms = _forms(model, keys)
    magnitudes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    moments = collect_input_moments(model, calibration.head(CALIBRATION_SAMPLES), keys,
                                    progress=progress, cancel=cancel, abs_stats=magnitudes)
    stats = {}
    for key in keys:
        if key not in moments or key not in forms:
            raise PlanError(f"weight {quote(key)}: its layer-input statistics cannot be collected "
                            "(it does not multiply an activation directly); plan rtn for it")
        xtx = torch.from_numpy(np.asarray(moments[key], dtype=np.float64))
        xtx = xtx if xtx.dim() == 3 else xtx[None]  # [groups, d, d]; MatMul/Gemm/1x1: one group
        # GPTQ and OBS are invariant to H's scale: rows = samples keeps H = 2·XᵀX per sample
        stats[key] = (InputStats(xtx=xtx, mean=torch.zeros(xtx.shape[0], xtx.shape[1],
                                                           dtype=torch.float64),
                                 channel_mean_abs=torch.from_numpy(np.asarray(
                                     magnitudes[key][1] if key in magnitudes else np.zeros(0),
                                     dtype=np.float64)),
                                 rows=1, samples=1), _transposed(forms[key]))
    return stats


def _compensate(method_name: str, holder: nn.Module, layers: Mapping[str, LayerPlan],
                scratch: CompressedModel, stats: Mapping[str, tuple[Any, bool]],
                alias_of: Mapping[str, "Layer"], progress: Progress, cancel: CancelToken
                ) -> None:
    """GPTQ or OBS on the stand-ins, each weight seen as ``[out, in]`` against its XᵀX."""
    from engine.methods.gptq import quantize_layer
    from engine.methods.obs import prune_layer

    for i, (alias, layer_plan) in enumerate(layers.items()):
        cancel.check()
        layer = alias_of[alias]
        layer_stats, transposed = stats[layer.weight_key]
        part = holder.get_submodule(alias)
        key = f"{alias}.weight"
        weight = part.weight.detach()
        view = weight.T if transposed else weight
        mask = scratch.masks.get(key)
        mask_view = (mask.T if transposed else mask) if mask is not None else None
        where = f"layer {quote(layer.name)}"
        if method_name == "gptq":
            assert layer_plan.quantization is not None
            q = quantize_layer(view, layer_stats, layer_plan.quantization, mask=mask_view,
                               where=where)
            new = q.dequantize().to(weight.dtype)
            if transposed:  # per-channel scales now run along the stored layout's axis 1
                q = replace(q, codes=q.codes.T.contiguous(),
                            axis=1 if q.axis is not None else None)
                new = new.T
            scratch.quantized[key] = q
        else:
            assert layer_plan.pruning is not None
            pruned, keep = prune_layer(view, layer_stats, layer_plan.pruning, where=where)
            new = (pruned.to(weight.dtype) * keep)
            if transposed:
                new, keep = new.T, keep.T
            scratch.masks[key] = keep if mask is None else (keep & mask)
        part.weight.copy_(new.contiguous())
        progress((i + 1) / len(layers), f"{STATISTICS_METHODS[method_name]}: {layer.name}")


def _run_methods(model: "Model", work: list[tuple["Layer", LayerPlan]], result: CompressedModel,
                 progress: Progress, cancel: CancelToken,
                 stats: Mapping[str, tuple[Any, bool]] | None = None) -> dict[str, np.ndarray]:
    """Run the registered methods on stand-ins (GPTQ/OBS with `stats`, see
    :func:`_compensate`); the replaced tensors by key."""
    assert model.backend is not None
    holder = nn.Module()
    alias_of: dict[str, "Layer"] = {}
    stored_shapes: dict[str, tuple[int, ...]] = {}
    by_method: dict[str, dict[str, LayerPlan]] = defaultdict(dict)
    for i, (layer, layer_plan) in enumerate(work):
        cancel.check()
        alias = f"t{i}"
        casts = layer_plan.quantization is not None and layer_plan.quantization.is_float
        stored = _float_tensor(model, layer, layer.weight_key)
        stored_shapes[alias] = tuple(stored.shape)
        weight = output_rows(layer.kind, stored)
        bias = _float_tensor(model, layer, layer.bias_key) if casts and layer.bias_key else None
        holder.add_module(alias, _Holder(weight, bias))
        alias_of[alias] = layer
        for method_name in method_names(layer_plan):
            by_method[method_name][alias] = layer_plan
    scratch = CompressedModel(module=holder)
    order = sorted(by_method, key=lambda m: STAGES.index(REGISTRY[m].stage))
    for i, method_name in enumerate(order):
        cancel.check()
        stage = sub_progress(progress, i / len(order), (i + 1) / len(order))
        stage(0.0, f"{method_name}: {len(by_method[method_name])} layers")
        with torch.no_grad():
            if method_name in STATISTICS_METHODS:
                _compensate(method_name, holder, by_method[method_name], scratch, stats or {},
                            alias_of, stage, cancel)
            else:
                REGISTRY[method_name].apply(holder, by_method[method_name], scratch,
                                            Context(None, None, stage, cancel))
    replacements: dict[str, np.ndarray] = {}
    for alias, layer in alias_of.items():
        part = holder.get_submodule(alias)
        keys = {"weight": layer.weight_key, "bias": layer.bias_key}
        for param_name, key in keys.items():
            scratch_key = f"{alias}.{param_name}"
            if key is None:
                continue
            value = getattr(part, param_name)
            if value is None:
                continue
            # the weight back in its stored shape (see output_rows); a bias never changed shape
            shape = stored_shapes[alias] if param_name == "weight" else tuple(value.shape)
            if scratch_key in scratch.masks:
                result.masks[key] = scratch.masks[scratch_key].reshape(shape)
            if scratch_key in scratch.quantized:
                result.quantized[key] = stored_layout(scratch.quantized[scratch_key], shape)
            if scratch_key in scratch.cast:
                result.cast[key] = scratch.cast[scratch_key]
            if param_name == "weight" or scratch_key in scratch.cast:
                replacements[key] = value.detach().numpy().reshape(shape)
    result.notes.extend(_rename(note, alias_of) for note in scratch.notes)
    return replacements


def output_rows(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """`weight` with its output rows on axis 0, where the compression methods look for them
    (per-channel scales, group rows): an ONNX recurrent weight ``[D, 4H, in]`` becomes
    ``[D*4H, in]``, one row per gate unit and direction, as torch's ``weight_ih_l0`` and the
    ``[4H, in]`` a graph unsqueezes first already are. Everything else is returned as it is."""
    if kind in RECURRENT_KINDS and weight.dim() == 3:
        return weight.reshape(-1, weight.shape[-1])
    return weight


def stored_layout(quantized: QuantizedWeight, shape: Sequence[int]) -> QuantizedWeight:
    """Codes made on :func:`output_rows`' view, back in the stored `shape`: a per-channel scale
    then runs along axis 1 for one direction, and per row of each direction (groups of a whole
    row) for two; group-wise and per-tensor scales only reshape."""
    shape = tuple(shape)
    if tuple(quantized.codes.shape) == shape:
        return quantized
    codes = quantized.codes.reshape(shape)
    if quantized.axis is None or len(shape) != 3:
        group_scales = (shape[0], -1) if quantized.group_size else tuple(quantized.scale.shape)
        return replace(quantized, codes=codes, scale=quantized.scale.reshape(group_scales),
                       zero_point=quantized.zero_point.reshape(group_scales))
    if shape[0] == 1:
        return replace(quantized, codes=codes, axis=1)
    rows = shape[:2]
    return replace(quantized, codes=codes, axis=None, group_size=shape[2],
                   scale=quantized.scale.reshape(rows),
                   zero_point=quantized.zero_point.reshape(rows))


def _float_tensor(model: "Model", layer: "Layer", key: str) -> torch.Tensor:
    """A float32 copy of a stored tensor; integer tensors (already quantized) are refused."""
    assert model.backend is not None
    value = np.asarray(model.backend.read(key))
    if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
        raise SlimscopeError(f"layer {quote(layer.name)}: its weight is stored as "
                             f"{value.dtype.name}, already quantized; plan it as keep")
    return torch.from_numpy(np.array(value, dtype=np.float32))


def _rename(note: str, alias_of: Mapping[str, "Layer"]) -> str:
    alias, sep, rest = note.partition(":")
    layer = alias_of.get(alias)
    return f"{layer.name}{sep}{rest}" if layer is not None and sep else note

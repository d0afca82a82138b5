"""Sensitivity of models without a torch module: ONNX graphs (run by ONNX Runtime) and weights only.

:func:`engine.sensitivity.sweep` sends such models here; the result is the same
:class:`~engine.sensitivity.Sensitivity` the torch path gives, so the allocator and the app read
it unchanged. Levels are made by the same functions (:class:`~engine.sensitivity.LayerLevels`
on a torch tensor made from the backend's numpy weight), so a level means the same compressed
weight whichever runtime measures it.

``datafree`` (any backend, weights only included)
    The weight noise-to-signal ratio ``‖δw‖² / ‖w‖²``, exactly as for torch modules.
``exact`` (ONNX)
    One ONNX Runtime session in which every swept weight is also a graph input (an initializer
    that is a graph input can be fed; Constant-node weights become initializers first). Each
    level is then one feed of the modified weight: no session is rebuilt per level. Weights the
    session cannot take as inputs fall back to a new session per level (``with_weights``).
    An axis stops at collapse as on the torch path. With ``settings.activations`` it also
    measures, per quantizable node, the metric with only that node's activation inputs
    fake-quantized to int8 (:func:`activation_sensitivity`).
``fast`` (ONNX, no gradients)
    The relative error a level causes at the layer's output, predicted from the layer-input
    second moments collected in one pass (:func:`collect_input_moments`):
    ``‖ΔY‖² = trace(ΔWᵀ XᵀX ΔW)`` for MatMul/Gemm, and the same over the patches a 1-D or 2-D
    convolution reads (per input channel, the diagonal, for other convolutions), relative to
    the layer's own output energy ``trace(Wᵀ XᵀX W)``. Relative output noises of successive layers add up at the model output to
    first order, as the allocator assumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from engine import onnx_tools
from engine.backends.base import GRADIENTS, RUN, Backend
from engine.data import DataSource
from engine.errors import SlimscopeError
from engine.evaluate import in_fixed_batches
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress, sub_progress
from engine.methods.base import RECURRENT_KINDS
from engine.model import PRUNABLE_KINDS, QUANTIZABLE_KINDS, Layer, Model
from engine.parsing import quote
from engine.sensitivity import (
    BASELINE,
    ESTIMATED,
    EXTRAPOLATED,
    MEASURED,
    METHODS,
    Curve,
    LayerLevels,
    LayerSensitivity,
    NodeSensitivity,
    Sensitivity,
    SweepSettings,
    _append,
    _constant_answer_score,
    _new_result,
    _Scorer,
    estimate_curves,
)
from engine.storage import storage_bytes

#: Memory for the XᵀX accumulators of one pass; more layers than fit take more passes.
MOMENT_BYTES = 1 << 30
#: Nodes that share one fake-quantized session: every run pays for all their Q/DQ pairs, every
#: session costs a build; a few per session balances the two.
ACTIVATION_GROUP = 8
#: Prefix of the tensors and inputs this module adds to a graph (never clashes in practice;
#: checked anyway).
_PREFIX = "slimscope_"


# -- entry point ------------------------------------------------------------------------------
def sweep_backend(
    model: Model,
    data: DataSource | None = None,
    method: str = "exact",
    settings: SweepSettings | None = None,
    *,
    layers: Sequence[str] | None = None,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> Sensitivity:
    """:func:`engine.sensitivity.sweep` for a model whose backend is not a torch module.

    `method` may also be "naive" (ONNX: a new session per level, the definition "exact" must
    reproduce; kept for tests and benchmarks)."""
    settings = settings or SweepSettings()
    if method not in (*METHODS, "naive"):
        raise SlimscopeError(f"unknown sensitivity method {quote(method, 24)} "
                             f"(choose {', '.join(METHODS)})")
    backend = model.backend
    assert backend is not None
    if method != "datafree":
        reason = model.why_not(RUN)
        if reason is not None:
            raise SlimscopeError(f"the {method} sensitivity method needs to run "
                                 f"{model.path.name}: {reason}; use --method datafree")
        if data is None:
            raise SlimscopeError(f"the {method} method needs data; give some, or use 'datafree'")
        if method == "fast" and model.onnx_model is None:
            raise SlimscopeError(f"the fast method needs gradients or an ONNX graph: "
                                 f"{model.why_not(GRADIENTS)}")
    model.require_finite("sensitivity analysis")
    chosen = _chosen_layers(model, layers)
    settings.axes()
    started = time.perf_counter()
    if method == "datafree":
        result = _datafree(model, chosen, settings, progress, cancel)
    elif method == "fast":
        result = _fast(model, chosen, data, settings, progress, cancel)  # type: ignore[arg-type]
    else:
        result = _exact(model, chosen, data, settings, progress, cancel,  # type: ignore[arg-type]
                        naive=method == "naive")
    result.seconds = time.perf_counter() - started
    result.model = model.path.name
    result.model_bytes, result.fixed_bytes = backend_sizes(model, [layer.weight_key for layer
                                                                   in chosen])
    if data is not None and method != "datafree":
        result.data, result.samples = data.describe(), len(data)
    progress(1.0, f"{method} sensitivity of {len(chosen)} layers in {result.seconds:.1f} s")
    return result


# -- which layers, sizes, levels --------------------------------------------------------------
def sweepable_backend_layers(model: Model) -> list[Layer]:
    """Prunable and quantizable layers with a floating-point weight of two or more dimensions
    that no other layer shares (a tied weight cannot be compressed 'alone')."""
    shared = {layer.shared_with for layer in model.layers if layer.shared_with}
    return [layer for layer in model.layers
            if layer.kind in PRUNABLE_KINDS and layer.kind in QUANTIZABLE_KINDS
            and layer.shared_with is None and layer.name not in shared
            and len(layer.shape) >= 2 and layer.dtype.startswith(("float", "bfloat"))]


def _chosen_layers(model: Model, names: Sequence[str] | None) -> list[Layer]:
    candidates = sweepable_backend_layers(model)
    if names is None:
        if not candidates:
            raise SlimscopeError("the model has no layers that can be pruned and quantized")
        return candidates
    by_name = {layer.name: layer for layer in candidates}
    for name in names:
        if name not in by_name:
            raise SlimscopeError(f"no sweepable weight layer named {quote(name, 48)} in the model")
    return [by_name[name] for name in names]


def backend_sizes(model: Model, swept_keys: Sequence[str]) -> tuple[int, int]:
    """(bytes before compression, stored bytes of every tensor outside the swept weights), as
    :func:`engine.sensitivity.model_sizes` counts them for torch modules."""
    store = model.tensors
    swept = set(swept_keys)
    fixed = 0
    for key in store.unique_keys():
        if key in swept:
            continue
        numel = store.numel(key)
        bits = store.itemsizes[key] * 8
        fixed += storage_bytes(numel, _count_nonzero(store.get(key)), bits)
    return model.nbytes, fixed


def _count_nonzero(array: np.ndarray) -> int:
    from engine.model import chunks

    return sum(int(np.count_nonzero(chunk)) for chunk in chunks(array))


class _Weight(nn.Module):
    """A bare holder so :class:`LayerLevels` can read a backend's weight as a layer's."""

    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(np.array(weight, copy=True)),
                                   requires_grad=False)


def layer_levels(backend: Backend, layer: Layer, settings: SweepSettings) -> LayerLevels:
    """The layer's weight at any level, made by the compression methods' own functions, on
    the output-rows view compression uses (per-channel scales per gate row of a recurrent
    weight); a level's weight goes back to the stored shape before it is fed."""
    weight = np.asarray(backend.read(layer.weight_key))
    if layer.kind in RECURRENT_KINDS and weight.ndim == 3:
        weight = weight.reshape(-1, weight.shape[-1])  # as tensor_compress.output_rows
    return LayerLevels(_Weight(weight), settings.quantization)


def _axes(settings: SweepSettings) -> list[str]:
    """Backends other than torch modules factorize nothing yet: no rank axis."""
    return [axis for axis in settings.axes() if axis != "rank"]


def _layer_result(layer: Layer, levels_of: LayerLevels, curves: dict[str, Curve]
                  ) -> LayerSensitivity:
    return LayerSensitivity(layer.name, layer.kind, tuple(layer.shape), curves,
                            levels_of.float_bits)


def _note_no_rank(result: Sensitivity, settings: SweepSettings) -> None:
    if "rank" in settings.axes():
        result.notes.append("no rank axis: low-rank factorization needs a PyTorch module")


# -- datafree -----------------------------------------------------------------------------------
def _datafree(model: Model, layers: list[Layer], settings: SweepSettings, progress: Progress,
              cancel: CancelToken) -> Sensitivity:
    backend = model.backend
    assert backend is not None
    result = _new_result("datafree", "weight_nsr", False, 0.0, settings)
    _note_no_rank(result, settings)
    if not model.can(RUN):
        result.notes.append("weights only: no accuracy figure without a graph; the curves are "
                            "the weight error")
    for i, layer in enumerate(layers):
        cancel.check()
        progress(i / len(layers), f"weight error of {layer.name}")
        levels_of = layer_levels(backend, layer, settings)
        energy = float(levels_of.weight.float().square().sum()) or 1.0
        curves = estimate_curves(levels_of, _axes(settings), 2.0 / energy, 0.0, settings, cancel)
        result.layers.append(_layer_result(layer, levels_of, curves))
    return result


# -- running an ONNX graph on data ------------------------------------------------------------
@dataclass
class _Chunks:
    """The data, loaded once: inputs per chunk (arrays or feeds) and labels."""

    inputs: list[Any]
    labels: list[np.ndarray | None]

    @classmethod
    def load(cls, data: DataSource, size: int) -> _Chunks:
        if len(data) == 0:
            raise SlimscopeError(f"{data.name}: no samples to measure sensitivity on")
        inputs, labels = [], []
        for batch, label in data.batches(size):
            inputs.append(batch)
            labels.append(label)
        return cls(inputs, labels)


class _Session:
    """An ORT session of a (modified) graph: feeds the model's own inputs like OnnxRunner
    (fixed batch sizes respected) plus any extra named arrays, returns the named outputs."""

    def __init__(self, proto: onnx.ModelProto, input_name: str, input_dtype: np.dtype,
                 threads: int | None = None) -> None:
        try:
            self.session = onnx_tools.session(proto, threads=threads)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise SlimscopeError(f"onnxruntime cannot run the model: "
                                 f"{onnx_tools._one_line(exc)}") from None
        self.input_name, self.input_dtype = input_name, input_dtype
        shape = next((i.shape for i in self.session.get_inputs() if i.name == input_name), None)
        batch_dim = shape[0] if shape else None
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.first_output = self.session.get_outputs()[0].name

    def run(self, batch: Any, extra: Mapping[str, np.ndarray] | None = None,
            outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        names = list(outputs) if outputs is not None else [self.first_output]
        if self.fixed_batch and isinstance(batch, np.ndarray) and len(batch) != self.fixed_batch:
            pieces: list[list[np.ndarray]] = []
            width = self.fixed_batch

            def one(piece: np.ndarray) -> np.ndarray:
                pieces.append(self._run(piece, extra, names))
                return np.zeros(len(piece))

            in_fixed_batches(one, batch, width)
            kept = len(batch) - width * (len(pieces) - 1)
            return [np.concatenate([p[k] for p in pieces[:-1]] + [pieces[-1][k][:kept]])
                    for k in range(len(names))]
        return self._run(batch, extra, names)

    def _run(self, batch: Any, extra: Mapping[str, np.ndarray] | None,
             names: list[str]) -> list[np.ndarray]:
        feed = onnx_tools.as_feed(batch, self.input_name, self.input_dtype)
        if extra:
            feed.update(extra)
        return self.session.run(names, feed)

    def logits(self, batch: Any, extra: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        return self.run(batch, extra)[0].astype(np.float32, copy=False)


def _main_proto(model: Model) -> onnx.ModelProto:
    """The whole graph in memory with main-graph Constant nodes turned into initializers."""
    from engine.backends.onnx_graph import OnnxBackend

    backend = model.backend
    proto = backend.full_proto() if isinstance(backend, OnnxBackend) else model.onnx_model
    assert proto is not None
    return onnx_tools.constants_to_initializers(proto)


def _real_input(proto: onnx.ModelProto) -> tuple[str, np.dtype]:
    name, dtype = onnx_tools.graph_input(proto)
    return name, np.dtype(dtype)


def feedable_weights(proto: onnx.ModelProto, keys: Iterable[str]) -> onnx.ModelProto:
    """A copy in which each of `keys` that is a main-graph initializer is also a graph input,
    so a session can be fed another value for it (ONNX Runtime's overridable initializers).
    The new inputs go last: the model's own inputs keep their positions."""
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    graph = result.graph
    if result.ir_version < 4:  # every initializer is already an input before IR 4
        return result
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    listed = {value.name for value in graph.input}
    for key in keys:
        tensor = initializers.get(key)
        if tensor is not None and key not in listed:
            graph.input.append(helper.make_tensor_value_info(key, tensor.data_type,
                                                             list(tensor.dims)))
            listed.add(key)
    return result


# -- exact ----------------------------------------------------------------------------------------
def _exact(model: Model, layers: list[Layer], data: DataSource, settings: SweepSettings,
           progress: Progress, cancel: CancelToken, naive: bool = False) -> Sensitivity:
    backend = model.backend
    assert backend is not None
    progress(0.0, "loading data")
    chunks = _Chunks.load(data, settings.chunk_size)
    if model.onnx_model is None:  # another runnable backend: a new runner per level
        return _exact_by_copies(model, layers, chunks, settings, progress, cancel)
    proto = _main_proto(model)
    input_name, input_dtype = _real_input(proto)
    keys = [layer.weight_key for layer in layers]
    initializers = {tensor.name for tensor in proto.graph.initializer}
    feedable = set() if naive else {key for key in keys if key in initializers}
    session = _Session(feedable_weights(proto, feedable), input_name, input_dtype)
    reference = []
    for x in chunks.inputs:
        cancel.check()
        reference.append(session.logits(x))
    scorer = _Scorer(chunks.labels, reference)
    totals = scorer.new()
    for index, outputs in enumerate(reference):
        scorer.add(totals, index, outputs)
    baseline, secondary_baseline = scorer.values(scorer.metrics(totals))
    chance = _constant_answer_score(chunks.labels, reference)
    primary_name, secondary_name = scorer.names
    result = _new_result("naive" if naive else "exact", primary_name, True, baseline, settings,
                         secondary_metric=secondary_name, secondary_baseline=secondary_baseline,
                         chance=chance, collapse_fraction=settings.collapse_fraction)
    _note_no_rank(result, settings)
    floor = chance + settings.collapse_fraction * (baseline - chance)
    if naive:
        floor = -math.inf  # the definition evaluates every level
    others = [layer.name for layer in layers if layer.weight_key not in feedable]
    if others and not naive:
        result.notes.append("weights a session cannot take as inputs (a new session per "
                            f"level): {', '.join(others)}")
    has_activations = settings.activations and not naive
    weight_share = 0.8 if has_activations else 1.0

    def measure_with(layer: Layer) -> Callable[[np.ndarray], tuple[float, float]]:
        def fed(weight: np.ndarray) -> tuple[float, float]:
            return _score(scorer, chunks, lambda x: session.logits(x, {layer.weight_key: weight}),
                          cancel)

        def rebuilt(weight: np.ndarray) -> tuple[float, float]:
            copy = backend.with_weights({layer.weight_key: weight})
            runner = copy.runner()
            return _score(scorer, chunks, runner.run, cancel)

        return fed if layer.weight_key in feedable else rebuilt

    for i, layer in enumerate(layers):
        span = sub_progress(progress, weight_share * i / len(layers),
                            weight_share * (i + 1) / len(layers))
        levels_of = layer_levels(backend, layer, settings)
        try:
            curves = _measured_curves(layer, levels_of, measure_with(layer), settings,
                                      (baseline, secondary_baseline), floor, span, cancel)
        except SlimscopeError as exc:
            if layer.weight_key in feedable:
                raise
            result.notes.append(f"{layer.name} skipped: {exc}")
            continue
        result.layers.append(_layer_result(layer, levels_of, curves))
    if has_activations:
        try:
            result.activations = activation_sensitivity(
                model, chunks, scorer, baseline, sub_progress(progress, weight_share, 1.0),
                cancel, notes=result.notes)
        except SlimscopeError as exc:
            result.notes.append(f"no activation int8 sensitivity: {exc}")
    return result


def _score(scorer: _Scorer, chunks: _Chunks, run: Callable[[Any], np.ndarray],
           cancel: CancelToken) -> tuple[float, float]:
    totals = scorer.new()
    for index, x in enumerate(chunks.inputs):
        cancel.check()
        scorer.add(totals, index, np.asarray(run(x), dtype=np.float32))
    return scorer.values(scorer.metrics(totals))


def _measured_curves(layer: Layer, levels_of: LayerLevels,
                     measure: Callable[[np.ndarray], tuple[float, float]],
                     settings: SweepSettings, baselines: tuple[float, float], floor: float,
                     progress: Progress, cancel: CancelToken) -> dict[str, Curve]:
    """Every level of every axis measured with `measure` (one weight in, metrics out); an axis
    stops once collapsed, the rest extrapolated (see engine.sensitivity's docstring)."""
    axes = _axes(settings)
    dtype = np.dtype(str(levels_of.weight.dtype).removeprefix("torch."))
    curves = {}
    for a, axis in enumerate(axes):
        levels = settings.levels(axis)
        if axis == "sparsity":
            levels_of.prepare_sparsity(levels[1:])
        base = levels_of.level(axis, levels[0])
        curve = Curve([levels[0]], [baselines[0]], [0.0], [base.bytes], [base.nonzero],
                      [BASELINE], [baselines[1]])
        for j, value in enumerate(levels[1:]):
            cancel.check()
            progress((a + (j + 1) / len(levels)) / len(axes), f"{layer.name}: {axis} {value:g}")
            if curve.metric[-1] <= floor < baselines[0]:  # collapsed
                level = levels_of.level(axis, value, dense=False)
                _append(curve, value, curve.metric[-1], curve.delta[-1], level.bytes,
                        level.nonzero, EXTRAPOLATED, curve.secondary[-1])  # type: ignore[index]
                continue
            level = levels_of.level(axis, value)
            assert level.weight is not None
            primary, secondary = measure(
                level.weight.numpy().astype(dtype, copy=False).reshape(layer.shape))
            _append(curve, value, primary, primary - baselines[0], level.bytes, level.nonzero,
                    MEASURED, secondary)
        curves[axis] = curve
    return curves


def _exact_by_copies(model: Model, layers: list[Layer], chunks: _Chunks,
                     settings: SweepSettings, progress: Progress, cancel: CancelToken
                     ) -> Sensitivity:
    """Any runnable backend: a copy with the one weight replaced, and its runner, per level."""
    backend = model.backend
    assert backend is not None
    runner = backend.runner()
    reference = [np.asarray(runner.run(x), dtype=np.float32) for x in chunks.inputs]
    scorer = _Scorer(chunks.labels, reference)
    totals = scorer.new()
    for index, outputs in enumerate(reference):
        scorer.add(totals, index, outputs)
    baseline, secondary_baseline = scorer.values(scorer.metrics(totals))
    chance = _constant_answer_score(chunks.labels, reference)
    result = _new_result("exact", scorer.names[0], True, baseline, settings,
                         secondary_metric=scorer.names[1], secondary_baseline=secondary_baseline,
                         chance=chance, collapse_fraction=settings.collapse_fraction)
    _note_no_rank(result, settings)
    floor = chance + settings.collapse_fraction * (baseline - chance)
    for i, layer in enumerate(layers):
        span = sub_progress(progress, i / len(layers), (i + 1) / len(layers))
        levels_of = layer_levels(backend, layer, settings)

        def measure(weight: np.ndarray, key: str = layer.weight_key) -> tuple[float, float]:
            return _score(scorer, chunks, backend.with_weights({key: weight}).runner().run,
                          cancel)

        curves = _measured_curves(layer, levels_of, measure, settings,
                                  (baseline, secondary_baseline), floor, span, cancel)
        result.layers.append(_layer_result(layer, levels_of, curves))
    return result


# -- layer-input second moments -------------------------------------------------------------
@dataclass(frozen=True)
class _Use:
    """How a weight meets its activation in one node: ``Y = X @ W`` ("right"), ``Y = W @ X``
    ("left"), Gemm with transposes, or a convolution."""

    node: onnx.NodeProto
    activation: str
    #: "right", "left", "gemm", "conv1x1" (channel moments), "patch" (1-D/2-D convolution:
    #: moments of the patches it reads, per group) or "conv" (diagonal, other convolutions).
    form: str
    #: Gemm: transA / transB / alpha; conv: groups, kernel, strides, pads, dilations.
    trans_a: bool = False
    trans_b: bool = False
    alpha: float = 1.0
    groups: int = 1
    strides: tuple[int, ...] = ()
    kernel: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _weight_uses(proto: onnx.ModelProto, keys: Iterable[str]) -> dict[str, list[_Use]]:
    """The main-graph nodes that multiply each weight with an activation, by form. A weight
    met any other way (a subgraph, a decoder in between, a 3-D MatMul weight) is left out."""
    initializers = {t.name: t for t in proto.graph.initializer}
    wanted = set(keys) & set(initializers)
    uses: dict[str, list[_Use]] = {}
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        op, inputs = node.op_type, list(node.input)
        found: tuple[str, _Use] | None = None
        if op == "MatMul":
            if inputs[1] in wanted and len(initializers[inputs[1]].dims) == 2 \
                    and inputs[0] not in initializers:
                found = inputs[1], _Use(node, inputs[0], "right")
            elif inputs[0] in wanted and len(initializers[inputs[0]].dims) == 2 \
                    and inputs[1] not in initializers:
                found = inputs[0], _Use(node, inputs[1], "left")
        elif op == "Gemm" and inputs[1] in wanted and inputs[0] not in initializers:
            attrs = _attributes(node)
            found = inputs[1], _Use(node, inputs[0], "gemm", bool(attrs.get("transA", 0)),
                                    bool(attrs.get("transB", 0)), float(attrs.get("alpha", 1.0)))
        elif op == "Conv" and inputs[1] in wanted and inputs[0] not in initializers:
            attrs = _attributes(node)
            dims = tuple(initializers[inputs[1]].dims)
            groups = int(attrs.get("group", 1))
            spatial = len(dims) - 2
            strides = tuple(int(s) for s in attrs.get("strides", ()) or (1,) * spatial)
            pads = tuple(int(p) for p in attrs.get("pads", ()) or (0,) * (2 * spatial))
            dilations = tuple(int(d) for d in attrs.get("dilations", ()) or (1,) * spatial)
            explicit = attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
            pointwise = all(d == 1 for d in dims[2:]) and groups == 1 and not any(pads)
            form = "conv1x1" if pointwise and explicit else \
                "patch" if explicit and spatial in (1, 2) else "conv"
            found = inputs[1], _Use(node, inputs[0], form, groups=groups, strides=strides,
                                    kernel=tuple(int(d) for d in dims[2:]), pads=pads,
                                    dilations=dilations)
        if found is not None:
            uses.setdefault(found[0], []).append(found[1])
    # one form per weight: a weight used two different ways is not estimated
    return {key: found for key, found in uses.items()
            if len({(u.form, u.trans_a, u.trans_b) for u in found}) == 1}


def _rows(use: _Use, x: np.ndarray) -> np.ndarray:
    """The activation as rows whose Gram matrix is what multiplies the weight's error."""
    x = x.astype(np.float64, copy=False)
    if use.form == "right":
        return x.reshape(-1, x.shape[-1])
    if use.form == "left":  # W @ X: the columns of X meet W's rows
        return np.swapaxes(x, -1, -2).reshape(-1, x.shape[-2])
    if use.form == "gemm":
        return x.T if use.trans_a else x
    # conv1x1: channels second, sampled on the stride grid
    sampled = x[(slice(None), slice(None), *(slice(None, None, s) for s in use.strides))]
    return np.moveaxis(sampled, 1, -1).reshape(-1, x.shape[1])


def _moment_size(use: _Use, shape: Sequence[int]) -> int:
    if use.form in ("right", "gemm"):
        k = shape[1] if use.form == "gemm" and use.trans_b else shape[0]
    elif use.form == "left":
        k = shape[1]
    elif use.form == "patch":
        return use.groups * (shape[1] * math.prod(shape[2:])) ** 2
    else:
        k = shape[1] * (use.groups if use.form == "conv" else 1)
        return k * k if use.form == "conv1x1" else k
    return k * k


def _with_outputs(proto: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy that also returns the named intermediate tensors (typed where inference knows)."""
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    types = _tensor_types(result)
    listed = {value.name for value in result.graph.output}
    for name in names:
        if name not in listed:
            result.graph.output.append(
                helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None))
            listed.add(name)
    return result


def _tensor_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can type (0 where it cannot)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - inference is a help here, not a requirement
        inferred = proto
    graph = inferred.graph
    types = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for tensor in graph.initializer:
        types[tensor.name] = tensor.data_type
    return types


def input_forms(model: Model, keys: Sequence[str]) -> dict[str, tuple[str, bool]]:
    """Per weight key multiplied directly by an activation in the main graph, the form of its
    moments in :func:`collect_input_moments` ("right", "left", "gemm", "conv1x1", "patch" or
    "conv") and whether a Gemm transposes it (transB): what a method needs to lay the weight
    out as ``[out, in]`` against those moments. Other weights are absent."""
    if model.onnx_model is None:
        return {}
    uses = _weight_uses(_main_proto(model), keys)
    return {key: (found[0].form, found[0].trans_b) for key, found in uses.items()}


def collect_input_moments(
    model: Model,
    data: DataSource | Iterable[Any],
    keys: Sequence[str] | None = None,
    *,
    chunk_size: int = 64,
    budget_bytes: int = MOMENT_BYTES,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
    abs_stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Per weight key, the second moments of the activation it multiplies, per sample.

    With `abs_stats` (a dict to fill), the same pass also records, per key whose moments come
    from rows (MatMul, Gemm, 1x1 convolution), each input channel's max |x| and mean |x| over
    those rows (what SmoothQuant- and AWQ-style scaling need).

    The tensors are summed over every row of every sample and divided by the number of
    samples, so ``trace(ΔWᵀ M ΔW)`` is the expected squared output change per sample:

    * MatMul ``X @ W`` (W ``[k, n]``) and Gemm: ``M = XᵀX``, ``[k, k]`` (rows of X: every
      position of every sample; Gemm's transA applied; alpha not folded in);
    * MatMul ``W @ X`` (W ``[m, k]``): ``M = Σ X Xᵀ``, ``[k, k]`` (then ``trace(ΔW M ΔWᵀ)``);
    * 1×1 convolution without groups or padding: ``[C_in, C_in]`` over the positions it
      reads (its stride grid);
    * other 1-D and 2-D convolutions: ``[groups, d, d]`` over the patches they read (zero
      padding, strides and dilations as the node has them), d = C_in/groups × kernel size,
      in the order of the weight's flattened ``[C_in/groups, kh, kw]``;
    * anything else (3-D, auto_pad): the diagonal only, ``[C_in]``: each input channel's sum
      of squares.

    One pass over the data per group of layers whose accumulators fit `budget_bytes` (float64).
    Weights not multiplied directly by an activation in the main graph are left out. GPTQ-like
    methods need exactly this statistic (``H = 2 M``).
    """
    if model.onnx_model is None:
        raise SlimscopeError("layer-input statistics need an ONNX graph: "
                             f"{model.path.name} has none")
    proto = _main_proto(model)
    input_name, input_dtype = _real_input(proto)
    wanted = list(keys) if keys is not None else [layer.weight_key for layer in model.layers]
    uses = _weight_uses(proto, wanted)
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    groups: list[list[str]] = [[]]
    used = 0
    for key in wanted:
        if key not in uses:
            continue
        size = _moment_size(uses[key][0], shapes[key]) * 8
        if groups[-1] and used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += size
    batches = data.batches(chunk_size) if isinstance(data, DataSource) else data
    cached = [batch[0] if isinstance(batch, tuple) else batch for batch in batches]
    moments: dict[str, np.ndarray] = {}
    samples = max(sum(_batch_length(x) for x in cached), 1)
    for g, group in enumerate(groups):
        if not group:
            continue
        activations = sorted({use.activation for key in group for use in uses[key]})
        session = _Session(_with_outputs(proto, activations), input_name, input_dtype)
        sums: dict[str, np.ndarray] = {}
        abs_sums: dict[str, list[Any]] = {}
        for c, x in enumerate(cached):
            cancel.check()
            progress((g + c / len(cached)) / len(groups), "layer-input statistics")
            values = dict(zip(activations, session.run(x, outputs=activations)))
            for key in group:
                for use in uses[key]:
                    part = _moment(use, values[use.activation])
                    sums[key] = part if key not in sums else sums[key] + part
                    if abs_stats is not None and use.form in ("right", "left", "gemm", "conv1x1"):
                        _add_abs(abs_sums, key, np.abs(_rows(use, values[use.activation])))
        for key, total in sums.items():
            moments[key] = total / samples
        if abs_stats is not None:
            abs_stats.update({key: (high, total / max(rows, 1))
                              for key, (high, total, rows) in abs_sums.items()})
    return moments


def _add_abs(sums: dict[str, list[Any]], key: str, magnitudes: np.ndarray) -> None:
    """Accumulate per-channel (max, sum, row count) of `magnitudes` ``[rows, channels]``."""
    high, total = magnitudes.max(axis=0), magnitudes.sum(axis=0)
    if key not in sums:
        sums[key] = [high, total, len(magnitudes)]
    else:
        found = sums[key]
        found[0], found[1], found[2] = np.maximum(found[0], high), found[1] + total, \
            found[2] + len(magnitudes)


def channel_abs_stats(proto: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]],
                      names: Sequence[str], cancel: CancelToken = NEVER_CANCELLED
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per named activation, each channel's (max |x|, mean |x|) along its last axis (the
    input channels of a MatMul/Gemm reading it), over every row of every feed: one ONNX
    Runtime pass with the activations exposed as extra outputs. Feeds are full input dicts,
    so graphs with several inputs (a transformer's ids and mask) work too."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return {}
    try:
        session = onnx_tools.session(_with_outputs(proto, wanted), threads=1)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise SlimscopeError(f"onnxruntime cannot run the model: "
                             f"{onnx_tools._one_line(exc)}") from None
    sums: dict[str, list[Any]] = {}
    for feed in feeds:
        cancel.check()
        for name, value in zip(wanted, session.run(wanted, dict(feed))):
            value = np.abs(np.asarray(value, dtype=np.float64))
            _add_abs(sums, name, value.reshape(-1, value.shape[-1]))
    return {name: (high, total / max(rows, 1)) for name, (high, total, rows) in sums.items()}


def _batch_length(batch: Any) -> int:
    if isinstance(batch, Mapping):
        return len(next(iter(batch.values())))
    return len(batch)


def _patch_moments(use: _Use, x: np.ndarray, piece: int = 8) -> np.ndarray:
    """``[groups, d, d]``: the Gram matrix of the patches a 1-D/2-D convolution reads (zero
    padding included), d = input channels per group x kernel size."""
    from torch.nn import functional as F

    kernel, strides, dilations, pads = use.kernel, use.strides, use.dilations, use.pads
    if len(kernel) == 1:  # as a 2-D convolution of height 1
        x = x[:, :, None, :]
        kernel, strides, dilations = (1, *kernel), (1, *strides), (1, *dilations)
        pads = (0, pads[0], 0, pads[1])
    # ONNX pads are (begins..., ends...); F.pad wants (left, right, top, bottom)
    torch_pads = (pads[1], pads[3], pads[0], pads[2])
    total = None
    for start in range(0, len(x), piece):
        t = torch.from_numpy(np.ascontiguousarray(x[start:start + piece])).double()
        cols = F.unfold(F.pad(t, torch_pads), kernel, dilation=dilations, stride=strides)
        n, width, positions = cols.shape
        grouped = cols.reshape(n, use.groups, width // use.groups, positions)
        grouped = grouped.permute(1, 2, 0, 3).reshape(use.groups, width // use.groups, -1)
        part = torch.bmm(grouped, grouped.transpose(1, 2)).numpy()
        total = part if total is None else total + part
    assert total is not None
    return total


def _moment(use: _Use, x: np.ndarray) -> np.ndarray:
    """The second moments one batch of the activation adds (see collect_input_moments)."""
    if use.form == "patch":
        return _patch_moments(use, x)
    if use.form == "conv":
        x64 = x.astype(np.float64, copy=False).reshape(x.shape[0], x.shape[1], -1)
        return np.einsum("ncp,ncp->c", x64, x64)
    rows = _rows(use, x)
    return rows.T @ rows


def predicted_output_error(use: _Use, moments: np.ndarray, change: np.ndarray) -> float:
    """Expected squared output change per sample when the weight changes by `change`."""
    return float(per_output_energy(use, moments, change).sum())


def per_output_energy(use: _Use, moments: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per output channel (column of a MatMul, filter of a convolution), the expected squared
    output per sample that `weight` (a weight or a change of it) produces from inputs with
    these moments."""
    w = weight.astype(np.float64, copy=False)
    if use.form == "right":
        return np.sum((moments @ w) * w, axis=0)
    if use.form == "left":
        return np.sum((w @ moments) * w, axis=1)
    if use.form == "gemm":
        w = w.T if use.trans_b else w  # [k, n]
        return use.alpha ** 2 * np.sum((moments @ w) * w, axis=0)
    if use.form == "conv1x1":
        flat = w.reshape(w.shape[0], -1)  # [out, C_in]
        return np.sum((flat @ moments) * flat, axis=1)
    if use.form == "patch":
        grouped = w.reshape(use.groups, w.shape[0] // use.groups, -1)  # [g, out/g, d]
        return np.sum(np.matmul(grouped, moments) * grouped, axis=-1).reshape(-1)
    # diagonal: every weight of input channel c meets that channel's energy, per output
    # position (fewer positions with a stride)
    out_channels, per_group = w.shape[0], w.shape[1]
    channel = moments.reshape(use.groups, per_group)[
        np.arange(out_channels) // max(out_channels // use.groups, 1)]  # [out, C_in/groups]
    energy = np.square(w).reshape(out_channels, per_group, -1).sum(-1)
    return np.sum(energy * channel, axis=1) / math.prod(use.strides or (1,))


def _relative_error(use: _Use, moments: np.ndarray, weight: np.ndarray
                    ) -> Callable[[np.ndarray], float]:
    """A weight change's predicted output noise relative to the layer's own output energy.

    Measured on PP-OCR's MobileNetV3 orientation classifier (200 images), this
    whole-output ratio ranks levels better than one normalized per output channel (which a
    BatchNorm after the layer would suggest): Spearman 0.68 against 0.54 with the exact loss.
    """
    signal = float(per_output_energy(use, moments, weight).sum()) or 1.0
    return lambda change: float(per_output_energy(use, moments, change).sum()) / signal


# -- fast ---------------------------------------------------------------------------------------
def _fast(model: Model, layers: list[Layer], data: DataSource, settings: SweepSettings,
          progress: Progress, cancel: CancelToken) -> Sensitivity:
    backend = model.backend
    assert backend is not None
    proto = _main_proto(model)
    keys = [layer.weight_key for layer in layers]
    uses = _weight_uses(proto, keys)
    progress(0.0, "layer-input statistics")
    moments = collect_input_moments(model, data, keys, chunk_size=settings.chunk_size,
                                    progress=sub_progress(progress, 0.0, 0.6), cancel=cancel)
    result = _new_result("fast", "output_nsr", False, 0.0, settings)
    _note_no_rank(result, settings)
    without = [layer.name for layer in layers if layer.weight_key not in moments]
    if without:
        result.notes.append("weight error instead of the output estimate (the weight does not "
                            f"meet an activation directly): {', '.join(without)}")
    for i, layer in enumerate(layers):
        cancel.check()
        progress(0.6 + 0.4 * i / len(layers), f"estimating {layer.name}")
        levels_of = layer_levels(backend, layer, settings)
        original = levels_of.weight.double().numpy()
        if layer.weight_key not in moments:
            energy = float(np.square(original).sum()) or 1.0
            curves = estimate_curves(levels_of, _axes(settings), 2.0 / energy, 0.0, settings,
                                     cancel)
        else:
            use, moment = uses[layer.weight_key][0], moments[layer.weight_key]
            relative = _relative_error(use, moment, original)
            curves = {}
            for axis in _axes(settings):
                curve = Curve([], [], [], [], [], [])
                levels = settings.levels(axis)
                if axis == "sparsity":
                    levels_of.prepare_sparsity(levels[1:])
                for j, value in enumerate(levels):
                    cancel.check()
                    level = levels_of.level(axis, value)
                    nsr = 0.0
                    if j:
                        assert level.weight is not None
                        change = level.weight.double().numpy() - original
                        nsr = relative(change)
                    _append(curve, value, nsr, nsr, level.bytes, level.nonzero,
                            BASELINE if j == 0 else ESTIMATED)
                curves[axis] = curve
        result.layers.append(_layer_result(layer, levels_of, curves))
    return result


# -- activation int8 sensitivity ---------------------------------------------------------------
def quantizable_op_types() -> frozenset[str]:
    """The operators ONNX Runtime's static quantizer touches (what the int8 export quantizes)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)


def _activation_inputs(proto: onnx.ModelProto) -> list[tuple[int, onnx.NodeProto, list[str]]]:
    """Main-graph nodes the int8 export would quantize, with their positions and float32
    activation inputs (not weights, not integer shape tensors)."""
    ops = quantizable_op_types()
    types = _tensor_types(proto)
    initializers = {t.name for t in proto.graph.initializer}
    found = []
    for position, node in enumerate(proto.graph.node):
        if node.op_type not in ops or node.domain not in ("", "ai.onnx"):
            continue
        inputs = [name for name in dict.fromkeys(node.input)
                  if name and name not in initializers and types.get(name) == TensorProto.FLOAT]
        if inputs:
            found.append((position, node, inputs))
    return found


def _ranges(session: _Session, chunks: _Chunks, tensors: list[str], cancel: CancelToken
            ) -> dict[str, tuple[float, float]]:
    """Min and max of each tensor over the data (ORT's minmax calibration), 0 included."""
    low = {name: 0.0 for name in tensors}
    high = {name: 0.0 for name in tensors}
    for x in chunks.inputs:
        cancel.check()
        for name, value in zip(tensors, session.run(x, outputs=tensors)):
            if value.size:
                low[name] = min(low[name], float(np.nanmin(value)))
                high[name] = max(high[name], float(np.nanmax(value)))
    return {name: (low[name], high[name]) for name in tensors}


def _uint8_params(low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of asymmetric uint8 codes over [low, high] (as ORT computes them)."""
    scale = (high - low) / 255.0 if high > low else 1.0
    zero_point = int(np.clip(round(-low / scale), 0, 255))
    return np.asarray(scale, np.float32), np.asarray(zero_point, np.uint8)


def switched_fake_quant(proto: onnx.ModelProto,
                        nodes: Sequence[tuple[int, onnx.NodeProto, list[str]]],
                        ranges: Mapping[str, tuple[float, float]]) -> tuple[onnx.ModelProto, str]:
    """A copy in which node i's activation inputs become ``x + s[i] · (DQ(Q(x)) - x)``, with
    ``s`` a new float input of one switch per node: all zeros is the float model, a one-hot
    switch quantizes that node's inputs alone. One session then measures every node."""
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    graph = result.graph
    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    taken |= {t.name for t in graph.initializer} | {v.name for v in graph.input}
    switch = _fresh(f"{_PREFIX}switch", taken)
    graph.input.append(helper.make_tensor_value_info(switch, TensorProto.FLOAT, [len(nodes)]))
    quantized: dict[str, str] = {}  # tensor -> its Q/DQ difference, made once per tensor
    # the copy's nodes are other objects than `nodes`: match them by position
    by_position = {position: (index, inputs)
                   for index, (position, _, inputs) in enumerate(nodes)}
    new_nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        if i in by_position:
            index, inputs = by_position[i]
            gate = _fresh(f"{_PREFIX}gate_{index}", taken)
            position_name = _fresh(f"{_PREFIX}at_{index}", taken)
            graph.initializer.append(numpy_helper.from_array(np.asarray(index, np.int64),
                                                             position_name))
            new_nodes.append(helper.make_node("Gather", [switch, position_name], [gate]))
            for name in inputs:
                if name not in quantized:
                    scale, zero = _uint8_params(*ranges[name])
                    scale_name = _fresh(f"{_PREFIX}scale", taken)
                    zero_name = _fresh(f"{_PREFIX}zero", taken)
                    graph.initializer.extend([numpy_helper.from_array(scale, scale_name),
                                              numpy_helper.from_array(zero, zero_name)])
                    codes, back, diff = (_fresh(f"{_PREFIX}{part}", taken)
                                         for part in ("q", "dq", "diff"))
                    new_nodes += [
                        helper.make_node("QuantizeLinear", [name, scale_name, zero_name], [codes]),
                        helper.make_node("DequantizeLinear", [codes, scale_name, zero_name],
                                         [back]),
                        helper.make_node("Sub", [back, name], [diff])]
                    quantized[name] = diff
                scaled, mixed = (_fresh(f"{_PREFIX}{part}", taken) for part in ("scaled", "x"))
                new_nodes += [helper.make_node("Mul", [quantized[name], gate], [scaled]),
                              helper.make_node("Add", [name, scaled], [mixed])]
                for slot, value in enumerate(node.input):
                    if value == name:
                        node.input[slot] = mixed
        new_nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    return result, switch


def _fresh(base: str, taken: set[str]) -> str:
    name, counter = base, 0
    while name in taken:
        counter += 1
        name = f"{base}_{counter}"
    taken.add(name)
    return name


def activation_sensitivity(model: Model, chunks: _Chunks, scorer: _Scorer, baseline: float,
                           progress: Progress = no_progress,
                           cancel: CancelToken = NEVER_CANCELLED,
                           notes: list[str] | None = None) -> list[NodeSensitivity]:
    """Per quantizable node, the metric with only that node's activation inputs fake-quantized
    to uint8 (minmax ranges from the same data), everything else in float."""
    proto = _main_proto(model)
    input_name, input_dtype = _real_input(proto)
    found = _activation_inputs(proto)
    unnamed = [node for _, node, _ in found if not node.name]
    if unnamed and notes is not None:
        notes.append(f"{len(unnamed)} quantizable nodes have no name and cannot be kept in "
                     "float by name; their activation sensitivity is not measured")
    nodes = [entry for entry in found if entry[1].name]
    if not nodes:
        return []
    tensors = sorted({name for _, _, inputs in nodes for name in inputs})
    progress(0.0, "activation ranges")
    calibration = _Session(_with_outputs(proto, tensors), input_name, input_dtype)
    ranges = _ranges(calibration, chunks, tensors, cancel)
    results = []
    for start in range(0, len(nodes), ACTIVATION_GROUP):
        group = nodes[start:start + ACTIVATION_GROUP]
        switched, switch = switched_fake_quant(proto, group, ranges)
        session = _Session(switched, input_name, input_dtype)
        for index, (_, node, _) in enumerate(group):
            cancel.check()
            progress((start + index) / len(nodes), f"int8 activations of {node.name}")
            gates = np.zeros(len(group), np.float32)
            gates[index] = 1.0
            primary, _ = _score(scorer, chunks,
                                lambda x: session.logits(x, {switch: gates}), cancel)
            results.append(NodeSensitivity(node.name, node.op_type, primary, primary - baseline))
    return results



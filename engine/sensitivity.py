"""Per-layer sensitivity: the metric when only one layer is compressed, at every level.

Each swept layer gets one curve per *axis*, levels in order of increasing compression, the first
level being the uncompressed layer (the baseline):

* ``sparsity``: fraction of weights removed by magnitude, exactly as the plan's ``magnitude``
  method removes them (0, 0.05, ..., 0.95 by default);
* ``bits``: uniform integer codes with the sweep's quantization settings (8..2; the baseline
  level, labelled 32, is the weight in its own float format);
* ``rank`` (optional): fraction of full rank kept by truncated SVD (1.0 = full rank).

With ``SweepSettings.quantization.method`` "gptq" and/or ``prune_method`` "obs" (exact method,
Linear/Conv layers of a torch module), the bits and sparsity levels are made by those
error-compensating methods instead (:func:`engine.methods.gptq.quantize_layer`,
:func:`engine.methods.obs.prune_layer`), from each layer's input statistics collected once per
sweep on the data's first samples (the calibration batches compress() would use); the result
records them (``quantization.method``, ``pruning_method``), and :mod:`engine.allocate` writes
plans that use them. Defaults stay round-to-nearest and magnitude, and their JSON unchanged.

Three methods answer the same question at different costs:

``exact``
    Measures it, and must agree with the naive loop (:func:`naive_sweep`: deep-copy, compress
    one layer with :func:`engine.methods.apply.apply_plan`, evaluate everything, repeat). It is
    faster because (a) the model is traced with torch.fx and run once, node by node, keeping only
    the values later nodes still need, so a layer's input and the other activations its suffix
    needs (skip connections) are at hand and the part before the layer is never re-run; (b) the
    layer's outputs at several levels are concatenated along the batch axis and the rest of the
    network runs once for all of them; (c) the baseline level is the original model, measured
    once, and an axis stops at *collapse*; (d) nothing is deep-copied: the layer's compressed
    output comes from ``torch.func.functional_call`` with the compressed weight. Models fx cannot
    trace, and layers that are not called exactly once as a module, fall back to a full forward
    with a hook that substitutes the layer's output, one level at a time.
``fast``
    Estimates the loss change from one forward+backward pass over the (calibration) data: with
    the diagonal empirical Fisher ``F`` of the mean cross-entropy (labels, or the model's own
    top-1 when the data has none), ``ΔL ≈ ½ Σ F_ii δw_i²``, ``δw`` being what actually pruning
    or quantizing the weight at that level changes.
``datafree``
    Needs no data: the weight noise-to-signal ratio ``‖δw‖² / ‖w‖²`` (SQNR = -10·log10 of it).
    To first order the relative noises of successive layers of a ReLU network add up at the
    output, which is what the allocator's additive model assumes.

**Collapse** (exact only): a level has collapsed when its primary metric (accuracy, or
agreement without labels) is at or below ``chance + collapse_fraction * (baseline - chance)``,
chance being what a constant answer scores: the share of the most frequent label (or, without
labels, of the original model's most frequent top-1) — the layer alone has destroyed that much
of what the model knew beyond guessing. The axis' remaining levels are not evaluated: they get
the values of the last level measured (more compression is assumed no better) and status
``extrapolated``.

The result, :class:`Sensitivity`, is plain data saved as JSON, shared by the CLI (``slimscope
sensitivity``), the GUI (heat map of layers x levels via :meth:`Sensitivity.heatmap`, and
curves) and :mod:`engine.allocate`. Per level it holds the metric, its change from the
baseline (``delta``), the bytes the layer's weight takes when stored at that level (counted as
:func:`engine.compress.tensor_storage_bytes` counts them), its non-zeros and a status::

    {"version": 1, "method": "exact", "metric": "accuracy", "higher_is_better": true,
     "baseline": 0.9956, "secondary_metric": "loss", "secondary_baseline": 0.02,
     "chance": 0.1, "collapse_fraction": 0.25, "quantization": {"bits": 8, ...},
     "model_bytes": 754880, "fixed_bytes": 3136, "data": "...", "samples": 450, ...,
     "layers": [{"name": "features.3", "kind": "Conv2d", "shape": [64, 32, 3, 3],
                 "float_bits": 32,
                 "curves": {"sparsity": {"levels": [0.0, 0.05, ...], "metric": [...],
                                         "delta": [...], "bytes": [...], "nonzero": [...],
                                         "status": ["baseline", "measured", ...],
                                         "secondary": [...]},
                            "bits": {"levels": [32, 8, 7, ...], ...}}}]}

Exact sweeps of ONNX graphs add ``"activations": [{"name": "Conv_3", "op_type": "Conv",
"metric": 0.97, "delta": -0.02}, ...]``: each quantizable node with only its activation inputs
in int8 (:mod:`engine.sensitivity_backends`, which also sweeps models without a torch module).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.func import functional_call
from torch.nn import functional as F

from engine.backends.base import TORCH_MODULE
from engine.compress import tensor_storage_bytes
from engine.compressed import CompressedModel
from engine.data import DataSource, Inputs, batch_length, pad_samples, take_samples
from engine.errors import PlanError, SlimscopeError
from engine.evaluate import (
    Metrics,
    MetricTotals,
    TorchRunner,
    evaluate,
    first_tensor,
    fixed_batch_of,
    fresh_stream_state,
    is_score_output,
    torch_arguments,
)
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress, sub_progress
from engine.methods.apply import apply_plan, module_layers
from engine.methods.base import is_recurrent_weight, submodule, weight_key, weight_of
from engine.calibration_stats import SUPPORTED, InputStats, collect_input_stats
from engine.methods.gptq import quantize_layer
from engine.methods.lowrank import factorize
from engine.methods.obs import batchnorm_gains, prune_layer
from engine.methods.quantize import quantize_tensor
from engine.model import PRUNABLE_KINDS, QUANTIZABLE_KINDS, Model
from engine.plan import LayerInfo, LowRank, Plan, Pruning, Quantization, Sections
from engine.parsing import REQUIRED, check_depth, expect, list_of, quote, read_json, typed_field
from engine.safe_write import atomic_write_text
from engine.storage import storage_bytes

SENSITIVITY_VERSION = 1
METHODS = ("exact", "fast", "datafree")
AXES = ("sparsity", "bits", "rank")
#: The baseline level of each axis: nothing removed, float weights, full rank.
BASELINE_LEVEL = {"sparsity": 0.0, "bits": 32, "rank": 1.0}
DEFAULT_SPARSITIES = tuple(round(0.05 * i, 2) for i in range(20))
DEFAULT_BITS = (8, 7, 6, 5, 4, 3, 2)
#: Fractions of full rank a sweep asked for "ranks too" measures (none unless asked: an SVD
#: per level costs more than a mask or a rounding).
DEFAULT_RANKS = (0.75, 0.5, 0.375, 0.25, 0.125, 0.0625)

BASELINE, MEASURED, ESTIMATED, EXTRAPOLATED = "baseline", "measured", "estimated", "extrapolated"

#: Memory for one batched suffix pass (all levels of a group together); bounds the group size.
DEFAULT_BATCH_BYTES = 256 * 2**20
#: Samples in one batched suffix pass; beyond this, batching gains little on a CPU.
DEFAULT_MAX_BATCH = 512
#: Memory for the activations the exact method keeps for every sample at once.
DEFAULT_CACHE_BYTES = 4 * 2**30
#: Samples per whole-model forward that cannot be interrupted (reference outputs, trace check).
PIECE = 32
#: Quantization methods a sweep can measure the bits axis with (Quantization.method).
QUANT_METHODS = ("rtn", "gptq")
#: Pruning methods a sweep can measure the sparsity axis with.
PRUNE_METHODS = ("magnitude", "obs")


@dataclass(frozen=True)
class SweepSettings:
    """What to sweep and how: levels per axis, the quantizer, collapse, and memory bounds."""

    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    bits: tuple[int, ...] = DEFAULT_BITS
    #: Fractions of full rank to try; empty skips the rank axis.
    ranks: tuple[float, ...] = ()
    #: Quantizer settings for the bits axis; its own `bits` is ignored.
    quantization: Quantization = Quantization()
    collapse_fraction: float = 0.25
    #: Samples per data chunk (exact and naive evaluation, Fisher accumulation).
    chunk_size: int = 256
    batch_bytes: int = DEFAULT_BATCH_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    cache_bytes: int = DEFAULT_CACHE_BYTES
    #: Samples per backward pass of the Fisher estimate (1 = per-sample gradients).
    fisher_batch: int = 16
    #: Exact sweeps of ONNX graphs: also measure each node with its activations in int8.
    activations: bool = True
    #: How the sparsity axis prunes: "magnitude", or "obs" (compensated with each layer's
    #: input statistics, like the bits axis when ``quantization.method`` is "gptq").
    prune_method: str = "magnitude"

    @property
    def compensated(self) -> bool:
        """Whether a level needs layer-input statistics (GPTQ bits or OBS sparsity)."""
        return self.quantization.method != "rtn" or self.prune_method != "magnitude"

    def check_methods(self) -> None:
        if self.quantization.method not in QUANT_METHODS:
            raise SlimscopeError(f"unknown sweep quantization method "
                                 f"{quote(self.quantization.method, 24)} (choose "
                                 f"{', '.join(QUANT_METHODS)})")
        if self.prune_method not in PRUNE_METHODS:
            raise SlimscopeError(f"unknown sweep pruning method {quote(self.prune_method, 24)} "
                                 f"(choose {', '.join(PRUNE_METHODS)})")
        if not 0 <= self.collapse_fraction <= 1:  # also false for NaN
            raise SlimscopeError(f"the collapse fraction must lie in [0, 1], not "
                                 f"{quote(self.collapse_fraction)}")

    def levels(self, axis: str) -> list[float]:
        """The axis' levels in order of increasing compression, baseline first."""
        if axis == "sparsity":
            values = sorted({round(float(s), 6) for s in self.sparsities} - {0.0})
            if any(not 0 < s < 1 for s in values):
                raise SlimscopeError("sparsity levels must lie in [0, 1)")
        elif axis == "bits":
            values = sorted({int(b) for b in self.bits}, reverse=True)
            if any(not 2 <= b <= 8 for b in values):
                raise SlimscopeError("bit levels must lie in 2..8")
        else:
            values = sorted({round(float(r), 6) for r in self.ranks} - {1.0}, reverse=True)
            if any(not 0 < r < 1 for r in values):
                raise SlimscopeError("rank levels must be fractions of full rank in (0, 1)")
        return [BASELINE_LEVEL[axis], *values]

    def axes(self) -> list[str]:
        return [axis for axis in AXES if len(self.levels(axis)) > 1]


# -- the result as data ---------------------------------------------------------------------
@dataclass
class Curve:
    """One layer along one axis: per level the metric, its change, storage, and provenance."""

    levels: list[float]
    metric: list[float]
    delta: list[float]
    #: Bytes of the layer's weight stored at this level (tensor_storage_bytes).
    bytes: list[int]
    #: Non-zero weights at this level (what sparse storage pays for).
    nonzero: list[int]
    status: list[str]
    #: The secondary metric (loss with labels, KL divergence without), exact and naive only.
    secondary: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"levels": self.levels, "metric": self.metric, "delta": self.delta,
               "bytes": self.bytes, "nonzero": self.nonzero, "status": self.status}
        if self.secondary is not None:
            out["secondary"] = self.secondary
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "curve") -> Curve:
        """A curve from plain data; wrong types or unequal lengths are one SlimscopeError."""
        expect(data, "mapping", where)
        levels = list_of(typed_field(data, "levels", "list", where), "number", f"{where}.levels")
        lists = {name: list_of(typed_field(data, name, "list", where), kind, f"{where}.{name}")
                 for name, kind in (("metric", "number"), ("delta", "number"), ("bytes", "int"),
                                    ("nonzero", "int"), ("status", "str"))}
        secondary = typed_field(data, "secondary", "list", where, default=None)
        if secondary is not None:
            lists["secondary"] = list_of(secondary, "number", f"{where}.secondary",
                                         optional_items=True)
        for name, values in lists.items():
            if len(values) != len(levels):
                raise SlimscopeError(f"{where}.{name}: {len(values)} values for "
                                     f"{len(levels)} levels")
        return cls(levels=levels, **lists)


@dataclass
class LayerSensitivity:
    name: str
    kind: str
    shape: tuple[int, ...]
    curves: dict[str, Curve]
    #: Bits per element of the weight as it is (the bits axis' baseline level, labelled 32).
    float_bits: int = 32

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "float_bits": self.float_bits,
                "curves": {axis: curve.to_dict() for axis, curve in self.curves.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "layer") -> LayerSensitivity:
        """A layer's results from plain data; anything malformed is one SlimscopeError."""
        expect(data, "mapping", where)
        name = typed_field(data, "name", "str", where)
        where = f"{where} {quote(name, 48)}"
        shape = tuple(list_of(typed_field(data, "shape", "list", where), "int", f"{where}.shape"))
        if any(dim < 0 for dim in shape):
            raise SlimscopeError(f"{where}.shape: {quote(list(shape), 48)} has a negative "
                                 "dimension")
        curves = {}
        for axis, curve in typed_field(data, "curves", "mapping", where).items():
            if axis not in AXES:
                raise SlimscopeError(f"{where}.curves: unknown axis {quote(axis, 24)} "
                                     f"(expected {', '.join(AXES)})")
            curves[axis] = Curve.from_dict(curve, f"{where}.curves.{axis}")
        return cls(name, typed_field(data, "kind", "str", where), shape, curves,
                   typed_field(data, "float_bits", "int", where, default=32))


@dataclass
class NodeSensitivity:
    """One graph node with only its activation inputs fake-quantized to int8 (ONNX exact
    sweeps): the metric then, and its change from the baseline. The allocator keeps the nodes
    that hurt most in float (plan.activation_quant.keep_float)."""

    name: str
    op_type: str
    metric: float
    delta: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type, "metric": self.metric,
                "delta": self.delta}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "activation") -> NodeSensitivity:
        expect(data, "mapping", where)
        return cls(typed_field(data, "name", "str", where),
                   typed_field(data, "op_type", "str", where),
                   float(typed_field(data, "metric", "number", where)),
                   float(typed_field(data, "delta", "number", where)))


@dataclass
class Sensitivity:
    """Every swept layer's curves, plus what the allocator needs to size a whole plan."""

    method: str
    #: Name of the metric in the curves: accuracy, agreement, loss (estimated) or weight_nsr.
    metric: str
    higher_is_better: bool
    baseline: float
    layers: list[LayerSensitivity]
    #: Quantizer settings of the bits axis (a plan built from these curves must use the same).
    quantization: Quantization
    #: Bytes of the uncompressed model, counted as compress() reports `bytes_before`.
    model_bytes: int
    #: Bytes of everything not swept (biases, norms, buffers), as compress() stores them.
    fixed_bytes: int
    secondary_metric: str | None = None
    secondary_baseline: float | None = None
    #: The primary metric of a constant answer (the most frequent class), exact only.
    chance: float | None = None
    collapse_fraction: float | None = None
    model: str = ""
    data: str | None = None
    samples: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    #: Per-node activation int8 results (ONNX exact sweeps), in the primary metric's units.
    activations: list[NodeSensitivity] = field(default_factory=list)
    #: How the sparsity curves pruned (a plan built from them must prune the same way); the
    #: bits curves' method is ``quantization.method``.
    pruning_method: str = "magnitude"

    def activation_drops(self) -> dict[str, float]:
        """Node name -> how much worse the metric is with that node's inputs in int8."""
        sign = -1.0 if self.higher_is_better else 1.0
        return {node.name: sign * node.delta + 0.0 for node in self.activations}

    def layer(self, name: str) -> LayerSensitivity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in the sensitivity results")

    def drops(self, layer: LayerSensitivity, axis: str, secondary: bool = False) -> np.ndarray:
        """How much worse each level is than the baseline (positive = worse), in metric units.

        A level measured as NaN or infinite (a model that output NaN there, or an edited file)
        counts as infinitely worse, so no plan picks it; the baseline itself drops nothing.
        """
        curve = layer.curves[axis]
        if secondary:
            if curve.secondary is None or self.secondary_baseline is None:
                raise SlimscopeError(f"{self.method} sensitivity has no secondary metric")
            drops = np.asarray(curve.secondary, dtype=np.float64) - self.secondary_baseline
        else:
            delta = np.asarray(curve.delta, dtype=np.float64)
            drops = (-delta if self.higher_is_better else delta) + 0.0  # + 0.0: no "-0" drops
        drops = np.where(np.isfinite(drops), drops, np.inf)
        if curve.levels and curve.levels[0] == BASELINE_LEVEL[axis]:
            drops[0] = 0.0
        return drops

    def heatmap(self, axis: str, field_name: str = "delta"
                ) -> tuple[list[str], list[float], np.ndarray]:
        """(layer names, levels, layers x levels matrix) of one curve field, NaN where a layer
        has no such axis: what the GUI draws as a heat map."""
        names = [layer.name for layer in self.layers if axis in layer.curves]
        if not names:
            return [], [], np.zeros((0, 0))
        levels = max((self.layer(n).curves[axis].levels for n in names), key=len)
        matrix = np.full((len(names), len(levels)), np.nan)
        for row, name in enumerate(names):
            curve = self.layer(name).curves[axis]
            values = getattr(curve, field_name)
            for level, value in zip(curve.levels, values):
                matrix[row, levels.index(level)] = np.nan if value is None else value
        return names, list(levels), matrix

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SENSITIVITY_VERSION,
            "method": self.method,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "baseline": self.baseline,
            "secondary_metric": self.secondary_metric,
            "secondary_baseline": self.secondary_baseline,
            "chance": self.chance,
            "collapse_fraction": self.collapse_fraction,
            "quantization": self.quantization.to_dict(),
            "model": self.model,
            "model_bytes": self.model_bytes,
            "fixed_bytes": self.fixed_bytes,
            "data": self.data,
            "samples": self.samples,
            "seconds": self.seconds,
            "notes": self.notes,
            "layers": [layer.to_dict() for layer in self.layers],
            # only when measured: results without it stay byte-identical to earlier ones
            **({"activations": [node.to_dict() for node in self.activations]}
               if self.activations else {}),
            # likewise only when not the default magnitude pruning
            **({"pruning_method": self.pruning_method}
               if self.pruning_method != "magnitude" else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sensitivity:
        """Results from plain data (a file's or a project's); every missing field or wrong
        type, at any depth, is one SlimscopeError naming where it is."""
        where = "sensitivity"
        expect(data, "mapping", where)
        check_depth(data, where)
        version = data.get("version")
        if isinstance(version, bool) or version != SENSITIVITY_VERSION:
            raise SlimscopeError(f"sensitivity version {quote(version, 24)} is not supported "
                                 f"(expected {SENSITIVITY_VERSION})")
        quantization = typed_field(data, "quantization", "mapping", where)
        try:
            quant = Plan.from_dict({"defaults": {"quantization": quantization}})
        except PlanError as exc:
            raise SlimscopeError(f"sensitivity quantization: {exc}") from None
        layers = typed_field(data, "layers", "list", where)
        activations = [NodeSensitivity.from_dict(node, f"{where}.activations[{index}]")
                       for index, node in enumerate(
                           typed_field(data, "activations", "list", where, default=[]))]
        seen: set[str] = set()
        for node in activations:
            if node.name in seen:
                raise SlimscopeError(f"{where}.activations: node {quote(node.name, 48)} is "
                                     "listed twice")
            seen.add(node.name)
        pruning_method = typed_field(data, "pruning_method", "str", where, default="magnitude")
        if pruning_method not in PRUNE_METHODS:
            raise SlimscopeError(f"{where}.pruning_method: {quote(pruning_method, 24)} is not "
                                 f"one of {', '.join(PRUNE_METHODS)}")
        return cls(
            method=typed_field(data, "method", "str", where),
            metric=typed_field(data, "metric", "str", where),
            higher_is_better=typed_field(data, "higher_is_better", "bool", where),
            baseline=typed_field(data, "baseline", "number", where),
            layers=[LayerSensitivity.from_dict(layer, f"{where}.layers[{index}]")
                    for index, layer in enumerate(layers)],
            quantization=quant.defaults["quantization"],  # type: ignore[arg-type]
            model_bytes=_count(data, "model_bytes", where),
            fixed_bytes=_count(data, "fixed_bytes", where),
            secondary_metric=typed_field(data, "secondary_metric", "str", where, default=None),
            secondary_baseline=typed_field(data, "secondary_baseline", "number", where,
                                           default=None),
            chance=typed_field(data, "chance", "number", where, default=None),
            collapse_fraction=typed_field(data, "collapse_fraction", "number", where, default=None),
            model=typed_field(data, "model", "str", where, default=""),
            data=typed_field(data, "data", "str", where, default=None),
            samples=_count(data, "samples", where, default=0),
            seconds=float(typed_field(data, "seconds", "number", where, default=0.0)),
            notes=list_of(typed_field(data, "notes", "list", where, default=[]), "str",
                          f"{where}.notes"),
            activations=activations,
            pruning_method=pruning_method,
        )

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        """Read a sensitivity JSON file, bounded in size and nesting (see engine.parsing)."""
        return cls.from_dict(read_json(Path(path), what="sensitivity"))


def _count(data: dict[str, Any], key: str, where: str, default: Any = REQUIRED) -> int:
    """A non-negative integer field (bytes, samples)."""
    value = typed_field(data, key, "int", where, default=default)
    if value < 0:
        raise SlimscopeError(f"{where}.{key}: {quote(value, 24)} must not be negative")
    return value


# -- levels: compressed weights made by the methods' own functions ---------------------------
def level_sections(axis: str, level: float, quantization: Quantization,
                   shape: Sequence[int] = (), prune_method: str = "magnitude") -> Sections:
    """The plan sections that compress one layer to `level` on `axis` (empty at the baseline);
    the rank axis needs the weight's `shape` to turn a fraction into a rank."""
    if level == BASELINE_LEVEL[axis]:
        return {}
    if axis == "sparsity":
        return {"pruning": Pruning(prune_method, amount=float(level))}
    if axis == "bits":
        return {"quantization": replace(quantization, bits=int(level))}
    return {"low_rank": LowRank(rank=rank_for_fraction(shape, level))}


def rank_for_fraction(shape: Sequence[int], fraction: float) -> int:
    """The rank a fraction of full rank means for a weight of this shape (at least 1)."""
    full = min(shape[0], math.prod(shape[1:]))
    return max(1, int(round(fraction * full)))


def keep_masks(scores: torch.Tensor, amounts: Sequence[float]) -> list[torch.Tensor]:
    """:func:`engine.methods.base.keep_top` for several amounts with a single sort.

    keep_top prunes the ``round(amount * numel)`` lowest scores, ties going by position (its
    sort is stable). Sorting once, each amount's mask keeps what lies above its threshold plus,
    among elements equal to the threshold, those past the first ones by position — the same
    masks (checked by the tests) for one sort instead of one per level.
    """
    flat = scores.detach().reshape(-1)
    ordered = np.sort(flat.float().cpu().numpy())
    masks = []
    for amount in amounts:
        n_prune = int(round(amount * flat.numel()))
        if n_prune == 0:
            masks.append(torch.ones(scores.shape, dtype=torch.bool))
            continue
        value = ordered[n_prune - 1]
        keep = flat > torch.tensor(value).to(flat.dtype)
        below = int(np.searchsorted(ordered, value, side="left"))
        tied = int(np.searchsorted(ordered, value, side="right")) - below
        pruned_tied = n_prune - below
        if pruned_tied < tied:  # the first tied elements by position go, the rest stay
            equal = flat == torch.tensor(value).to(flat.dtype)
            keep |= equal & (torch.cumsum(equal, 0) > pruned_tied)
        masks.append(keep.reshape(scores.shape))
    return masks


@dataclass
class Level:
    """One layer at one level: the weight it computes with (None when not asked for), the
    bytes that weight is stored in, and its non-zeros."""

    weight: torch.Tensor | None
    bytes: int
    nonzero: int


class LayerLevels:
    """One layer's weight at any level, made by the compression methods' own functions
    (keep_top's ranking, quantize_tensor, factorize; with input statistics, GPTQ's
    quantize_layer and OBS's prune_layer); magnitude order is sorted only once."""

    def __init__(self, layer: nn.Module, quantization: Quantization, *,
                 stats: InputStats | None = None, prune_method: str = "magnitude",
                 row_weight: torch.Tensor | None = None, name: str = "the layer") -> None:
        self.layer = layer
        self.weight = layer.weight.detach()
        self.quantization = quantization
        #: The layer's input statistics, for GPTQ bits and OBS sparsity levels.
        self.stats = stats
        self.prune_method = prune_method
        #: Per output row, the gain of a following BatchNorm (OBS weighs rows by it).
        self.row_weight = row_weight
        self.where = f"layer {quote(name)}"
        if (quantization.method != "rtn" or prune_method != "magnitude") and stats is None:
            raise SlimscopeError(f"{self.where}: GPTQ and OBS levels need its input statistics")
        self.float_bits = self.weight.element_size() * 8
        self.nonzero = int(torch.count_nonzero(self.weight))
        self._masks: dict[float, torch.Tensor] = {}

    def prepare_sparsity(self, amounts: Sequence[float]) -> None:
        """Masks for all these amounts from one sort."""
        missing = [a for a in amounts if a not in self._masks]
        if missing and self.prune_method == "magnitude":
            self._masks.update(zip(missing, keep_masks(self.weight.abs(), missing)))

    def level(self, axis: str, value: float, dense: bool = True) -> Level:
        """The layer at `value` on `axis`; `dense` False skips building a pruned weight."""
        weight, numel = self.weight, self.weight.numel()
        if value == BASELINE_LEVEL[axis]:
            return Level(weight, storage_bytes(numel, self.nonzero, self.float_bits),
                         self.nonzero)
        if axis == "sparsity":
            # magnitude pruning removes zeros first, so the count needs no pass over the weight
            nonzero = min(self.nonzero, numel - int(round(value * numel)))
            pruned = None
            if dense and self.prune_method == "obs":
                assert self.stats is not None
                # zero weights cost nothing to remove, so OBS too removes them first
                new, keep = prune_layer(weight, self.stats, Pruning("obs", amount=float(value)),
                                        self.row_weight, where=self.where)
                pruned = new.to(weight.dtype) * keep
                nonzero = int(torch.count_nonzero(pruned))
            elif dense:
                self.prepare_sparsity([value])
                pruned = weight * self._masks[value]
            return Level(pruned, storage_bytes(numel, nonzero, self.float_bits), nonzero)
        if axis == "bits":
            q = self.quantization
            if q.method == "gptq":
                assert self.stats is not None
                codes = quantize_layer(weight, self.stats, replace(q, bits=int(value)),
                                       where=self.where)
            else:
                codes = quantize_tensor(weight, int(value), q.symmetric, q.granularity,
                                        q.group_size, q.range)
            deq = codes.dequantize().to(weight.dtype)
            nonzero = int(torch.count_nonzero(deq))
            return Level(deq, storage_bytes(numel, nonzero, int(value), codes.overhead_bytes),
                         nonzero)
        pair = factorize(self.layer, LowRank(rank=rank_for_fraction(weight.shape, value)))
        if pair is None:  # not smaller: the low-rank method keeps the layer whole
            return self.level(axis, BASELINE_LEVEL[axis])
        first, second = (part.weight.detach() for part in pair)
        product = second.reshape(second.shape[0], -1) @ first.reshape(first.shape[0], -1)
        counts = [int(torch.count_nonzero(t)) for t in (first, second)]
        stored = sum(storage_bytes(t.numel(), n, self.float_bits)
                     for t, n in zip((first, second), counts))
        return Level(product.reshape(weight.shape), stored, sum(counts))

    def change(self, axis: str, value: float, level: Level) -> torch.Tensor:
        """δw, flat and float: what `level` (at `value`, not the baseline) does to the weight."""
        assert level.weight is not None
        return level.weight.float().reshape(-1) - self.weight.float().reshape(-1)

    def pruned_energies(self, amounts: Sequence[float], importance: torch.Tensor | float
                        ) -> list[float]:
        """``Σ importance · w²`` over the weights each amount prunes, all amounts in two passes:
        bucket every weight by the amounts' magnitude thresholds, sum per bucket, accumulate.
        Weights exactly at a threshold count as pruned (keep_top splits such ties by position;
        for an estimate the difference is negligible and ties are rare)."""
        magnitude = self.weight.float().abs().reshape(-1)
        ordered = np.sort(magnitude.numpy())
        cuts = [int(round(a * magnitude.numel())) for a in amounts]
        thresholds = torch.tensor([ordered[c - 1] if c else -1.0 for c in cuts])
        weights = importance.reshape(-1) if isinstance(importance, torch.Tensor) else importance
        energy = magnitude.square() * weights
        buckets = torch.bucketize(magnitude, thresholds)
        sums = torch.bincount(buckets, weights=energy.double(), minlength=len(cuts) + 1)
        return torch.cumsum(sums, 0)[:len(cuts)].tolist()


def _weighted_energy(change: torch.Tensor, importance: torch.Tensor | float) -> float:
    """``Σ importance · change²`` (`change` is a fresh tensor and may be overwritten)."""
    if isinstance(importance, torch.Tensor):
        return float(torch.dot(change.square_(), importance.reshape(-1)))
    return importance * float(torch.dot(change, change))


# -- which layers, and model-level sizes -------------------------------------------------------
def layer_infos(module: nn.Module, kinds: Mapping[str, str] | None = None) -> list[LayerInfo]:
    """The module's weight layers as plan resolution sees them, kinds from `kinds` where given.

    A torch.export module's layers are plain ``Module`` objects (the graph calls their weights,
    not them); the loader reads their real kinds from the graph's operators and the model's
    layers carry them, so :func:`sweep` passes those."""
    kinds = kinds or {}
    return [info._replace(kind=kinds.get(info.name, info.kind)) for info in module_layers(module)]


def sweepable_layers(module: nn.Module, kinds: Mapping[str, str] | None = None) -> list[str]:
    """Prunable and quantizable layers with a floating-point weight of their own (a weight
    tied to another layer cannot be compressed 'alone', so tied layers are left out).

    Ties are found by storage address: a TorchScript module hands out a new tensor object for
    its parameter on every access, so object identity would miss them."""
    owners: dict[tuple[int, tuple[int, ...]], list[str]] = defaultdict(list)
    candidates = []
    for info in layer_infos(module, kinds):
        weight = weight_of(module, info.name)
        key = (weight.data_ptr(), tuple(weight.shape))
        owners[key].append(info.name)
        if (info.kind in PRUNABLE_KINDS and info.kind in QUANTIZABLE_KINDS
                and weight.is_floating_point() and weight.dim() >= 2):
            candidates.append((info.name, key))
    return [name for name, key in candidates if len(owners[key]) == 1]


def model_sizes(module: nn.Module, swept: Sequence[str]) -> tuple[int, int]:
    """(bytes before compression, stored bytes of everything outside the swept weights),
    both counted exactly as compress()'s report counts them."""
    state = module.state_dict()
    before = sum(t.numel() * t.element_size() for t in state.values())
    swept_keys = {weight_key(name) for name in swept}
    nothing = CompressedModel(module=module)
    fixed = sum(tensor_storage_bytes(nothing, key, t) for key, t in state.items()
                if key not in swept_keys)
    return before, fixed


# -- shared plumbing ----------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, every submodule's flag restored after (as TorchRunner does)."""
    modes = [(m, m.training) for m in module.modules()]
    _set_eval(module)
    try:
        yield
    finally:
        for layer, training in modes:
            layer.training = training


def _set_eval(module: nn.Module) -> None:
    try:
        module.eval()
    except NotImplementedError:  # torch.export modules refuse it: they run as exported
        pass


def _arguments(module: nn.Module, batch: Inputs | torch.Tensor) -> tuple[Any, ...]:
    """The module's positional arguments for one batch (one array, or named inputs)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    return torch_arguments(module, batch)


def _fresh_state(module: nn.Module) -> None:
    """Streaming TorchScript models (Silero VAD) carry state from call to call; each piece
    starts from a fresh state, so every level of every layer sees the same inputs."""
    fresh_stream_state(module)


def _piece_size(module: nn.Module, size: int) -> int:
    """`size` rounded down to a multiple of the module's fixed batch (at least one batch)."""
    fixed = fixed_batch_of(module)
    return max(fixed, size // fixed * fixed) if fixed else size


def _forward(module: nn.Module, batch: Inputs | torch.Tensor, cancel: CancelToken
             ) -> np.ndarray:
    """The module's first output for a whole chunk, run in pieces (a big model's chunk takes
    seconds to cancel); a fixed-batch module gets pieces of exactly its batch, the last one
    padded with copies of its last sample whose outputs are dropped."""
    fixed = fixed_batch_of(module)
    step = fixed or PIECE
    total = batch_length(batch)  # type: ignore[arg-type]
    outputs = []
    for start in range(0, total, step):
        cancel.check()
        piece = take_samples(batch, start, min(start + step, total))  # type: ignore[arg-type]
        kept = batch_length(piece)
        if fixed:
            piece = pad_samples(piece, fixed)
        _fresh_state(module)
        outputs.append(_logits(module(*_arguments(module, piece))).numpy()[:kept])
    return np.concatenate(outputs)


def _logits(output: Any) -> torch.Tensor:
    return first_tensor(output).detach().float()


class _Scorer:
    """Scores outputs chunk by chunk against the labels and the original model's outputs."""

    def __init__(self, labels: list[np.ndarray | None], reference: list[np.ndarray]) -> None:
        self.labels = labels
        self.reference = reference
        self.has_labels = all(label is not None for label in labels)
        #: Without labels, one number per output position (silero's speech probability) is
        #: scored as a value: agreement and KL of a single class are constant.
        self.scores = not self.has_labels and bool(reference) and is_score_output(reference[0])

    def new(self) -> MetricTotals:
        return MetricTotals()

    def add(self, totals: MetricTotals, chunk: int, outputs: np.ndarray) -> None:
        if self.has_labels:
            totals.add_labels(outputs, self.labels[chunk])  # type: ignore[arg-type]
        totals.add_reference(outputs, self.reference[chunk])
        totals.samples += len(outputs)

    def metrics(self, totals: MetricTotals) -> Metrics:
        return totals.metrics(self.has_labels, True)

    @property
    def names(self) -> tuple[str, str]:
        return metric_names(self.has_labels, self.scores)

    def values(self, metrics: Metrics) -> tuple[float, float]:
        primary, secondary = (getattr(metrics, name) for name in self.names)
        if primary is None or secondary is None:
            raise SlimscopeError("the model's outputs have no class axis to score")
        return float(primary), float(secondary)


def metric_names(has_labels: bool, scores: bool) -> tuple[str, str]:
    """(primary, secondary) Metrics fields a sweep ranks by: accuracy and loss with labels;
    without, agreement and KL for class outputs, fidelity and MSE for score outputs."""
    if has_labels:
        return ("accuracy", "loss")
    return ("score_fidelity", "mse") if scores else ("agreement", "kl_divergence")


def _constant_answer_score(labels: list[np.ndarray | None], reference: list[np.ndarray]
                           ) -> float:
    """Accuracy (or agreement) of always answering the most frequent class; for score outputs
    without labels, the fidelity of always answering the original's median value."""
    if all(label is not None for label in labels):
        answers = np.concatenate([np.asarray(label).reshape(-1) for label in labels])
    elif reference and is_score_output(reference[0]):
        values = np.concatenate([out.astype(np.float64).reshape(-1) for out in reference])
        probabilities = bool(np.all((values >= 0.0) & (values <= 1.0)))
        scale = 1.0 if probabilities else (float(np.abs(values).mean()) or 1.0)
        return 1.0 - float(np.abs(values - np.median(values)).mean()) / scale
    else:
        answers = np.concatenate([out.argmax(-1).reshape(-1) for out in reference])
    return float(np.bincount(answers).max() / answers.size)


def _load_chunks(data: DataSource, size: int, module: nn.Module
                 ) -> tuple[list[Inputs], list[np.ndarray | None]]:
    """The data in chunks of `size` samples (a multiple of a fixed-batch module's batch), as
    the source gives them: one array, or named inputs (see engine.data)."""
    if len(data) == 0:
        raise SlimscopeError(f"{data.name}: no samples to measure sensitivity on")
    inputs, labels = [], []
    for batch, label in data.batches(_piece_size(module, size)):
        inputs.append(batch)
        labels.append(label)
    return inputs, labels


def _reference(module: nn.Module, inputs: list[Inputs], cancel: CancelToken
               ) -> list[np.ndarray]:
    return [_forward(module, x, cancel) for x in inputs]


def _private_copy(module: nn.Module) -> nn.Module:
    """A copy whose weights may be overwritten (TorchScript: saved and loaded, as the
    TorchScript backend copies; ScriptModules refuse deepcopy of their compiled state)."""
    if isinstance(module, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer, map_location="cpu")
    return copy.deepcopy(module)


def _hookable(module: nn.Module) -> bool:
    """Whether forward hooks on a layer see its calls: not in TorchScript (compiled code
    refuses hooks) nor in a torch.export module (its graph reads the weights, it never calls
    the layer)."""
    return not isinstance(module, (torch.jit.ScriptModule, fx.GraphModule))


# -- exact: evaluators for "this layer's output replaced by these weights' outputs" -------------
class _HookEvaluator:
    """Full forward passes with a hook substituting the layer's output: works on any module."""

    def __init__(self, module: nn.Module, inputs: list[Inputs], scorer: _Scorer,
                 cancel: CancelToken) -> None:
        self.module, self.inputs, self.scorer, self.cancel = module, inputs, scorer, cancel

    def group_size(self, name: str) -> int:
        return 1

    def metrics(self, name: str, weights: list[torch.Tensor]) -> list[Metrics]:
        layer = submodule(self.module, name)
        results = []
        for weight in weights:
            handle = layer.register_forward_hook(_substitute(weight), with_kwargs=True)
            totals = self.scorer.new()
            try:
                for index, x in enumerate(self.inputs):
                    self.scorer.add(totals, index, _forward(self.module, x, self.cancel))
            finally:
                handle.remove()
            results.append(self.scorer.metrics(totals))
        return results


class _SwapEvaluator:
    """Full forward passes of a private copy with the level's weight copied in, restored
    after: works where hooks do not (TorchScript, torch.export), at the cost of one copy."""

    def __init__(self, module: nn.Module, inputs: list[Inputs], scorer: _Scorer,
                 cancel: CancelToken) -> None:
        self.module = _private_copy(module)
        _set_eval(self.module)  # a private copy: its modes need no restoring
        self.inputs, self.scorer, self.cancel = inputs, scorer, cancel

    def group_size(self, name: str) -> int:
        return 1

    def metrics(self, name: str, weights: list[torch.Tensor]) -> list[Metrics]:
        target = weight_of(self.module, name)
        saved = target.detach().clone()
        results = []
        try:
            for weight in weights:
                with torch.no_grad():
                    target.copy_(weight)
                totals = self.scorer.new()
                for index, x in enumerate(self.inputs):
                    self.scorer.add(totals, index, _forward(self.module, x, self.cancel))
                results.append(self.scorer.metrics(totals))
        finally:
            with torch.no_grad():
                target.copy_(saved)
        return results


def _substitute(weight: torch.Tensor) -> Callable[..., Any]:
    """A forward hook returning what the layer computes with `weight` instead of its own."""
    active = False

    def hook(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        nonlocal active
        if active:  # functional_call below runs the layer (and so this hook) once more
            return None
        active = True
        try:
            return functional_call(layer, {"weight": weight}, args, kwargs)
        finally:
            active = False

    return hook


class _GraphEvaluator:
    """Runs an fx-traced model node by node over every data chunk, in layer order.

    The stream holds, per chunk, only the values that nodes at or after the current layer still
    use (its frontier). For a layer, the levels' outputs are concatenated along the batch axis,
    the frontier's data-carrying tensors repeated to match, and only the nodes after the layer
    run. The stream then runs the layer with its own weight and moves on: the whole model runs
    forward once, whatever the number of levels.
    """

    def __init__(self, traced: fx.GraphModule, inputs: list[Inputs], scorer: _Scorer,
                 settings: SweepSettings, cancel: CancelToken) -> None:
        self.traced, self.scorer, self.settings, self.cancel = traced, scorer, settings, cancel
        self.nodes = list(traced.graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(self.nodes):
            for source in node.all_input_nodes:
                self.last_use[source] = i
        self.free_after: dict[int, list[fx.Node]] = defaultdict(list)
        for node in self.nodes:
            if node.op != "output":
                self.free_after[self.last_use.get(node, self.position[node])].append(node)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.data_nodes = _reachable(placeholders)
        self.interpreter = fx.Interpreter(traced, garbage_collect_values=False)
        self.lengths = [batch_length(x) for x in inputs]  # type: ignore[arg-type]
        self.envs = [self._start(placeholders, _arguments(traced, x)) for x in inputs]
        self.at = len(placeholders)
        self.layer_nodes = _single_call_layers(self.nodes)

    @staticmethod
    def _start(placeholders: list[fx.Node], arguments: tuple[Any, ...]) -> dict[fx.Node, Any]:
        env: dict[fx.Node, Any] = dict(zip(placeholders, arguments))
        for extra in placeholders[len(arguments):]:
            env[extra] = extra.args[0] if extra.args else None  # optional inputs: defaults
        return env

    @classmethod
    def build(cls, module: nn.Module, inputs: list[Inputs], reference: list[np.ndarray],
              scorer: _Scorer, settings: SweepSettings, cancel: CancelToken
              ) -> tuple[_GraphEvaluator | None, str | None]:
        """The evaluator, or None and why when tracing fails or the trace computes otherwise."""
        if isinstance(module, torch.jit.ScriptModule):
            return None, "TorchScript cannot be traced by torch.fx: every layer was measured " \
                         "by whole-model passes with its weight swapped in"
        if not _hookable(module) or fixed_batch_of(module):
            return None, "a torch.export graph reads its weights directly (and may take one " \
                         "batch size only): every layer was measured by whole-model passes " \
                         "with its weight swapped in"
        try:
            traced = fx.symbolic_trace(module)
            cancel.check()
            head = take_samples(inputs[0], 0, PIECE)  # type: ignore[arg-type]
            check = _logits(traced(*_arguments(module, head))).numpy()
        except Exception as exc:  # noqa: BLE001 - any tracing failure means: use the fallback
            return None, f"torch.fx cannot trace the model ({type(exc).__name__}); " \
                         "every layer used full forward passes"
        expected = reference[0][:PIECE]
        if check.shape != expected.shape or not np.allclose(check, expected, rtol=1e-4,
                                                            atol=1e-5):
            return None, "the traced graph computes other outputs than the model; every layer " \
                         "used full forward passes"
        return cls(traced, inputs, scorer, settings, cancel), None

    def supports(self, name: str) -> bool:
        return name in self.layer_nodes

    def order(self, names: Sequence[str]) -> list[str]:
        return sorted((n for n in names if self.supports(n)),
                      key=lambda n: self.position[self.layer_nodes[n]])

    def _run(self, env: dict[fx.Node, Any], start: int, stop: int) -> None:
        self.interpreter.env = env
        check = self.cancel.check
        for i in range(start, stop):
            node = self.nodes[i]
            if node.op != "placeholder":
                check()  # per node: one suffix pass of a big model takes many seconds
                env[node] = self.interpreter.run_node(node)
            for dead in self.free_after.get(i, ()):
                env.pop(dead, None)

    def _advance(self, stop: int) -> None:
        for index, env in enumerate(self.envs):
            self.cancel.check()
            self._run(env, self.at, stop)
            if index == 0:
                self._check_cache(env)
        self.at = stop

    def _check_cache(self, env: dict[fx.Node, Any]) -> None:
        """Refuse, before memory runs out, to hold every sample's activations when they do not
        fit the cache budget."""
        per_sample = sum(v.numel() * v.element_size() for n, v in env.items()
                         if n in self.data_nodes and isinstance(v, torch.Tensor)) / self.lengths[0]
        needed = per_sample * sum(self.lengths)
        if needed > self.settings.cache_bytes:
            raise SlimscopeError(
                f"the exact method would keep {needed / 2**30:.1f} GiB of activations for "
                f"{sum(self.lengths)} samples (limit {self.settings.cache_bytes / 2**30:.1f} "
                "GiB); use fewer samples, or the fast method")

    def group_size(self, name: str) -> int:
        """How many levels one suffix pass can carry for this layer, within the memory bounds."""
        node = self.layer_nodes[name]
        self._advance(self.position[node])
        env = self.envs[0]
        frontier = self._frontier(node, env)
        per_level = 0
        for value in frontier.values():
            if not isinstance(value, torch.Tensor) or value.dim() == 0 \
                    or value.shape[0] != self.lengths[0]:
                return 1  # a batch-size-dependent non-tensor (e.g. x.size(0)): no batching
            per_level += value.numel() * value.element_size()
        output = self._layer_output(node, env, None)
        per_level += output.numel() * output.element_size()
        by_memory = self.settings.batch_bytes // max(per_level, 1)
        by_batch = self.settings.max_batch // max(self.lengths[0], 1)
        return max(1, min(by_memory, by_batch))

    def _frontier(self, node: fx.Node, env: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
        """Data-carrying values that nodes after `node` still need."""
        here = self.position[node]
        return {n: v for n, v in env.items()
                if n in self.data_nodes and self.last_use.get(n, -1) > here}

    def _layer_output(self, node: fx.Node, env: dict[fx.Node, Any],
                      weight: torch.Tensor | None) -> torch.Tensor:
        self.interpreter.env = env
        args, kwargs = self.interpreter.fetch_args_kwargs_from_env(node)
        layer = submodule(self.traced, str(node.target))
        if weight is None:
            return layer(*args, **kwargs)
        return functional_call(layer, {"weight": weight}, args, kwargs)

    def metrics(self, name: str, weights: list[torch.Tensor]) -> list[Metrics]:
        node = self.layer_nodes[name]
        here = self.position[node]
        self._advance(here)
        group = len(weights)
        totals = [self.scorer.new() for _ in weights]
        for index, env in enumerate(self.envs):
            self.cancel.check()
            outputs = torch.cat([self._layer_output(node, env, w) for w in weights])
            batched: dict[fx.Node, Any] = {
                n: (_repeat(v, group) if n in self.data_nodes else v)
                for n, v in env.items() if self.last_use.get(n, -1) > here
            }
            batched[node] = outputs
            self._run(batched, here + 1, len(self.nodes))
            logits = _logits(batched[self.nodes[-1]]).numpy()
            for level, part in enumerate(np.split(logits, group)):
                self.scorer.add(totals[level], index, part)
        return [self.scorer.metrics(t) for t in totals]


def _repeat(value: Any, times: int) -> Any:
    """`times` copies along the batch axis; always a copy, so in-place ops downstream cannot
    change the cached frontier."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.repeat(times, *([1] * (value.dim() - 1))) if times > 1 else value.clone()


def _reachable(starts: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(starts)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.users)
    return seen


def _single_call_layers(nodes: list[fx.Node]) -> dict[str, fx.Node]:
    """Layer name -> its call_module node, for modules called exactly once."""
    calls: dict[str, list[fx.Node]] = defaultdict(list)
    for node in nodes:
        if node.op == "call_module":
            calls[str(node.target)].append(node)
    return {name: found[0] for name, found in calls.items() if len(found) == 1}


# -- the three methods, and the naive definition ------------------------------------------------
def sweep(
    model: Model,
    data: DataSource | None = None,
    method: str = "exact",
    settings: SweepSettings | None = None,
    *,
    layers: Sequence[str] | None = None,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> Sensitivity:
    """Sensitivity of every sweepable layer (or the named `layers`) of a loaded model.

    Models without a torch module (ONNX graphs, weights only) are swept through their backend
    (engine.sensitivity_backends): the same results, measured with ONNX Runtime or computed
    from the weights alone."""
    if model.module is None or not model.can(TORCH_MODULE):
        from engine.sensitivity_backends import sweep_backend

        if settings is not None and settings.compensated:
            raise SlimscopeError(f"sweeping with GPTQ or OBS levels needs a PyTorch module; "
                                 f"{model.path.name} has none (use --quant-method rtn "
                                 "--prune-method magnitude)")

        return sweep_backend(model, data, method, settings, layers=layers, progress=progress,
                             cancel=cancel)
    module = model.require_module("sensitivity analysis")
    model.require_finite("sensitivity analysis")
    result = sweep_module(module, data, method, settings, layers=layers, progress=progress,
                          cancel=cancel, kinds={layer.name: layer.kind for layer in model.layers})
    result.model = model.path.name
    return result


def sweep_module(
    module: nn.Module,
    data: DataSource | None = None,
    method: str = "exact",
    settings: SweepSettings | None = None,
    *,
    layers: Sequence[str] | None = None,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
    kinds: Mapping[str, str] | None = None,
) -> Sensitivity:
    """:func:`sweep` on a bare torch module; `method` may also be "naive" (the slow definition
    the exact method reproduces, kept for tests and benchmarks). `kinds` (layer name -> kind)
    overrides what the module's classes say (see :func:`layer_infos`)."""
    settings = settings or SweepSettings()
    runners = {"exact": _exact, "fast": _fast, "datafree": _datafree, "naive": _naive}
    if method not in runners:
        raise SlimscopeError(f"unknown sensitivity method {method!r} (choose {', '.join(METHODS)})")
    if method != "datafree" and data is None:
        raise SlimscopeError(f"the {method} method needs data; give some, or use 'datafree'")
    settings.check_methods()
    if settings.compensated and method not in ("exact", "naive"):
        raise SlimscopeError(f"GPTQ and OBS levels are measured by the exact method only, not "
                             f"{method}")
    infos = layer_infos(module, kinds)
    names = list(layers) if layers is not None else sweepable_layers(module, kinds)
    uncompensated: list[str] = []
    if settings.compensated and layers is None:
        # GPTQ/OBS need a layer's input statistics: sweep only layers whose can be collected
        uncompensated = [n for n in names if not isinstance(submodule(module, n), SUPPORTED)]
        names = [n for n in names if n not in uncompensated]
    if not names:
        raise SlimscopeError("the model has no layers that can be pruned and quantized"
                             + (" with GPTQ or OBS" if uncompensated else ""))
    _check_settings(infos, names, settings)
    started = time.perf_counter()
    result = runners[method](module, names, data, settings, progress, cancel,
                             {info.name: info.kind for info in infos})
    result.pruning_method = settings.prune_method
    if uncompensated:
        result.notes.append("not swept (GPTQ and OBS work on Linear, Conv1d and Conv2d "
                            f"layers only): {', '.join(uncompensated)}")
    result.seconds = time.perf_counter() - started
    result.model_bytes, result.fixed_bytes = model_sizes(module, names)
    if data is not None and method != "datafree":
        result.data, result.samples = data.describe(), len(data)
    progress(1.0, f"{method} sensitivity of {len(names)} layers in {result.seconds:.1f} s")
    return result


def _check_settings(all_infos: list[LayerInfo], names: list[str], settings: SweepSettings
                    ) -> None:
    """Let plan resolution say, naming the layer, if the quantizer does not fit some layer."""
    settings.axes()
    sections: Sections = {"quantization": replace(settings.quantization, bits=settings.bits[0]
                                                   if settings.bits else 8)}
    infos = [info for info in all_infos if info.name in set(names)]
    missing = set(names) - {info.name for info in infos}
    if missing:
        raise SlimscopeError(f"no weight layer named {sorted(missing)[0]!r} in the model")
    Plan(layers={name: dict(sections) for name in names}).resolve(infos)


def _layer_axes(module: nn.Module, name: str, settings: SweepSettings) -> list[str]:
    """The axes this layer is swept on: rank only for what the low-rank method can factorize
    (an eager Linear or ungrouped Conv2d; not TorchScript or torch.export layers)."""
    layer = submodule(module, name)
    axes = settings.axes()
    factorizable = type(layer) in (nn.Linear, nn.Conv2d) and getattr(layer, "groups", 1) == 1
    if "rank" in axes and not factorizable:
        axes.remove("rank")
    return axes


def _new_result(method: str, metric: str, higher: bool, baseline: float,
                settings: SweepSettings, **extra: Any) -> Sensitivity:
    return Sensitivity(method=method, metric=metric, higher_is_better=higher, baseline=baseline,
                       layers=[], quantization=settings.quantization, model_bytes=0,
                       fixed_bytes=0, **extra)


def _layer_result(module: nn.Module, name: str, curves: dict[str, Curve],
                  kinds: Mapping[str, str]) -> LayerSensitivity:
    weight = weight_of(module, name)
    return LayerSensitivity(name, kinds[name], tuple(weight.shape), curves,
                            weight.element_size() * 8)


def _exact(module: nn.Module, names: list[str], data: DataSource, settings: SweepSettings,
           progress: Progress, cancel: CancelToken, kinds: Mapping[str, str]) -> Sensitivity:
    progress(0.0, "caching activations")
    inputs, labels = _load_chunks(data, settings.chunk_size, module)
    with _eval_mode(module), torch.inference_mode():
        reference = _reference(module, inputs, cancel)
        scorer = _Scorer(labels, reference)
        totals = scorer.new()
        for index, outputs in enumerate(reference):
            scorer.add(totals, index, outputs)
        baseline, secondary_baseline = scorer.values(scorer.metrics(totals))
        chance = _constant_answer_score(labels, reference)
        graph, note = _GraphEvaluator.build(module, inputs, reference, scorer, settings, cancel)
        wholes: dict[type, _HookEvaluator | _SwapEvaluator] = {}
        ordered = graph.order(names) if graph else []
        ordered += [n for n in names if n not in ordered]
        primary_name, secondary_name = scorer.names
        result = _new_result("exact", primary_name, True, baseline, settings,
                             secondary_metric=secondary_name,
                             secondary_baseline=secondary_baseline, chance=chance,
                             collapse_fraction=settings.collapse_fraction)
        if note:
            result.notes.append(note)
        fallback = [n for n in names if not (graph and graph.supports(n))]
        if graph and fallback:
            result.notes.append("layers not called exactly once as a module (full forward "
                                f"passes instead): {', '.join(fallback)}")
        floor = chance + settings.collapse_fraction * (baseline - chance)
        stats, gains = _compensation_inputs(module, names, data, settings, progress, cancel)
        curves_by_layer = {}
        for i, name in enumerate(ordered):
            if graph and graph.supports(name):
                evaluator: _GraphEvaluator | _HookEvaluator | _SwapEvaluator = graph
            else:
                # A recurrent weight is one of several its module reads: no hook can swap it.
                kind = _HookEvaluator if _hookable(module) and not is_recurrent_weight(
                    name.rpartition(".")[2]) else _SwapEvaluator
                if kind not in wholes:
                    wholes[kind] = kind(module, inputs, scorer, cancel)
                evaluator = wholes[kind]
            layer_progress = sub_progress(progress, i / len(ordered), (i + 1) / len(ordered))
            levels_of = LayerLevels(submodule(module, name), settings.quantization,
                                    stats=stats.get(name), prune_method=settings.prune_method,
                                    row_weight=gains.get(name), name=name)
            curves_by_layer[name] = _exact_layer(
                module, name, evaluator, settings, (baseline, secondary_baseline), floor,
                layer_progress, cancel, levels_of)
    result.layers = [_layer_result(module, n, curves_by_layer[n], kinds) for n in names]
    return result


def _exact_layer(module: nn.Module, name: str,
                 evaluator: _GraphEvaluator | _HookEvaluator | _SwapEvaluator,
                 settings: SweepSettings, baselines: tuple[float, float], floor: float,
                 progress: Progress, cancel: CancelToken, levels_of: LayerLevels
                 ) -> dict[str, Curve]:
    group = evaluator.group_size(name)
    axes = _layer_axes(module, name, settings)
    curves = {}
    for a, axis in enumerate(axes):
        levels = settings.levels(axis)
        if axis == "sparsity":
            levels_of.prepare_sparsity(levels[1:])
        base = levels_of.level(axis, levels[0])
        curve = Curve([levels[0]], [baselines[0]], [0.0], [base.bytes], [base.nonzero],
                      [BASELINE], [baselines[1]])
        todo = levels[1:]
        while todo:
            cancel.check()
            batch, todo = todo[:group], todo[group:]
            progress((a + len(curve.levels) / len(levels)) / len(axes), f"{name}: {axis} {batch}")
            made = [levels_of.level(axis, value) for value in batch]
            weights = [level.weight for level in made]
            for value, level, metrics in zip(batch, made, evaluator.metrics(name, weights)):
                primary, secondary = evaluator.scorer.values(metrics)
                _append(curve, value, primary, primary - baselines[0], level.bytes,
                        level.nonzero, MEASURED, secondary)
            if min(curve.metric[-len(batch):]) <= floor < baselines[0]:
                for value in todo:  # collapsed: see the module docstring
                    level = levels_of.level(axis, value, dense=False)
                    _append(curve, value, curve.metric[-1], curve.delta[-1], level.bytes,
                            level.nonzero, EXTRAPOLATED, curve.secondary[-1])  # type: ignore[index]
                todo = []
        curves[axis] = curve
    return curves


def _compensation_inputs(module: nn.Module, names: list[str], data: DataSource,
                         settings: SweepSettings, progress: Progress, cancel: CancelToken
                         ) -> tuple[dict[str, InputStats], dict[str, torch.Tensor]]:
    """Each layer's input statistics (and, for OBS, a following BatchNorm's per-channel gain),
    collected once for the whole sweep on the calibration batches compress() would use (the
    data's first samples): with only one layer compressed at a time, every layer's inputs are
    the original model's, so these are exactly the statistics GPTQ/OBS see for it there."""
    if not settings.compensated:
        return {}, {}
    from engine.compress import calibration_batches  # deferred: compress pulls in every backend

    batches = calibration_batches(data, module=module)
    progress(0.0, "layer-input statistics for GPTQ/OBS levels")
    stats = collect_input_stats(module, names, batches, cancel=cancel)
    gains = batchnorm_gains(module, names, batches) if settings.prune_method == "obs" else {}
    return stats, gains


def _append(curve: Curve, level: float, metric: float, delta: float, stored: int, nonzero: int,
            status: str, secondary: float | None = None) -> None:
    curve.levels.append(level)
    curve.metric.append(metric)
    curve.delta.append(delta)
    curve.bytes.append(stored)
    curve.nonzero.append(nonzero)
    curve.status.append(status)
    if curve.secondary is not None:
        curve.secondary.append(secondary)  # type: ignore[arg-type]


def _naive(module: nn.Module, names: list[str], data: DataSource, settings: SweepSettings,
           progress: Progress, cancel: CancelToken, kinds: Mapping[str, str]) -> Sensitivity:
    """For each layer and level: deep-copy, compress that layer alone, evaluate all the data."""
    original = TorchRunner(module)
    base_metrics = evaluate(original, data, reference=None if data.has_labels else original,
                            cancel=cancel)
    primary_name, secondary_name = metric_names(data.has_labels,
                                                base_metrics.score_fidelity is not None)
    baseline = getattr(base_metrics, primary_name)
    secondary_baseline = getattr(base_metrics, secondary_name)
    result = _new_result("naive", primary_name, True, baseline, settings,
                         secondary_metric=secondary_name, secondary_baseline=secondary_baseline)
    batches = None
    if settings.compensated:
        from engine.compress import calibration_batches

        batches = calibration_batches(data, module=module)
    for i, name in enumerate(names):
        shape = weight_of(module, name).shape
        curves = {}
        for axis in _layer_axes(module, name, settings):
            curve = Curve([], [], [], [], [], [], [])
            for level in settings.levels(axis):
                cancel.check()
                progress(i / len(names), f"{name}: {axis} {level}")
                sections = level_sections(axis, level, settings.quantization, shape,
                                          settings.prune_method)
                compressed = apply_plan(module, Plan(layers={name: sections}),
                                        calibration=batches, cancel=cancel)
                metrics = evaluate(TorchRunner(compressed.module), data,
                                   reference=None if data.has_labels else original, cancel=cancel)
                primary = getattr(metrics, primary_name)
                secondary = getattr(metrics, secondary_name)
                stored, nonzero = _compressed_layer_bytes(compressed, name)
                _append(curve, level, primary, primary - baseline, stored, nonzero, MEASURED,
                        secondary)
            curves[axis] = curve
        result.layers.append(_layer_result(module, name, curves, kinds))
    return result


def _compressed_layer_bytes(compressed: CompressedModel, name: str) -> tuple[int, int]:
    keys = [f"{name}.0.weight", f"{name}.1.weight"] if name in compressed.low_rank \
        else [weight_key(name)]
    state = compressed.module.state_dict()
    stored = sum(tensor_storage_bytes(compressed, key, state[key]) for key in keys)
    return stored, sum(int(torch.count_nonzero(state[key])) for key in keys)


# -- estimates ------------------------------------------------------------------------------------
def fisher_diagonal(module: nn.Module, names: Sequence[str],
                    inputs: Sequence[Inputs | torch.Tensor],
                    labels: list[np.ndarray], micro_batch: int = 1,
                    cancel: CancelToken = NEVER_CANCELLED) -> tuple[dict[str, torch.Tensor], float]:
    """Diagonal empirical Fisher of the mean cross-entropy for the named layers' weights, and
    that mean loss — one forward and backward pass over the data.

    Per-sample gradients give ``F = mean_j g_j²``. Micro-batches of B samples give the mean
    gradient ḡ of B samples; ``B² ḡ²`` estimates the sum of their squared gradients (the
    cross terms average out), so larger micro-batches trade accuracy of F for speed. A module
    that takes one batch size only gets micro-batches of exactly that size (the last padded,
    its padding left out of the loss).
    """
    fixed = fixed_batch_of(module)
    micro_batch = fixed or micro_batch
    weights = {name: weight_of(module, name) for name in names}
    flags = {name: w.requires_grad for name, w in weights.items()}
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    total_loss, count = 0.0, 0
    try:
        for w in weights.values():
            w.requires_grad_(True)
        with _eval_mode(module), torch.enable_grad():
            for x, y in zip(inputs, labels):
                total = batch_length(x)  # type: ignore[arg-type]
                for start in range(0, total, micro_batch):
                    cancel.check()
                    stop = min(start + micro_batch, total)
                    xb = take_samples(x, start, stop)  # type: ignore[arg-type]
                    if fixed:
                        xb = pad_samples(xb, fixed)  # type: ignore[arg-type]
                    yb = torch.from_numpy(np.asarray(y[start:stop])).long()
                    _fresh_state(module)
                    logits = first_tensor(module(*_arguments(module, xb))).float()[:stop - start]
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))
                    grads = torch.autograd.grad(loss, list(weights.values()))
                    for name, grad in zip(weights, grads):
                        fisher[name] += grad.float().square() * ((stop - start) ** 2)
                    total_loss += float(loss.detach()) * (stop - start)
                    count += stop - start
    finally:
        for name, w in weights.items():
            w.requires_grad_(flags[name])
    return {name: f / count for name, f in fisher.items()}, total_loss / count


def _estimate_curves(module: nn.Module, name: str, importance: torch.Tensor | float,
                     baseline: float, settings: SweepSettings, cancel: CancelToken
                     ) -> dict[str, Curve]:
    """Curves of ``baseline + ½ Σ importance · δw²`` with δw from each level's real weight."""
    levels_of = LayerLevels(submodule(module, name), settings.quantization)
    return estimate_curves(levels_of, _layer_axes(module, name, settings), importance, baseline,
                           settings, cancel)


def estimate_curves(levels_of: LayerLevels, axes: Sequence[str], importance: torch.Tensor | float,
                    baseline: float, settings: SweepSettings, cancel: CancelToken
                    ) -> dict[str, Curve]:
    """:func:`_estimate_curves` for a layer given by its levels (any backend's weight)."""
    curves = {}
    for axis in axes:
        levels = settings.levels(axis)
        curve = Curve([], [], [], [], [], [])
        pruned = levels_of.pruned_energies(levels[1:], importance) if axis == "sparsity" \
            else None
        for i, value in enumerate(levels):
            cancel.check()
            level = levels_of.level(axis, value, dense=pruned is None)
            if i == 0:
                energy = 0.0
            elif pruned is not None:
                energy = pruned[i - 1]
            else:
                energy = _weighted_energy(levels_of.change(axis, value, level), importance)
            _append(curve, value, baseline + energy / 2, energy / 2, level.bytes, level.nonzero,
                    BASELINE if i == 0 else ESTIMATED)
        curves[axis] = curve
    return curves


def _fast(module: nn.Module, names: list[str], data: DataSource, settings: SweepSettings,
          progress: Progress, cancel: CancelToken, kinds: Mapping[str, str]) -> Sensitivity:
    progress(0.0, "one forward and backward pass")
    inputs, labels = _load_chunks(data, settings.chunk_size, module)
    if not all(label is not None for label in labels):
        with _eval_mode(module), torch.inference_mode():  # no labels: the model's own top-1
            reference = _reference(module, inputs, cancel)
        if is_score_output(reference[0]):
            raise SlimscopeError("the fast estimate needs class outputs or labels, and this "
                                 "model outputs one score per sample; use the exact or "
                                 "datafree method")
        labels = [out.argmax(-1) for out in reference]
    fisher, loss = fisher_diagonal(module, names, inputs, labels,  # type: ignore[arg-type]
                                   settings.fisher_batch, cancel)
    result = _new_result("fast", "loss", False, loss, settings)
    if not data.has_labels:
        result.notes.append("no labels: the loss is against the model's own top-1 predictions")
    for i, name in enumerate(names):
        progress(0.5 + 0.5 * i / len(names), f"estimating {name}")
        result.layers.append(_layer_result(
            module, name, _estimate_curves(module, name, fisher[name], loss, settings, cancel),
            kinds))
    return result


def _datafree(module: nn.Module, names: list[str], data: DataSource | None,
              settings: SweepSettings, progress: Progress, cancel: CancelToken,
              kinds: Mapping[str, str]) -> Sensitivity:
    result = _new_result("datafree", "weight_nsr", False, 0.0, settings)
    for i, name in enumerate(names):
        progress(i / len(names), f"weight error of {name}")
        weight = weight_of(module, name).detach().float()
        energy = float(weight.square().sum()) or 1.0
        # ½ · (2 / energy) · Σ δw² = ‖δw‖² / ‖w‖²
        result.layers.append(_layer_result(
            module, name, _estimate_curves(module, name, 2.0 / energy, 0.0, settings, cancel),
            kinds))
    return result


# -- comparing methods ------------------------------------------------------------------------
def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation with average ranks for ties (numpy only)."""
    x, y = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator else float("nan")


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end - 1) / 2.0
            start = end
    return ranks


def paired_drops(a: Sensitivity, b: Sensitivity, *, secondary_a: bool = False,
                 secondary_b: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Both results' drops at every (layer, axis, non-baseline level) they share, paired."""
    xs, ys = [], []
    for layer_a in a.layers:
        layer_b = b.layer(layer_a.name)
        for axis, curve in layer_a.curves.items():
            if axis not in layer_b.curves:
                continue
            drops_a = a.drops(layer_a, axis, secondary_a)
            drops_b = dict(zip(layer_b.curves[axis].levels, b.drops(layer_b, axis, secondary_b)))
            for level, drop in zip(curve.levels[1:], drops_a[1:]):
                if level in drops_b:
                    xs.append(drop)
                    ys.append(drops_b[level])
    return np.asarray(xs), np.asarray(ys)

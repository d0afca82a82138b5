"""A plan's compressed size from shapes alone: what the plan editor shows while the user edits.

It answers "how big will this be?" without compressing, counting with :mod:`engine.storage`
(the rule compress()'s report uses) on the tensor shapes the plan will produce. What it cannot
know without running the methods is estimated, and the layer's prediction says so (`caveat`):

* unstructured pruning keeps ``numel - round(amount · numel)`` weights (N:M keeps N of M);
  weights that quantization happens to round to zero are not foreseen (the sensitivity curves,
  which quantize for real, do see them, so :func:`engine.allocate.predict_plan` can be a little
  smaller);
* structured pruning narrows the layer's own outputs only (the next layer's inputs shrink too);
* an energy-chosen rank needs the singular values, computed once per layer and cached.

torch is imported only for an SVD, so sizing a plan costs the GUI thread no import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

import numpy as np

from engine.model import Layer, Model
from engine.plan import LayerPlan
from engine.storage import FLOAT_FORMAT_BITS, scale_overhead, storage_bytes

#: Layers above this many weights get no SVD (it would stall the caller); their energy rank is
#: then unknown.
MAX_SVD_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class LayerPrediction:
    name: str
    bytes_before: int
    bytes_after: int
    #: The rank a low-rank setting will give, when there is one and it is known.
    rank: int | None = None
    #: Why the figure is only an estimate, or "" when it follows the storage rule exactly.
    caveat: str = ""


@dataclass
class PlanPrediction:
    """Per-layer and whole-model bytes before and after, as compress() will count them."""

    layers: dict[str, LayerPrediction] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


class _LayerFacts(NamedTuple):
    bytes_before: int
    numel: int
    weight_bits: int
    bias_numel: int
    bias_bits: int
    #: Bytes of the bias when it is kept as it is.
    bias_kept: int


class SizePredictor:
    """Predicts a model's compressed size for any resolved plan; caches per-layer SVDs."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._singular_values: dict[str, np.ndarray | None] = {}
        self._facts: dict[str, _LayerFacts] = {}
        self._model_bytes = model.nbytes  # a sum over every tensor: once, not per prediction

    def predict(self, resolved: Mapping[str, LayerPlan],
                sparsity: Mapping[str, float] | None = None) -> PlanPrediction:
        """`sparsity` gives layers' current fraction of zeros where known (kept zeros pay off)."""
        sparsity = sparsity or {}
        out = PlanPrediction(bytes_before=self._model_bytes)
        layer_bytes = 0
        for layer in self.model.layers:
            if layer.shared_with:
                continue  # a tied weight is stored, and counted, once
            prediction = self.predict_layer(layer, resolved.get(layer.name), sparsity.get(layer.name, 0.0))
            out.layers[layer.name] = prediction
            layer_bytes += prediction.bytes_before
            out.bytes_after += prediction.bytes_after
        out.bytes_after += out.bytes_before - layer_bytes  # buffers and the rest stay as they are
        return out

    def _facts_of(self, layer: Layer) -> "_LayerFacts":
        """What the plan cannot change, worked out once per layer: the app re-predicts every
        layer on each edit (300k layers took 2.7 s a time)."""
        facts = self._facts.get(layer.name)
        if facts is None:
            tensors = self.model.tensors
            weight_bits = tensors.itemsizes[layer.weight_key] * 8
            bias_numel = tensors.numel(layer.bias_key) if layer.bias_key else 0
            bias_bits = tensors.itemsizes[layer.bias_key] * 8 if layer.bias_key else 0
            before = tensors.nbytes(layer.weight_key) + bias_numel * bias_bits // 8
            facts = _LayerFacts(before, math.prod(layer.shape), weight_bits, bias_numel,
                                bias_bits, storage_bytes(bias_numel, bias_numel, bias_bits))
            self._facts[layer.name] = facts
        return facts

    def predict_layer(self, layer: Layer, layer_plan: LayerPlan | None, sparsity: float = 0.0
                      ) -> LayerPrediction:
        before, numel, weight_bits, bias_numel, bias_bits, bias_kept = self._facts_of(layer)
        if layer_plan is None or layer_plan.keep:
            nonzero = numel - round(sparsity * numel)
            after = storage_bytes(numel, nonzero, weight_bits) + bias_kept
            return LayerPrediction(layer.name, before, after)
        caveats: list[str] = []
        shapes = [tuple(layer.shape)]
        rank = None
        if layer_plan.low_rank is not None and len(layer.shape) >= 2:
            rank = self._rank(layer, layer_plan)
            out_ch, row = layer.shape[0], numel // layer.shape[0]
            if rank is None:
                caveats.append("rank unknown: the layer is too big to decompose here")
            elif rank * (out_ch + row) < numel:
                shapes = [(rank, *layer.shape[1:]), (out_ch, rank)]
            else:
                caveats.append("this rank would not shrink the layer: it stays whole")
                rank = None
        pruning, quant = layer_plan.pruning, layer_plan.quantization
        if pruning is not None and pruning.method == "structured":
            shapes = [(s[0] - min(round((pruning.amount or 0) * s[0]), s[0] - 1), *s[1:]) for s in shapes]
            caveats.append("structured pruning also narrows the next layer, not counted here")
        if pruning is not None and pruning.method == "magnitude-global":
            caveats.append("global pruning spreads its amount unevenly over layers")
        bits = weight_bits
        if quant is not None:
            bits = FLOAT_FORMAT_BITS[quant.bits] if quant.is_float else int(quant.bits)
        after = 0
        for shape in shapes:
            count = math.prod(shape)
            nonzero = count - round(sparsity * count)
            if pruning is not None and pruning.is_nm:
                n, m = pruning.nm
                nonzero = min(nonzero, count * n // m)
            elif pruning is not None and pruning.method != "structured":
                nonzero = min(nonzero, count - round((pruning.amount or 0.0) * count))
            after += storage_bytes(count, nonzero, bits, scale_overhead(quant, shape))
        if pruning is not None and pruning.method == "structured":
            bias_numel = min(bias_numel, shapes[-1][0])
        bias_stored_bits = 16 if quant is not None and quant.is_float else bias_bits
        after += storage_bytes(bias_numel, bias_numel, bias_stored_bits)
        if quant is not None and not quant.is_float and bits <= 4:
            caveats.append("low-bit codes round some weights to zero, which can store smaller")
        return LayerPrediction(layer.name, before, after, rank, "; ".join(caveats))

    def _rank(self, layer: Layer, layer_plan: LayerPlan) -> int | None:
        from engine.methods.lowrank import rank_multiple

        setting = layer_plan.low_rank
        assert setting is not None
        out_ch = layer.shape[0]
        full = min(out_ch, math.prod(layer.shape) // out_ch)
        if setting.rank is not None:
            return min(setting.rank, full)
        values = self._svd(layer)
        if values is None:
            return None
        import torch

        from engine.methods.lowrank import rank_for_energy

        multiple = rank_multiple(layer_plan)
        rank = rank_for_energy(torch.from_numpy(values), float(setting.energy))
        return min(-(-rank // multiple) * multiple, full)

    def _svd(self, layer: Layer) -> np.ndarray | None:
        if layer.name not in self._singular_values:
            values = None
            if math.prod(layer.shape) <= MAX_SVD_ELEMENTS:
                import torch

                weight = self.model.weight(layer).reshape(layer.shape[0], -1)
                values = torch.linalg.svdvals(torch.from_numpy(np.array(weight, np.float64))).numpy()
            self._singular_values[layer.name] = values
        return self._singular_values[layer.name]

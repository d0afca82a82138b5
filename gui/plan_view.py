"""How a resolved plan reads and weighs on screen: one-line action text and predicted bytes.

The prediction answers "how big will this be?" while the user edits, without compressing. It
follows the storage rule of :func:`engine.compress.tensor_storage_bytes` (packed codes plus
scales, or a 1-bit mask plus the non-zeros when that is smaller) on the tensor shapes the plan
will produce; what it cannot know without running the methods is estimated:

* unstructured pruning keeps ``numel - round(amount · numel)`` weights (N:M keeps N of M);
  weights that quantization happens to round to zero are not foreseen;
* structured pruning narrows the layer's own outputs only (the next layer's inputs shrink too);
* an energy-chosen rank needs the singular values, computed once per layer and cached.

The rule itself belongs in the engine (see the report that introduced this module); until the
engine has a shape-only twin of ``tensor_storage_bytes``, :func:`storage_bytes` restates it and
``tests/gui/test_plan_editor.py`` checks it against real compression reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from engine.model import PRUNABLE_KINDS, QUANTIZABLE_KINDS, Layer, Model
from engine.plan import LOW_RANK_KINDS, NM_KINDS, STRUCTURED_KINDS, LayerPlan, LowRank, Quantization

FLOAT_BITS = {"fp16": 16, "bf16": 16}
#: Layers above this many weights get no SVD on the GUI thread; their energy rank is unknown.
MAX_SVD_ELEMENTS = 4_000_000


def action_text(layer_plan: LayerPlan | None) -> str:
    """'prune 50% · int8/ch', '2:4 · int4 g32', 'rank 32', 'fp16' or 'keep'."""
    if layer_plan is None or layer_plan.keep:
        return "keep"
    parts: list[str] = []
    if layer_plan.low_rank is not None:
        parts.append(low_rank_text(layer_plan.low_rank))
    pruning = layer_plan.pruning
    if pruning is not None:
        if pruning.method == "nm":
            parts.append(pruning.pattern or "2:4")
        elif pruning.method == "structured":
            parts.append(f"−{_pct(pruning.amount)} channels")
        else:
            tag = {"magnitude": "", "magnitude-global": " global", "gradient": " grad",
                   "taylor": " taylor"}.get(pruning.method, f" {pruning.method}")
            parts.append(f"prune {_pct(pruning.amount)}{tag}")
    if layer_plan.quantization is not None:
        parts.append(quantization_text(layer_plan.quantization))
    return " · ".join(parts)


def quantization_text(quant: Quantization) -> str:
    if quant.is_float:
        return str(quant.bits)
    text = f"int{quant.bits}"
    text += {"per-tensor": "/t", "per-channel": "/ch"}.get(quant.granularity, f" g{quant.group_size}")
    if not quant.symmetric:
        text += " asym"
    if quant.range == "mse":
        text += " mse"
    return text


def low_rank_text(low_rank: LowRank) -> str:
    return f"rank {low_rank.rank}" if low_rank.rank is not None else f"rank @{_pct(low_rank.energy)} energy"


def _pct(fraction: float | None) -> str:
    value = 100 * (fraction or 0.0)
    return f"{value:.0f}%" if abs(value - round(value)) < 0.05 else f"{value:.1f}%"


# -- predicted sizes ----------------------------------------------------------------------------
def storage_bytes(numel: int, nonzero: int, bits: int, overhead: int = 0) -> int:
    """engine.compress.tensor_storage_bytes from counts: dense or mask + non-zeros, + scales."""
    dense = (numel * bits + 7) // 8
    sparse = (numel + 7) // 8 + (nonzero * bits + 7) // 8
    return min(dense, sparse) + overhead


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


class SizePredictor:
    """Predicts a model's compressed size for any resolved plan; caches per-layer SVDs."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._singular_values: dict[str, np.ndarray | None] = {}

    def predict(self, resolved: Mapping[str, LayerPlan],
                sparsity: Mapping[str, float] | None = None) -> PlanPrediction:
        """`sparsity` gives layers' current fraction of zeros where known (kept zeros pay off)."""
        sparsity = sparsity or {}
        out = PlanPrediction(bytes_before=self.model.nbytes)
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

    def predict_layer(self, layer: Layer, layer_plan: LayerPlan | None, sparsity: float = 0.0
                      ) -> LayerPrediction:
        tensors = self.model.tensors
        weight_bits = tensors.itemsizes[layer.weight_key] * 8
        bias_numel = tensors.numel(layer.bias_key) if layer.bias_key else 0
        bias_bits = tensors.itemsizes[layer.bias_key] * 8 if layer.bias_key else 0
        before = tensors.nbytes(layer.weight_key) + bias_numel * bias_bits // 8
        numel = math.prod(layer.shape)
        if layer_plan is None or layer_plan.keep:
            nonzero = numel - round(sparsity * numel)
            after = storage_bytes(numel, nonzero, weight_bits) + storage_bytes(bias_numel, bias_numel, bias_bits)
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
            bits = FLOAT_BITS[quant.bits] if quant.is_float else int(quant.bits)
        after = 0
        for shape in shapes:
            count = math.prod(shape)
            nonzero = count - round(sparsity * count)
            if pruning is not None and pruning.method == "nm":
                n, m = pruning.nm
                nonzero = min(nonzero, count * n // m)
            elif pruning is not None and pruning.method != "structured":
                nonzero = min(nonzero, count - round((pruning.amount or 0.0) * count))
            after += storage_bytes(count, nonzero, bits, _scale_overhead(quant, shape))
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


def _scale_overhead(quant: Quantization | None, shape: tuple[int, ...]) -> int:
    """Bytes of float32 scales (and uint8 zero points when asymmetric) for integer codes."""
    if quant is None or quant.is_float:
        return 0
    count = math.prod(shape)
    units = {"per-tensor": 1, "per-channel": shape[0]}.get(quant.granularity)
    if units is None:
        units = count // (quant.group_size or count)
    return units * 4 + (0 if quant.symmetric else units)


def section_applies(layer: Layer, key: str, section: Mapping[str, object] | None) -> bool:
    """Whether `layer` can take plan section `key` (a section of None: the technique at all).

    The same kind sets the engine's resolution checks (engine.plan), so a bulk edit skips the
    layers it would fail on instead of failing as a whole.
    """
    if key == "pruning":
        method = (section or {}).get("method", "magnitude")
        kinds = {"structured": STRUCTURED_KINDS, "nm": NM_KINDS}.get(str(method), PRUNABLE_KINDS)
    elif key == "quantization":
        kinds = QUANTIZABLE_KINDS
    else:
        kinds = LOW_RANK_KINDS
    return layer.kind in kinds

"""How a resolved plan reads on screen: one-line action text per layer, and which layers a bulk
edit can apply to. Predicted sizes come from :mod:`engine.size_prediction`."""

from __future__ import annotations

from typing import Mapping

from engine.model import Layer
from engine.plan import LayerPlan, LowRank, Quantization, kind_accepts


def action_text(layer_plan: LayerPlan | None) -> str:
    """'prune 50% · int8/ch', '2:4 · int4 g32', 'rank 32', 'fp16' or 'keep'."""
    if layer_plan is None or layer_plan.keep:
        return "keep"
    parts: list[str] = []
    if layer_plan.low_rank is not None:
        parts.append(low_rank_text(layer_plan.low_rank))
    pruning = layer_plan.pruning
    if pruning is not None:
        if pruning.is_nm:
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


def section_applies(layer: Layer, key: str, section: Mapping[str, object] | None) -> bool:
    """Whether `layer` can take plan section `key` (a section of None: the technique at all),
    by the engine's own rule, so a bulk edit skips the layers it would fail on."""
    return kind_accepts(layer.kind, key, str((section or {}).get("method", "magnitude")))

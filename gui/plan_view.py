"""How a resolved plan reads on screen: one-line action text per layer, the method that made a
layer (for results and overlays), and which layers a bulk edit can apply to. Predicted sizes
come from :mod:`engine.size_prediction`."""

from __future__ import annotations

from typing import Mapping

from engine.model import Layer
from engine.plan import LayerPlan, LowRank, Pruning, Quantization, kind_accepts

#: Pruning methods as a results line names them ("OBS 70%", "magnitude 50%").
PRUNING_METHOD_NAMES = {"magnitude": "magnitude", "magnitude-global": "global magnitude",
                        "gradient": "gradient", "taylor": "Taylor", "nm": "N:M",
                        "structured": "structured", "obs": "OBS"}


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
            parts.append((pruning.pattern or "2:4") + (" obs" if pruning.method == "obs" else ""))
        elif pruning.method == "structured":
            parts.append(f"−{_pct(pruning.amount)} channels")
        else:
            tag = {"magnitude": "", "magnitude-global": " global", "gradient": " grad",
                   "taylor": " taylor"}.get(pruning.method, f" {pruning.method}")
            parts.append(f"prune {_pct(pruning.amount)}{tag}")
    if layer_plan.quantization is not None:
        parts.append(quantization_text(layer_plan.quantization))
    if layer_plan.bias_correction:
        parts.append("bias corr.")
    return " · ".join(parts)


def method_text(layer_plan: LayerPlan | None) -> str:
    """Which method made the layer, for the results report and the histogram overlay:
    'GPTQ 2-bit per-channel + bias correction', 'OBS 70%', 'magnitude 50% · RTN 8-bit
    per-channel', 'SVD rank 32', 'fp16', or 'kept'."""
    if layer_plan is None or layer_plan.keep:
        return "kept"
    parts: list[str] = []
    if layer_plan.low_rank is not None:
        low_rank = layer_plan.low_rank
        parts.append(f"SVD rank {low_rank.rank}" if low_rank.rank is not None
                     else f"SVD {_pct(low_rank.energy)} energy")
    if layer_plan.pruning is not None:
        parts.append(pruning_method_text(layer_plan.pruning))
    quant = layer_plan.quantization
    if quant is not None:
        if quant.is_float:
            parts.append(str(quant.bits))
        else:
            grain = quant.granularity if quant.granularity != "group" else f"group {quant.group_size}"
            text = f"{quant.method.upper()} {quant.bits}-bit {grain}"
            if quant.method == "gptq" and quant.act_order:
                text += ", act-order"
            parts.append(text)
    text = " · ".join(parts)
    return text + " + bias correction" if layer_plan.bias_correction else text


def pruning_method_text(pruning: Pruning) -> str:
    """'OBS 70%', 'OBS 2:4', 'N:M 2:4', 'structured 25% channels', 'magnitude 50%'."""
    name = PRUNING_METHOD_NAMES.get(pruning.method, pruning.method)
    if pruning.is_nm:
        return f"{name} {pruning.pattern or '2:4'}"
    if pruning.method == "structured":
        return f"{name} {_pct(pruning.amount)} channels"
    return f"{name} {_pct(pruning.amount)}"


def quantization_text(quant: Quantization) -> str:
    if quant.is_float:
        return str(quant.bits)
    text = f"int{quant.bits}"
    text += {"per-tensor": "/t", "per-channel": "/ch"}.get(quant.granularity, f" g{quant.group_size}")
    if not quant.symmetric:
        text += " asym"
    if quant.range == "mse":
        text += " mse"
    if quant.method != "rtn":
        text += f" {quant.method}"
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

"""What each action of the app needs from the model's backend, asked of the engine, never guessed.

Every gate in the window (menus, toolbar, the sensitivity dialog's methods, the plan editor's
sections, the export formats) asks :func:`why_not` here, which asks the loaded model's backend
(:meth:`engine.model.Model.why_not`). The answer is the engine's one line saying why the file
cannot do it and which file would; the app shows it as the tooltip and status tip of whatever it
disables, so nothing is offered that would then fail in the worker because of the file's kind.
The tables below only say *which* capability an action needs; whether the file has it is the
backend's business.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from PySide6.QtWidgets import QWidget

from engine.backends.base import (
    BIAS_CORRECTION,
    LAYER_STATISTICS,
    GRADIENTS,
    GRAPH_SURGERY,
    LOW_RANK,
    ONNX_EXPORT,
    RUN,
    TORCH_MODULE,
    TRAIN,
)
from engine.model import Model
from engine.plan import LayerPlan, Plan

NO_MODEL = "Open a model first."

#: Sensitivity methods: exact and fast evaluate the model; data-free reads weights only.
SENSITIVITY_NEEDS: Mapping[str, str | None] = {"exact": RUN, "fast": RUN, "datafree": None}
#: Measuring SVD ranks in a sweep factorizes layers.
RANKS_NEED = LOW_RANK
#: Pruning methods that need more than the weights (the rest are tensor-level).
#: GPTQ and OBS read layer inputs on calibration data; bias correction shifts torch biases.
STATISTICS_NEED = LAYER_STATISTICS
BIAS_NEED = BIAS_CORRECTION
PRUNING_NEEDS: Mapping[str, str] = {"gradient": GRADIENTS, "taylor": GRADIENTS,
                                    "structured": GRAPH_SURGERY, "obs": STATISTICS_NEED}
#: Plan sections and settings that need more than the weights.
LOW_RANK_NEED = LOW_RANK
RECOVERY_NEED = TRAIN
#: Static activation quantization calibrates by running the model.
ACTIVATION_NEED = RUN
#: Export format families: ONNX files are made through an ONNX export, the rest from a module.
ONNX_FORMAT_NEED = ONNX_EXPORT
TORCH_FORMAT_NEED = TORCH_MODULE
#: Formats that hold only tensors (codes and scales) and so need nothing but the weights.
WEIGHT_FORMATS = frozenset({"safetensors", "safetensors-codes", "slim"})


def why_not(model: Model | None, capability: str | None) -> str | None:
    """None when `model` can do `capability` (None: needs nothing), else the engine's one line."""
    if model is None:
        return NO_MODEL
    if capability is None or model.can(capability):
        return None
    return model.why_not(capability) or f"{model.backend.name} models cannot do this ({capability})"


def sensitivity_why_not(model: Model | None, method: str, ranks: bool = False) -> str | None:
    """Why the sensitivity `method` (with SVD ranks if asked) cannot run on `model`, or None."""
    reason = why_not(model, SENSITIVITY_NEEDS.get(method, RUN))
    if reason is None and ranks:
        reason = why_not(model, RANKS_NEED)
    return reason


def pruning_method_need(method: str) -> str | None:
    return PRUNING_NEEDS.get(method)


def export_need(name: str, exporter: Any = None) -> str | None:
    """The capability export format `name` needs: the exporter's own ``needs`` when it declares
    one, else by family (ONNX formats need an ONNX export, torch files a torch module)."""
    declared = getattr(exporter, "needs", ...)
    if declared is not ...:
        return declared  # type: ignore[no-any-return]
    if name.startswith("onnx"):
        return ONNX_FORMAT_NEED
    if name in WEIGHT_FORMATS:
        return None
    return TORCH_FORMAT_NEED


def plan_needs(plan: Plan, layers: Mapping[str, LayerPlan]) -> list[tuple[str, str]]:
    """(what, capability) for each part of the plan that needs more than the model's weights;
    `layers` is the plan resolved against the model (so defaults and patterns count)."""
    needs: dict[tuple[str, str], None] = {}
    for name, layer_plan in layers.items():
        if layer_plan.keep:
            continue
        pruning = layer_plan.pruning
        if pruning is not None and pruning.method in PRUNING_NEEDS:
            needs[(f"{pruning.method} pruning ({name})", PRUNING_NEEDS[pruning.method])] = None
        if layer_plan.low_rank is not None:
            needs[(f"low rank ({name})", LOW_RANK_NEED)] = None
        quantization = layer_plan.quantization
        if quantization is not None and quantization.method == "gptq":
            needs[(f"GPTQ ({name})", STATISTICS_NEED)] = None
        if layer_plan.bias_correction and (pruning is not None or quantization is not None):
            needs[(f"bias correction ({name})", BIAS_NEED)] = None
    if plan.activation_quant is not None:
        needs[("activation quantization", ACTIVATION_NEED)] = None
    if plan.recovery:
        needs[("recovery fine-tuning", RECOVERY_NEED)] = None
    return list(needs)


def plan_problems(model: Model | None, plan: Plan, layers: Mapping[str, LayerPlan]) -> list[str]:
    """One line per plan part `model` cannot carry out: "<what>: <the engine's why-not line>".
    Several layers needing the same thing give one line naming the first and the count."""
    if model is None:
        return []
    grouped: dict[tuple[str, str], list[str]] = {}
    for what, capability in plan_needs(plan, layers):
        reason = why_not(model, capability)
        if reason is None:
            continue
        head, _, layer = what.partition(" (")
        grouped.setdefault((head, reason), []).append(layer.rstrip(")"))
    lines = []
    for (head, reason), names in grouped.items():
        names = [name for name in names if name]
        where = (f" ({names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "") + ")"
                 if names else "")
        lines.append(f"{head}{where}: {reason}")
    return lines


def backend_summary(model: Model) -> tuple[str, str]:
    """The badge for `model`: its backend's name plus what it can do, and a tooltip that says
    what it cannot (one line per capability, the engine's own reasons)."""
    can = [label for capability, label in CAPABILITY_LABELS if model.can(capability)]
    text = f"{model.backend.name} · " + (", ".join(can) if can else "compresses weights, data-free sensitivity")
    missing = [f"• {label}: {model.why_not(capability)}"
               for capability, label in CAPABILITY_LABELS if not model.can(capability)]
    tip = (f"Runtime: {model.backend.name}. Compressing weights (pruning, quantization) works on "
           "every file.")
    if missing:
        tip += "\nNot available:\n" + "\n".join(missing)
    return text, tip


#: What the badge lists, in the order users meet the actions.
CAPABILITY_LABELS: tuple[tuple[str, str], ...] = (
    (RUN, "runs"),
    (GRADIENTS, "gradients"),
    (TRAIN, "fine-tunes"),
    (GRAPH_SURGERY, "channel pruning"),
    (LOW_RANK, "low rank"),
    (ONNX_EXPORT, "ONNX export"),
)


def gate(widget: Any, reason: str | None, tip: str) -> None:
    """Enable `widget` (a QWidget or QAction) when `reason` is None, showing `tip`; else disable
    it and show `reason` as its tooltip and status-bar tip, so hovering says why."""
    widget.setEnabled(reason is None)
    text = tip if reason is None else reason
    widget.setToolTip(text)
    widget.setStatusTip(text)


def gate_all(widgets: Iterable[QWidget], reason: str | None, tip: str) -> None:
    for widget in widgets:
        gate(widget, reason, tip)

"""Exporters, one module per output format, each file reloaded and verified before it is kept.

The format comes from ``--format`` or the output's extension. ``.onnx`` follows the plan:
weights and activations quantized -> static int8 (QDQ, chosen by measurement); only Linear
weights quantized -> weight-only MatMulNBits (4 or 8 bits); Conv weights quantized -> int8;
no integer weights -> fp32 with the pruned and low-rank structure. ``.pt`` is a state_dict when
the architecture is unchanged, else TorchScript. ``.safetensors``, ``.pt2`` and ``.slim`` name
one format each.

A model compressed without a torch module (an ONNX graph, weights only) is written from its
compressed backend: ONNX models to the ONNX flavours, graph-level from their own proto;
weights-only models to ``safetensors-codes`` (real integer codes) or plain ``safetensors``.
Formats the model's kind cannot produce are refused before anything is written, in one line
naming the formats that can. Every result's headline states the size against the original
file, and a format that cannot store the plan's savings says so before it runs
(:mod:`engine.export.honesty`).

Every export writes to a temporary file beside the destination, reloads it with its users'
runtime (onnxruntime or torch), runs it on the evaluation data next to the in-memory model,
times it, and only then renames it into place: the rename is the last step, so a failed
verification (unless kept on request), an error, a cancel or an interrupt at any stage leaves
no partial file and any previous file of that name untouched. No input is ever overwritten.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.compressed import CompressedModel
from engine.backends.torch_module import TorchScriptBackend
from engine.data import DataSource, synthetic_data
from engine.errors import SlimscopeError
from engine.evaluate import evaluate, runner_for
from engine.export.base import (
    ONNX_SOURCE,
    REGISTRY,
    TORCH_SOURCE,
    WEIGHTS_SOURCE,
    Exporter,
    ExportJob,
    architecture_unchanged,
    source_of,
)
from engine.export.honesty import storage_gap
from engine.export.verify import Verification, verify
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress, sub_progress
from engine.model import Model
from engine.safe_write import Input, atomic_path, check_outputs, write_error

#: Samples in the example batch used to trace and time (as compress() times).
EXAMPLE_BATCH = 32
_EXPORTER_MODULES = ("onnx_fp32", "onnx_fp16", "onnx_int8", "onnx_weight_only", "torch_files",
                     "torchscript", "torch_export", "slim", "safetensors_codes")
#: How a refusal names each kind of model.
_SOURCE_WORDS = {TORCH_SOURCE: "PyTorch model", ONNX_SOURCE: "ONNX model",
                 WEIGHTS_SOURCE: "weights-only model"}


def formats() -> dict[str, Exporter]:
    """Every output format by name (imported on first use: they pull in torch and onnx)."""
    import importlib

    for module in _EXPORTER_MODULES:
        importlib.import_module(f"engine.export.{module}")
    return REGISTRY


def choose_onnx_flavour(compressed: CompressedModel) -> tuple[str, str]:
    """The ONNX format that stores what the plan made, and why."""
    from engine.export.onnx_weight_only import quantized_layers

    if not compressed.quantized and compressed.cast:
        return "onnx-fp16", "the plan casts weights to 16 bits: fp16 ONNX"
    if not compressed.quantized:
        return "onnx", "the plan has no integer weights: fp32 with its pruned/low-rank structure"
    if compressed.activation_quant:
        return "onnx-int8", "the plan quantizes weights and activations: static int8 (QDQ)"
    linear, other = quantized_layers(compressed)
    if not other:
        bits = 4 if max(q.bits for q in linear.values()) <= 4 else 8
        return f"onnx-w{bits}", (f"the plan quantizes Linear weights only: weight-only "
                                 f"{bits}-bit MatMulNBits, activations in float")
    return "onnx-int8", ("the plan quantizes Conv weights, which ONNX Runtime runs in integers "
                         "only with quantized activations: int8")


def _named(name: str, destination: Path) -> Exporter:
    registry = formats()
    if name not in registry:
        raise SlimscopeError(f"unknown export format {name!r} (known: {', '.join(registry)})")
    exporter = registry[name]
    suffix = destination.suffix.lower()
    if suffix not in exporter.suffixes:
        raise SlimscopeError(f"format {name} writes {'/'.join(exporter.suffixes)} files, "
                             f"not {suffix or 'a name without extension'}")
    return exporter


def check_destination(destination: Path, name: str | None = None) -> None:
    """Raise now if no format can write `destination` (with format `name`), before any work."""
    if name is not None:
        _named(name, destination)
        return
    known = sorted({s for e in formats().values() for s in e.suffixes})
    if destination.suffix.lower() not in known:
        raise SlimscopeError(f"{destination.name}: unknown output format "
                             f"{destination.suffix or '(none)'} (known: {', '.join(known)})")


def formats_for(source: str) -> list[str]:
    """The format names a kind of model (base.source_of) can be written to."""
    return [name for name, exporter in formats().items() if source in exporter.sources]


def _refuse_source(exporter: Exporter, source: str) -> None:
    """One line, before anything is written: this kind of model cannot produce `exporter`."""
    if source in exporter.sources:
        return
    needs = ("a torch module" if exporter.sources == {TORCH_SOURCE}
             else f"a {' or '.join(sorted(_SOURCE_WORDS[s] for s in exporter.sources))}")
    possible = {ONNX_SOURCE: ".onnx, onnx-int8, onnx-w4, onnx-dynamic or onnx-fp16",
                WEIGHTS_SOURCE: "safetensors-codes (.safetensors with integer codes) or "
                                "safetensors"}.get(source, ", ".join(formats_for(source)))
    raise SlimscopeError(f"{exporter.name} ({'/'.join(exporter.suffixes)}) needs {needs}; for "
                         f"this {_SOURCE_WORDS.get(source, source)} use {possible}")


def check_model_destination(destination: Path, name: str | None, model: Model) -> None:
    """Raise now, before compressing, if `model`'s kind cannot produce `name` / `destination`
    (compress() keeps a torch module when the model has one, else works on its backend)."""
    check_destination(destination, name)
    source = TORCH_SOURCE if model.module is not None else model.backend.name  # type: ignore
    if source == TORCH_SOURCE:
        return
    registry = formats()
    if name is not None:
        _refuse_source(registry[name], source)
        return
    candidates = [e for e in registry.values() if destination.suffix.lower() in e.suffixes]
    if not any(source in e.sources for e in candidates):
        _refuse_source(candidates[0], source)


def resolve_format(destination: Path, name: str | None, compressed: CompressedModel,
                   model: Model) -> tuple[Exporter, str]:
    """The exporter for `destination` (by `name`, else by extension, plan and the kind of
    model), and why; a one-line refusal when this kind of model cannot produce it."""
    source = source_of(compressed)
    if name is not None:
        exporter = _named(name, destination)
        _refuse_source(exporter, source)
        return exporter, "asked for"
    check_destination(destination)
    if source != TORCH_SOURCE:
        return _resolve_backend_format(destination, compressed, source)
    registry = formats()
    suffix = destination.suffix.lower()
    if suffix == ".onnx":
        chosen, reason = choose_onnx_flavour(compressed)
        return registry[chosen], reason
    if suffix in (".pt", ".pth"):
        if isinstance(model.backend, TorchScriptBackend):
            return registry["torchscript"], ("the original is TorchScript: its code travels "
                                             "with the weights")
        if architecture_unchanged(compressed, model):
            return registry["state-dict"], "architecture unchanged: weights only"
        return registry["torchscript"], ("the plan changes the architecture: TorchScript "
                                         "carries the new shapes and its own code")
    # the first format of that extension a torch module can produce: registration order must
    # not let a weights-only format (safetensors-codes) win for a torch result
    by_suffix = next(e for e in registry.values()
                     if e.suffixes[0] == suffix and TORCH_SOURCE in e.sources)
    return by_suffix, f"the {suffix} extension"


def _resolve_backend_format(destination: Path, compressed: CompressedModel,
                            source: str) -> tuple[Exporter, str]:
    """The extension's format for a model without a torch module, or a one-line refusal."""
    registry = formats()
    suffix = destination.suffix.lower()
    if suffix == ".onnx" and source == ONNX_SOURCE:
        chosen, reason = choose_onnx_flavour(compressed)
        return registry[chosen], reason
    if suffix == ".safetensors" and source == WEIGHTS_SOURCE:
        if compressed.quantized or compressed.masks:
            return registry["safetensors-codes"], ("the plan has integer codes or zeros: "
                                                   "safetensors with codes, scales and masks")
        return registry["safetensors"], "the .safetensors extension"
    candidates = [e for e in registry.values() if suffix in e.suffixes]
    for exporter in candidates:
        if source in exporter.sources:
            return exporter, f"the {suffix} extension"
    _refuse_source(candidates[0], source)
    raise AssertionError("unreachable")  # _refuse_source raised


@dataclass
class ExportResult:
    """What was written, how it compares with the original, and whether it was verified."""

    format: str
    description: str
    reason: str
    #: Where the file is; None when verification failed and it was discarded.
    path: str | None
    bytes: int
    #: The original model in this format family, uncompressed (fp32 ONNX for ONNX flavours).
    baseline_bytes: int
    baseline: str
    original_file_bytes: int
    verification: Verification
    latency_ms: float | None = None
    baseline_latency_ms: float | None = None
    latency_method: str | None = None
    #: The original model's metrics on the same data (accuracy with labels).
    baseline_metrics: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    #: Which of the plan's savings this format writes at full size, and which formats store
    #: them (None when it stores them all); also said before the export ran.
    size_note: str | None = None

    @property
    def kept(self) -> bool:
        return self.path is not None

    @property
    def size_ratio(self) -> float:
        return self.bytes / self.baseline_bytes if self.baseline_bytes else 1.0

    @property
    def file_ratio(self) -> float | None:
        """Size against the file the user opened (None when that file is gone)."""
        return self.bytes / self.original_file_bytes if self.original_file_bytes else None

    @property
    def headline(self) -> str:
        """One line: the format, its size against the original file, and what it cannot store."""
        against = (f"{self.file_ratio:.3f}x the original file ({self.original_file_bytes} bytes)"
                   if self.file_ratio is not None else "the original file is gone")
        line = f"{self.format}: {self.bytes} bytes = {against}"
        return f"{line}; {self.size_note}" if self.size_note else line

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kept"] = self.kept
        data["size_ratio"] = self.size_ratio
        data["file_ratio"] = self.file_ratio
        data["headline"] = self.headline
        return data


class _Discard(Exception):
    """Raised inside the atomic write to drop an unverified file."""


def verification_data(model: Model) -> DataSource:
    """Seeded synthetic inputs shaped like the model's, for callers without data."""
    if not model.inputs:
        raise SlimscopeError("verifying the export needs data or a known input shape: give "
                             "--data or --input-shape")
    return synthetic_data(model.inputs)


def example_batch(data: DataSource | None) -> np.ndarray | None:
    """The first samples of `data` (ExportJob pads them to at least two, or cuts them to a
    program's fixed batch); None without data (weights-only models)."""
    if data is None:
        return None
    inputs, _ = next(data.batches(EXAMPLE_BATCH))
    return inputs


def export(
    compressed: CompressedModel,
    model: Model,
    destination: str | Path,
    *,
    format: str | None = None,
    data: DataSource | None = None,
    calibration: DataSource | None = None,
    keep_unverified: bool = False,
    measure: bool = True,
    inputs: Sequence[Input] = (),
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> ExportResult:
    """Write `compressed` to `destination`, verify the file, and compare it with the original.

    `data` is what verification runs on (default: synthetic inputs shaped like the model's);
    `calibration` feeds static int8 (default: `data`). With `measure`, the file and the
    original are also timed and the original evaluated (on the temp file, before the rename).
    `inputs` are further paths never to overwrite: a path, or ("plan", path) to be named so in
    a refusal. Returns the result whether or not verification passed; check `.kept`.
    """
    destination = Path(destination)
    exporter, reason = resolve_format(destination, format, compressed, model)
    check_outputs([destination], [model.path, *inputs])
    runs = source_of(compressed) != WEIGHTS_SOURCE
    if data is None and runs:
        data = verification_data(model)
    job = ExportJob(compressed, model, example=example_batch(data),
                    calibration=data if calibration is None else calibration,
                    progress=sub_progress(progress, 0.0, 0.5), cancel=cancel)
    exporter.check(job)
    size_note = storage_gap(exporter.name, compressed)
    if size_note:  # before the slow part: the user may rather stop and pick another format
        progress(0.0, f"note: {size_note}")
        if source_of(compressed) != TORCH_SOURCE:  # torch exporters' notes already say it
            job.notes.append(size_note)
    progress(0.0, f"writing {exporter.name}: {exporter.description}")
    result: ExportResult | None = None
    try:
        # Everything that can be cancelled happens on the temp file inside this block; the
        # rename into place is the block's end, so a cancel at any step keeps the old file.
        with atomic_path(destination) as temp:
            try:
                exporter.write(job, temp)
            except OSError as exc:
                raise write_error(exc, destination) from None
            cancel.check()
            progress(0.5, f"verifying {destination.name} with {exporter.runtime}")
            verification = verify(exporter, temp, job, data)  # type: ignore[arg-type]
            result = _result(exporter, reason, destination, temp, job, model, verification)
            result.size_note = size_note
            if not (verification.passed or keep_unverified):
                raise _Discard
            if measure and runs:
                assert data is not None
                progress(0.8, "timing the file and the original")
                timed = exporter.latency(temp, job)
                if timed is not None:
                    result.latency_ms, result.baseline_latency_ms, result.latency_method = timed
                result.baseline_metrics = evaluate(runner_for(model), data,
                                                   cancel=cancel).to_dict()
            cancel.check()
    except _Discard:
        assert result is not None
        result.path = None
    assert result is not None
    progress(1.0, f"{'wrote' if result.kept else 'discarded'} {destination.name}")
    return result


def _result(exporter: Exporter, reason: str, destination: Path, temp: Path, job: ExportJob,
            model: Model, verification: Verification) -> ExportResult:
    """The result for a file about to be renamed to `destination` (measurements still empty)."""
    baseline_bytes, baseline = exporter.baseline_bytes(job)
    return ExportResult(
        format=exporter.name, description=exporter.description, reason=reason,
        path=str(destination), bytes=temp.stat().st_size, baseline_bytes=baseline_bytes,
        baseline=baseline, original_file_bytes=model.file_bytes, verification=verification,
        notes=job.notes)


def write_output(compressed: CompressedModel, model: Model, destination: Path,
                 inputs: Sequence[Input] = ()) -> Path:
    """Write and verify `destination` in the format its extension names; raise if unverified."""
    result = export(compressed, model, destination, inputs=inputs, measure=False)
    if not result.kept:
        raise SlimscopeError(f"{Path(destination).name} not written: "
                             f"{result.verification.summary()}")
    return Path(destination)

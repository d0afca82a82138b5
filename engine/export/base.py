"""The one small interface every exporter implements, the job it works on, and the registry.

An :class:`Exporter` writes one format to a path it is given (a temporary file beside the
destination: the caller renames it only after verification) and reloads such a file with the
runtime its users have (onnxruntime, torch). Everything else — choosing the format, safe writing,
verifying, timing — is shared, in :mod:`engine.export`.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from engine.compressed import CompressedModel
from engine.errors import SlimscopeError, one_line
from engine.data import Inputs, batch_length, pad_samples, sample_axes, take_samples
from engine.evaluate import (
    LatencyStats,
    Runner,
    TorchRunner,
    fixed_batch_of,
    measure_latency,
    torch_arguments,
)
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress
from engine.model import Model

if TYPE_CHECKING:
    from engine.data import DataSource

#: Latency is timed on this many repeats (median reported), one thread, as compress() does.
LATENCY_REPEATS = 30

#: Where a compression result lives, as exporters see it: a torch module, or the compressed
#: copy of a backend without one (engine.backends: OnnxBackend.name, WeightsBackend.name).
TORCH_SOURCE = "torch"
ONNX_SOURCE = "onnx"
WEIGHTS_SOURCE = "weights only"


def source_of(compressed: CompressedModel) -> str:
    """Which kind of model `compressed` is, as exporters' `sources` name them."""
    if compressed.module is not None:
        return TORCH_SOURCE
    if compressed.backend is None:
        raise SlimscopeError("the compressed model has neither a torch module nor a backend")
    return compressed.backend.name


@dataclass
class ExportJob:
    """What an exporter needs: the compressed model, the original, and inputs to trace with."""

    compressed: CompressedModel
    model: Model
    #: One batch (at least 2 samples, so traced graphs keep the batch axis dynamic; exactly
    #: the batch of a module that takes one batch size only); one array or named inputs; None
    #: for weights-only models, which have nothing to run.
    example: Inputs | None
    #: Calibration data for static int8; None when the caller has none.
    calibration: "DataSource | None" = None
    progress: Progress = no_progress
    cancel: CancelToken = NEVER_CANCELLED
    #: What the exporter chose not to do, or could not, one line each.
    notes: list[str] = field(default_factory=list)
    #: Values several exporters derive once (the fp32 ONNX graphs).
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.example = fitted_example(self.compressed.module, self.example)

    @property
    def fixed_batch(self) -> int | None:
        """The one batch size the compressed module takes, or None (see fixed_batch_of)."""
        module = self.compressed.module
        return fixed_batch_of(module) if module is not None else None

    @property
    def example_arguments(self) -> tuple[Any, ...]:
        """The example as the compressed module's positional arguments (one tensor, or the
        named inputs in its argument order; TorchScript scalars as Python numbers)."""
        if self.example is None:
            raise SlimscopeError("this export needs example inputs, and the model has none")
        return torch_arguments(self.compressed.module, self.example)

    def dynamic_batch_shapes(self) -> tuple[Any, ...] | None:
        """torch.export's dynamic_shapes for the example: each tensor's sample axis dynamic
        (None for a fixed-batch module, whose program keeps its static batch)."""
        if self.fixed_batch or self.example is None:
            return None
        if not isinstance(self.example, dict):
            return ({0: torch.export.Dim.AUTO},)
        axes = sample_axes(self.example)
        names = list(self.example)
        return tuple({axes[name]: torch.export.Dim.AUTO} if axes.get(name) is not None
                     else None for name in _argument_order(self.compressed.module, names))

    def onnx_trace(self, module: nn.Module) -> dict[str, Any]:
        """Keyword arguments for onnx_tools.export_onnx tracing `module` on the example: one
        tensor as today, or the named inputs in the module's order with each one's sample axis
        and the model's other dynamic axes (a text model's sequence length) kept dynamic."""
        if not isinstance(self.example, dict):
            return {"example_input": self.example_tensor, "dynamic_batch": not self.fixed_batch}
        names = _argument_order(module, list(self.example))
        axes = sample_axes(self.example)
        specs = {spec.name: spec for spec in self.model.inputs}
        dynamic: dict[str, dict[int, str]] = {}
        for name in names:
            named: dict[int, str] = {}
            if axes.get(name) is not None and not self.fixed_batch:
                named[axes[name]] = "batch"
            spec = specs.get(name)
            for axis, size in enumerate(spec.shape if spec is not None else ()):
                if not (isinstance(size, int) and size > 0) and axis not in named:
                    named[axis] = str(size or f"{name}_{axis}")
            if named:
                dynamic[name] = named
        return {"example_input": tuple(torch_arguments(module, self.example)),
                "input_names": names, "output_names": ["output"], "dynamic_axes": dynamic}

    @property
    def source(self) -> str:
        """TORCH_SOURCE, ONNX_SOURCE or WEIGHTS_SOURCE (see :func:`source_of`)."""
        return source_of(self.compressed)

    @property
    def example_tensor(self) -> torch.Tensor:
        if self.example is None:
            raise SlimscopeError("this export needs example inputs, and the model has none")
        if isinstance(self.example, dict):
            raise SlimscopeError("this format traces a single-input model, and the model takes "
                                 f"{len(self.example)} named inputs")
        return torch.from_numpy(np.ascontiguousarray(self.example))

    @property
    def original(self) -> nn.Module:
        return self.model.require_module("export")

    def architecture_unchanged(self) -> bool:
        return architecture_unchanged(self.compressed, self.model)


def architecture_unchanged(compressed: CompressedModel, model: Model) -> bool:
    """True when the compressed state_dict has the original's names and shapes (always, for
    models without a torch module: their backends replace tensors of the same shape only)."""
    if compressed.module is None:
        return True
    original = model.require_module("export").state_dict()
    current = compressed.module.state_dict()
    return original.keys() == current.keys() and all(
        original[k].shape == current[k].shape for k in original)


def fitted_example(module: nn.Module | None, example: Inputs | None) -> Inputs | None:
    """The example batch a module can be traced with: exactly its fixed batch when it takes
    one size only, else at least 2 samples (tracers specialise a batch of one)."""
    if example is None or module is None:
        return example
    fixed = fixed_batch_of(module)
    if fixed:
        return pad_samples(take_samples(example, 0, fixed), fixed)
    return pad_samples(example, 2) if batch_length(example) < 2 else example


def _argument_order(module: nn.Module, names: list[str]) -> list[str]:
    """The named inputs in the order torch_arguments passes them."""
    from engine.evaluate import input_names

    declared = input_names(module)
    return declared[:len(names)] if set(names) == set(declared[:len(names)]) else names


class Exporter(ABC):
    """One output format; one instance lives in :data:`REGISTRY` under `name`."""

    name: ClassVar[str]
    #: File extensions this format is written with (the first is the usual one).
    suffixes: ClassVar[tuple[str, ...]]
    description: ClassVar[str]
    #: Whose runtime reloads the file for verification.
    runtime: ClassVar[str]
    #: Whether the file should reproduce the in-memory model up to float rounding; formats
    #: that quantize activations or re-quantize weights are compared more loosely.
    exact: ClassVar[bool] = True
    #: The kinds of compressed model this format can be written from (see :func:`source_of`).
    sources: ClassVar[frozenset[str]] = frozenset({TORCH_SOURCE})

    def check(self, job: ExportJob) -> None:
        """Raise SlimscopeError before anything is written if this format cannot hold the job."""

    @abstractmethod
    def write(self, job: ExportJob, path: Path) -> None:
        """Write the file at `path` (a temporary name; the extension may differ)."""

    @abstractmethod
    def reload(self, path: Path, job: ExportJob) -> Runner:
        """The written file loaded the way its users load it, ready to run."""

    @abstractmethod
    def latency(self, path: Path, job: ExportJob) -> tuple[float, float, str] | None:
        """Median ms of (the file, the original model) in this runtime, and what was timed;
        None when nothing can be timed (weights without a graph)."""

    def rebuilt_tensors(self, path: Path, job: ExportJob) -> dict[str, np.ndarray]:
        """The float tensors a reader of the file gets, by the model's tensor keys: how a
        weights-only export (nothing to run) is verified against the compressed values."""
        raise SlimscopeError(f"{self.name} files are verified by running them, and this model "
                             "has nothing to run")

    @abstractmethod
    def baseline_bytes(self, job: ExportJob) -> tuple[int, str]:
        """Size of the original model in this format family uncompressed, and what that is."""


class TorchExporter(Exporter):
    """Formats PyTorch reloads; timed with torch on one thread against the original module."""

    runtime = "torch"

    def latency(self, path: Path, job: ExportJob) -> tuple[float, float, str]:
        reloaded = self.reload(path, job)
        timed: LatencyStats = measure_latency(reloaded, job.example, repeats=LATENCY_REPEATS,
                                              cancel=job.cancel)
        original = measure_latency(TorchRunner(job.original), job.example,
                                   repeats=LATENCY_REPEATS, cancel=job.cancel)
        return timed.median_ms, original.median_ms, \
            f"torch, 1 thread, batch {batch_length(job.example)}, median of {LATENCY_REPEATS}"

    def baseline_bytes(self, job: ExportJob) -> tuple[int, str]:
        size = sum(t.numel() * t.element_size() for t in job.original.state_dict().values())
        return size, "the original weights in their stored dtypes"


#: format name -> the one exporter that writes it, filled by `register` as modules import.
REGISTRY: dict[str, Exporter] = {}


def register(cls: type[Exporter]) -> type[Exporter]:
    if cls.name in REGISTRY:
        raise ValueError(f"exporter {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls()
    return cls


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode, its train/eval flags restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
    except NotImplementedError:  # torch.export modules refuse it: they run as exported
        pass
    try:
        yield module
    finally:
        for submodule, training in modes:
            submodule.training = training


def trace(module: nn.Module, example: torch.Tensor | tuple[Any, ...]) -> torch.jit.ScriptModule:
    """A TorchScript trace of `module` in eval mode (`example`: one tensor or the positional
    arguments); a TorchScript module is already one and is returned as it is. A one-line
    error if it cannot be traced."""
    if isinstance(module, torch.jit.ScriptModule):
        return module
    try:
        with eval_mode(module), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript deprecation and tracer notices
            return torch.jit.trace(module, example, check_trace=False)
    except Exception as error:  # the tracer raises many unrelated types
        raise SlimscopeError(f"could not trace {type(module).__name__} with TorchScript: "
                             f"{one_line(error)}") from error


def load_into_copy(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """What a PyTorch user does with weights: a fresh copy of the architecture, loaded strictly."""
    fresh = copy.deepcopy(module)
    fresh.load_state_dict(state, strict=True)
    return fresh.eval()

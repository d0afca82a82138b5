"""The small protocol every runtime implements, so methods and views never ask "which format?".

A loaded :class:`~engine.model.Model` holds one :class:`Backend`. The backend owns the runtime
object (a torch module, an ONNX graph, or nothing but tensors) and answers five questions: read
a weight, give a copy with some weights replaced, give a runner that evaluates it, save it to its
native file, and say what it can do. What it can do is a set of capability names; every gate in
the CLI and the app asks :meth:`Backend.why_not` and shows the answer as one line, so no action is
offered that the file cannot carry out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Mapping

import numpy as np

from engine.errors import NeedsModuleError, SlimscopeError

if TYPE_CHECKING:
    from engine.evaluate import Runner

#: Evaluate the model on data (sensitivity, accuracy, latency, export verification).
RUN = "run"
#: Gradients through the model (gradient / Taylor pruning, the Fisher sensitivity estimate).
GRADIENTS = "gradients"
#: Train the weights (recovery fine-tuning, gradual pruning).
TRAIN = "train"
#: Change layer shapes and fix up what follows (structured channel pruning).
GRAPH_SURGERY = "graph_surgery"
#: Factorize a layer into two smaller ones (truncated SVD), by module or graph rewrite.
LOW_RANK = "low_rank"
#: Trace into a torch.fx graph (the cached-prefix fast path of the exact sensitivity sweep).
FX_TRACE = "fx_trace"
#: Export as an ONNX graph (fp32, fp16, int8, 4-bit weight-only).
ONNX_EXPORT = "onnx_export"
#: Hold a runnable torch module (TorchScript, .pt2, .pt exports; the .slim bundle's recipe).
TORCH_MODULE = "torch_module"
#: Read each weight layer's inputs on calibration data (XᵀX): GPTQ and OBS pruning.
LAYER_STATISTICS = "layer_statistics"
#: Shift a layer's bias (or the next BatchNorm's mean) by the mean output error: bias correction.
BIAS_CORRECTION = "bias_correction"

ALL_CAPABILITIES = (RUN, GRADIENTS, TRAIN, GRAPH_SURGERY, LOW_RANK, FX_TRACE, ONNX_EXPORT,
                    TORCH_MODULE, LAYER_STATISTICS, BIAS_CORRECTION)


class Backend(ABC):
    """One runtime's view of a model. Instances are never edited in place: a change of weights
    gives a new backend (:meth:`with_weights`), so the original stays the reference."""

    #: Short runtime name shown to users ("torch", "torchscript", "torch.export", "onnx", ...).
    name: ClassVar[str]
    #: What this runtime can do; see the module's capability names.
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: Per capability, why this backend cannot do it and which file would allow it (one line).
    reasons: ClassVar[Mapping[str, str]] = {}

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def why_not(self, capability: str) -> str | None:
        """None when `capability` is available, else one line saying why not and what would."""
        if self.can(capability):
            return None
        return self.reasons.get(capability) or f"{self.name} models cannot do this ({capability})"

    @abstractmethod
    def read(self, key: str) -> np.ndarray:
        """The tensor stored under `key` (a weight key of the model's layers) as numpy."""

    @abstractmethod
    def with_weights(self, replacements: Mapping[str, np.ndarray]) -> Backend:
        """A copy whose tensors under the given keys are replaced; shapes and dtypes must match
        the originals (a cast to float16 is stored by the exporter, not here)."""

    @abstractmethod
    def runner(self, threads: int | None = None) -> "Runner":
        """A runner that evaluates this model on numpy batches (see engine.evaluate)."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the model to its native file format at `path` (the exporters' starting point)."""


def check_replacement(key: str, value: np.ndarray, shape: tuple[int, ...]) -> None:
    """Refuse a replacement whose shape differs from the tensor it replaces (one line; the key
    is the file's, so it is quoted)."""
    from engine.formats.guard import quote

    if tuple(np.shape(value)) != tuple(shape):
        raise SlimscopeError(f"{quote(key)}: replacement of shape {list(np.shape(value))} for a "
                             f"tensor of shape {list(shape)}")


def require(backend: Backend, capability: str, purpose: str, file_name: str) -> Backend:
    """`backend`, or NeedsModuleError saying in one line why `purpose` cannot run on it."""
    reason = backend.why_not(capability)
    if reason is not None:
        raise NeedsModuleError(f"{purpose} is not available for {file_name}: {reason}")
    return backend

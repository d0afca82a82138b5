"""Weights with no graph (a bare state_dict or safetensors file): nothing runs, values change.

Without a graph there is no evaluation, so no accuracy figure and no data-driven sensitivity;
but every method that works on a weight alone (magnitude and N:M pruning, uniform
quantization, casts) still applies, the data-free sensitivity still ranks layers, and the result
is saved as real integer codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Mapping

import numpy as np

from engine.backends.base import (
    BIAS_CORRECTION,
    LAYER_STATISTICS,
    FX_TRACE,
    GRADIENTS,
    GRAPH_SURGERY,
    LOW_RANK,
    ONNX_EXPORT,
    RUN,
    TORCH_MODULE,
    TRAIN,
    Backend,
    check_replacement,
)
from engine.errors import NeedsModuleError, SlimscopeError

if TYPE_CHECKING:
    from engine.evaluate import Runner
    from engine.model import TensorStore

_NO_GRAPH = ("the file holds weights only, with no graph to run; {what} needs an ONNX, "
             "TorchScript or torch.export file of the model (or a pickled module with --trust)")


class WeightsBackend(Backend):
    name: ClassVar[str] = "weights only"
    capabilities: ClassVar[frozenset[str]] = frozenset()
    reasons: ClassVar[Mapping[str, str]] = {
        RUN: _NO_GRAPH.format(what="evaluation"),
        GRADIENTS: _NO_GRAPH.format(what="gradient-based scoring"),
        TRAIN: _NO_GRAPH.format(what="fine-tuning"),
        GRAPH_SURGERY: _NO_GRAPH.format(what="structured pruning"),
        LOW_RANK: _NO_GRAPH.format(what="low-rank factorization"),
        FX_TRACE: _NO_GRAPH.format(what="the exact sensitivity sweep"),
        ONNX_EXPORT: _NO_GRAPH.format(what="ONNX export"),
        TORCH_MODULE: _NO_GRAPH.format(what="this"),
        LAYER_STATISTICS: _NO_GRAPH.format(what="GPTQ and OBS (layer inputs on calibration data)"),
        BIAS_CORRECTION: _NO_GRAPH.format(what="bias correction"),
    }

    def __init__(self, store: "TensorStore", replaced: Mapping[str, np.ndarray] | None = None
                 ) -> None:
        self.store = store
        self.replaced = dict(replaced or {})

    def read(self, key: str) -> np.ndarray:
        if key in self.replaced:
            return self.replaced[key]
        if key not in self.store:
            raise SlimscopeError(f"the file has no tensor named {key!r}")
        return self.store.get(key)

    def with_weights(self, replacements: Mapping[str, np.ndarray]) -> WeightsBackend:
        for key, value in replacements.items():
            if key not in self.store:
                raise SlimscopeError(f"the file has no tensor named {key!r}")
            check_replacement(key, value, self.store.shapes[key])
        return WeightsBackend(self.store, {**self.replaced, **replacements})

    def runner(self, threads: int | None = None) -> "Runner":
        raise NeedsModuleError(self.reasons[RUN])

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {key: np.ascontiguousarray(self.read(key)) for key in self.store.unique_keys()}
        save_file(tensors, str(path))

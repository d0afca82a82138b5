"""ONNX graphs, run by ONNX Runtime. Weights are initializers or Constant-node tensors.

Replacing weights writes a new proto (the loaded one is never edited): each replaced tensor's
initializer or Constant value is swapped for the new array, everything else is shared as
loaded. External-data files are read when the copy is made, so the copy is self-contained.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from engine.backends.base import (
    FX_TRACE,
    GRADIENTS,
    GRAPH_SURGERY,
    LOW_RANK,
    ONNX_EXPORT,
    RUN,
    TORCH_MODULE,
    TRAIN,
    Backend,
)
from engine.errors import SlimscopeError

#: Protobuf's 2 GiB message limit, with room for the graph.
ONNX_IN_MEMORY_LIMIT = 1_800_000_000

if TYPE_CHECKING:
    from engine.evaluate import Runner

_NO_TORCH = ("an ONNX file has no PyTorch module; {what} needs one (a .pt with --trust, "
             "TorchScript or torch.export file of the same model)")


class OnnxBackend(Backend):
    name: ClassVar[str] = "onnx"
    capabilities: ClassVar[frozenset[str]] = frozenset({RUN, ONNX_EXPORT})
    reasons: ClassVar[Mapping[str, str]] = {
        GRADIENTS: "ONNX Runtime computes no gradients; the fast sensitivity estimate uses "
                   "layer-input statistics instead, and gradient pruning needs a PyTorch module",
        TRAIN: _NO_TORCH.format(what="fine-tuning"),
        GRAPH_SURGERY: _NO_TORCH.format(what="structured channel pruning"),
        FX_TRACE: _NO_TORCH.format(what="the torch.fx fast path"),
        TORCH_MODULE: _NO_TORCH.format(what="this"),
        LOW_RANK: "low-rank factorization of ONNX graphs is not built yet; open a PyTorch "
                  "module of the same model",
    }

    def __init__(self, proto: onnx.ModelProto, path: Path, external_folder: Path | None = None,
                 read: Callable[[str], np.ndarray] | None = None) -> None:
        #: The graph as loaded: external data still refers to files in `external_folder`.
        self.proto = proto
        self.path = path
        self.external_folder = external_folder
        self._read = read

    def read(self, key: str) -> np.ndarray:
        if self._read is not None:
            return self._read(key)
        tensor = _tensors(self.proto.graph).get(key)
        if tensor is None:
            raise SlimscopeError(f"the graph has no tensor named {key!r}")
        return numpy_helper.to_array(tensor, str(self.external_folder or self.path.parent))

    def full_proto(self) -> onnx.ModelProto:
        """A copy with every external tensor read in, for ONNX Runtime and for saving whole."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        if self.external_folder is not None:
            onnx.load_external_data_for_model(proto, str(self.external_folder))
        return proto

    def with_weights(self, replacements: Mapping[str, np.ndarray]) -> OnnxBackend:
        proto = self.full_proto()
        tensors = _tensors(proto.graph)
        for key, value in replacements.items():
            target = tensors.get(key)
            if target is None:
                raise SlimscopeError(f"the graph has no tensor named {key!r}")
            if tuple(value.shape) != tuple(target.dims):
                raise SlimscopeError(f"{key}: replacement of shape {list(value.shape)} for a "
                                     f"tensor of shape {list(target.dims)}")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(target.data_type)
            target.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(dtype), target.name))
        return OnnxBackend(proto, self.path)

    def runner(self, threads: int | None = None) -> "Runner":
        from engine.evaluate import OnnxRunner

        if self.external_folder is None:
            return OnnxRunner(self.proto, threads)
        return OnnxRunner(self.full_proto(), threads)

    def save(self, path: Path) -> None:
        proto = self.full_proto()
        # protobuf cannot serialize a message over 2 GiB: larger weights go beside the file
        large = proto.ByteSize() > ONNX_IN_MEMORY_LIMIT
        onnx.save_model(proto, str(path), save_as_external_data=large,
                        location=f"{Path(path).name}.data")


def _tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Every named constant tensor of the main graph: initializers and Constant-node values."""
    found = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                    found[node.output[0]] = attribute.t
    return found

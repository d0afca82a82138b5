"""Multiply-accumulate counts per layer: shared formulas, and a counter for torch modules.

The formulas serve every format (ONNX applies them to shapes from shape inference). Torch
modules are measured by running them once on zeros under a dispatch mode that sees every aten
call and attributes it to the layer whose weight it reads, found by storage address. Forward
hooks would be simpler, but they do not fire inside TorchScript modules, and the modules
torch.export hands back keep their weights on attribute-only submodules that are never called;
the dispatch level sees all three alike. torch is imported only by the counter, so ONNX
inspection does not pay for it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from engine.model import TensorSpec, numpy_dtype_name

if TYPE_CHECKING:
    import torch


def conv_macs(output_numel: int, weight_shape: Sequence[int]) -> int:
    """Each output element of a convolution sums in_channels/groups * kernel products."""
    return output_numel * math.prod(weight_shape[1:])


def conv_transpose_macs(input_numel: int, weight_shape: Sequence[int]) -> int:
    """Each input element of a transposed convolution scatters out_channels/groups * kernel."""
    return input_numel * math.prod(weight_shape[1:])


def dense_macs(output_numel: int, inner_dim: int) -> int:
    """Matrix products (Linear, Gemm, MatMul): each output element sums `inner_dim` products."""
    return output_numel * inner_dim


def norm_macs(output_numel: int) -> int:
    """An affine normalization costs one multiply-add (scale and shift) per element."""
    return output_numel


_CONV_OPS = frozenset({"convolution", "_convolution", "conv1d", "conv2d", "conv3d"})
_TRANSPOSED_CONV_OPS = frozenset({"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})
#: Matrix-product ops and the index of the argument whose last dimension is the inner one.
_DENSE_OPS = {"mm": 0, "bmm": 0, "matmul": 0, "linear": 0, "addmm": 1, "baddbmm": 1}
_NORM_OPS = frozenset({
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "batch_norm", "native_layer_norm", "layer_norm",
    "native_group_norm", "group_norm",
})
_LOOKUP_OPS = frozenset({"embedding", "embedding_bag", "_embedding_bag"})
#: Layer-kind prefixes each op family belongs to, to pick the right one of two tied layers.
_FAMILY_KINDS = {
    "conv": ("Conv",),
    "dense": ("Linear",),
    "norm": ("BatchNorm", "LayerNorm", "GroupNorm"),
    "lookup": ("Embedding",),
}


@dataclass(frozen=True)
class ModuleProfile:
    """What one forward pass on zeros revealed: MACs per layer and the shapes in and out."""

    macs: dict[str, int]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def _storage_address(tensor: torch.Tensor) -> int | None:
    try:
        address = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return address or None


def _numel(value: Any) -> int:
    return int(value.numel()) if hasattr(value, "numel") else 0


def _op_macs(op: str, args: Sequence[Any], first_output: Any) -> tuple[str | None, int]:
    """(op family, MACs) of one aten call; family None for ops that carry no layer's cost."""
    if op in _CONV_OPS:
        if op in ("convolution", "_convolution") and bool(args[6]):  # transposed flag
            return "conv", conv_transpose_macs(_numel(args[0]), args[1].shape)
        return "conv", conv_macs(_numel(first_output), args[1].shape)
    if op in _TRANSPOSED_CONV_OPS:
        return "conv", conv_transpose_macs(_numel(args[0]), args[1].shape)
    if op in _DENSE_OPS:
        return "dense", dense_macs(_numel(first_output), int(args[_DENSE_OPS[op]].shape[-1]))
    if op in _NORM_OPS:
        return "norm", norm_macs(_numel(first_output))
    if op in _LOOKUP_OPS:
        return "lookup", 0
    return None, 0


@functools.cache
def _mac_counter_type() -> type:
    """The dispatch mode class, built on first use so importing this module needs no torch."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class MacCounter(TorchDispatchMode):
        """Adds each aten call's MACs to the layer owning the weight it reads."""

        def __init__(self, owners: Mapping[int, list[tuple[str, str]]]) -> None:
            super().__init__()
            self.owners = owners
            self.macs: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            result = func(*args, **(kwargs or {}))
            family, macs = _op_macs(func.overloadpacket.__name__, args,
                                    next(iter(tree_leaves(result)), None))
            if family is not None:
                owner = next(filter(None, (self._owner(arg, family) for arg in args
                                           if hasattr(arg, "untyped_storage"))), None)
                if owner is not None:
                    self.macs[owner] = self.macs.get(owner, 0) + macs
            return result

        def _owner(self, tensor: torch.Tensor, family: str) -> str | None:
            candidates = self.owners.get(_storage_address(tensor) or -1)
            if not candidates:
                return None
            for name, kind in candidates:
                if kind.startswith(_FAMILY_KINDS[family]):
                    return name
            return candidates[0][0]

    return MacCounter


def _specs(values: Iterable[Any], prefix: str) -> list[TensorSpec]:
    tensors = [value for value in values if hasattr(value, "shape") and hasattr(value, "dtype")]
    if len(tensors) == 1:
        return [TensorSpec(prefix, tuple(tensors[0].shape), numpy_dtype_name(tensors[0].dtype))]
    return [TensorSpec(f"{prefix}_{i}", tuple(t.shape), numpy_dtype_name(t.dtype))
            for i, t in enumerate(tensors)]


def profile_module(
    module: torch.nn.Module,
    inputs: Sequence[TensorSpec],
    layer_weights: Mapping[str, tuple[str, torch.Tensor]],
) -> ModuleProfile:
    """Run `module` once on zeros shaped like `inputs` and count MACs per layer.

    `layer_weights` maps layer name to (kind, weight tensor). A float input that the module
    refuses is retried as int64, since a model starting with an embedding takes token ids; the
    returned `inputs` carry the dtype that worked. Layers the pass never touches get 0.
    """
    import torch
    from torch.utils._pytree import tree_leaves

    owners: dict[int, list[tuple[str, str]]] = {}
    for name, (kind, weight) in layer_weights.items():
        address = _storage_address(weight)
        if address is not None:
            owners.setdefault(address, []).append((name, kind))
    attempts = [list(inputs)]
    if any(spec.dtype.startswith(("float", "bfloat")) for spec in inputs):
        attempts.append([TensorSpec(s.name, s.shape, "int64") for s in inputs])
    first_error: Exception | None = None
    for specs in attempts:
        arrays = [torch.zeros(tuple(int(d) for d in s.shape), dtype=getattr(torch, s.dtype))
                  for s in specs]
        counter = _mac_counter_type()(owners)
        try:
            with torch.no_grad(), counter:
                output = module(*arrays)
        except Exception as exc:  # noqa: BLE001 - any failure means "try the next dtype"
            first_error = first_error or exc
            continue
        macs = {name: counter.macs.get(name, 0) for name in layer_weights}
        return ModuleProfile(macs, list(specs), _specs(tree_leaves(output), "output"))
    assert first_error is not None
    raise first_error

"""The neutral model every format adapter produces and every view and method reads.

A :class:`Model` knows its source format, its inputs and outputs, and an ordered list of
weight-carrying :class:`Layer` s. Weights are not copied at load time: each layer names a key
in a :class:`TensorStore`, which hands out numpy arrays on demand (memory-mapped or zero-copy
views where the format allows). Tensors shared by several layers are counted once.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from engine.backends.base import RUN, TORCH_MODULE, Backend, require
from engine.errors import NeedsModuleError, SlimscopeError

if TYPE_CHECKING:  # torch and onnx are heavy; only adapters import them at run time
    import onnx
    import torch

#: Layer kinds whose weights pruning methods can act on.
PRUNABLE_KINDS = frozenset(
    {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Linear", "Conv", "ConvTranspose",
     "Gemm", "MatMul", "Embedding", "Gather",
     # Recurrent weights (torch: `rnn.weight_ih_l0`; ONNX: `<node>.weight_ih`): element-wise
     # methods only; structured and N:M pruning refuse them (engine.methods.base).
     "LSTM", "GRU", "RNN"}
)
#: Layer kinds whose weights weight-quantization methods can act on.
QUANTIZABLE_KINDS = PRUNABLE_KINDS


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, shape (ints, or str/None for dynamic axes), dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str = "float32"

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


class TensorStore:
    """Lazily fetches named tensors as numpy arrays and caches nothing it can re-fetch cheaply.

    `getters` maps a tensor key to a zero-argument function returning the array, or is one
    function of the key (a format with 300k tensors need not build 300k closures); `shapes`
    and `dtypes` describe every tensor without loading it.
    """

    def __init__(
        self,
        getters: Mapping[str, Callable[[], np.ndarray]] | Callable[[str], np.ndarray],
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, str],
        itemsizes: Mapping[str, int],
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self._read: Callable[[str], np.ndarray] | None = None
        if callable(getters) and not isinstance(getters, Mapping):
            self._read, self._getters = getters, {}
        else:
            self._getters = dict(getters)
        self.shapes = dict(shapes)
        self.dtypes = dict(dtypes)
        self.itemsizes = dict(itemsizes)
        #: key -> canonical key for tensors that are the same storage under another name.
        self.aliases = dict(aliases or {})

    def __contains__(self, key: str) -> bool:
        return key in self._getters or (self._read is not None and key in self.shapes)

    def keys(self) -> list[str]:
        return list(self.shapes) if self._read is not None else list(self._getters)

    def unique_keys(self) -> list[str]:
        """Every tensor once, whatever number of names it is reachable under."""
        return [k for k in self.keys() if k not in self.aliases]

    def get(self, key: str) -> np.ndarray:
        getter = self._getters.get(key)
        if getter is not None:
            return getter()
        if self._read is None or key not in self.shapes:
            raise KeyError(key)
        return self._read(key)

    def numel(self, key: str) -> int:
        # math.prod on Python ints: exact, and 10x quicker than np.prod over 300k tensors.
        return math.prod(self.shapes[key])

    def nbytes(self, key: str) -> int:
        return self.numel(key) * self.itemsizes[key]


@dataclass(slots=True)  # no per-instance dict: a checkpoint may have 300k layers
class Layer:
    """One weight-carrying layer, described without holding its weights."""

    name: str
    kind: str
    weight_key: str
    shape: tuple[int, ...]
    dtype: str
    params: int
    nbytes: int
    bias_key: str | None = None
    prunable: bool = False
    quantizable: bool = False
    #: Name of the earlier layer whose weight this one reuses (tied weights), else None.
    shared_with: str | None = None
    #: Multiply-accumulates for one forward pass, when input shapes are known.
    macs: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "params": self.params,
            "bytes": self.nbytes,
            "dtype": self.dtype,
            "prunable": self.prunable,
            "quantizable": self.quantizable,
            "shared_with": self.shared_with,
            "macs": self.macs,
        }


@dataclass
class Model:
    """A loaded model in neutral form; see the module docstring."""

    path: Path
    format: str
    layers: list[Layer]
    tensors: TensorStore
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    #: A runnable torch module when the format carries one (trusted pickle, known architecture,
    #: TorchScript, torch.export); compression methods that do surgery need it.
    module: "torch.nn.Module | None" = None
    #: The ONNX graph, for ONNX sources.
    onnx_model: "onnx.ModelProto | None" = None
    #: Human-readable remarks about what this file can and cannot do.
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    #: The runtime that reads, replaces and runs this model's weights (engine/backends); built
    #: from `module` / `onnx_model` / the tensors when the adapter does not give a specific one.
    backend: "Backend | None" = None

    def __post_init__(self) -> None:
        self._by_name = {layer.name: layer for layer in self.layers}
        if self.backend is None:
            self.backend = default_backend(self)

    # -- lookup -------------------------------------------------------------------------
    def layer(self, name: str) -> Layer:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no layer named {name!r}") from None

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def weight(self, layer: Layer | str) -> np.ndarray:
        """The layer's weight as numpy; a view of the loaded data where the format allows."""
        if isinstance(layer, str):
            layer = self.layer(layer)
        return self.tensors.get(layer.weight_key)

    # -- totals (unique tensors, so tied weights count once) ------------------------------
    @property
    def params(self) -> int:
        return sum(self.tensors.numel(k) for k in self.tensors.unique_keys())

    @property
    def nbytes(self) -> int:
        return sum(self.tensors.nbytes(k) for k in self.tensors.unique_keys())

    @property
    def macs(self) -> int | None:
        known = [layer.macs for layer in self.layers if layer.macs is not None]
        return sum(known) if known else None

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    # -- capabilities ------------------------------------------------------------------------
    @property
    def runnable(self) -> bool:
        return self.can(RUN)

    def can(self, capability: str) -> bool:
        """Whether this model's backend can do `capability` (engine.backends' names)."""
        return self.backend is not None and self.backend.can(capability)

    def why_not(self, capability: str) -> str | None:
        """None when `capability` is available, else one line saying why not and what would."""
        assert self.backend is not None
        return self.backend.why_not(capability)

    def require(self, capability: str, purpose: str) -> "Backend":
        """The backend, or one NeedsModuleError line saying why `purpose` cannot run here."""
        assert self.backend is not None
        return require(self.backend, capability, purpose, self.path.name)

    def require_module(self, purpose: str) -> "torch.nn.Module":
        """The torch module, or a clear error saying why `purpose` cannot run on this file."""
        self.require(TORCH_MODULE, purpose)
        if self.module is None:
            raise NeedsModuleError(f"{purpose} needs a PyTorch module, which {self.path.name} "
                                   "does not hold")
        return self.module

    def require_finite(self, purpose: str) -> None:
        """Raise one clear line if any layer holds NaN/Inf: `purpose` would spread them."""
        bad = self.non_finite()
        if bad:
            name, count = next(iter(bad.items()))
            raise SlimscopeError(f"layer {name!r} has {count} NaN/Inf weights; {purpose} would "
                                 "spread them — fix the model first")

    def non_finite(self) -> dict[str, int]:
        """Layers whose weights hold NaN or Inf, with the count of such values.

        Counted a chunk at a time: a mask over a 4 GB memory-mapped weight would cost 1 GB.
        """
        bad: dict[str, int] = {}
        for layer in self.layers:
            w = self.weight(layer)
            if w.dtype.kind == "f":
                count = sum(int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
                            for chunk in chunks(w))
                if count:
                    bad[layer.name] = count
        return bad

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "params": self.params,
            "bytes": self.nbytes,
            "file_bytes": self.file_bytes,
            "macs": self.macs,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "runnable": self.runnable,
            "backend": self.backend.name if self.backend is not None else None,
            "capabilities": sorted(self.backend.capabilities) if self.backend is not None else [],
            "has_module": self.module is not None,
            "notes": list(self.notes),
        }


def layer_from_store(
    name: str, kind: str, store: TensorStore, weight_key: str, bias_key: str | None = None
) -> Layer:
    """A layer described from its tensors' shapes alone; `params`/`nbytes` include the bias."""
    shape = tuple(store.shapes[weight_key])
    params = math.prod(shape)
    nbytes = params * store.itemsizes[weight_key]
    if bias_key:
        bias = math.prod(store.shapes[bias_key])
        params += bias
        nbytes += bias * store.itemsizes[bias_key]
    return Layer(
        name=name,
        kind=kind,
        weight_key=weight_key,
        shape=shape,
        dtype=store.dtypes[weight_key],
        params=params,
        nbytes=nbytes,
        bias_key=bias_key,
        prunable=kind in PRUNABLE_KINDS,
        quantizable=kind in QUANTIZABLE_KINDS,
    )


def mark_shared(layers: Iterable[Layer], canonical_key: Callable[[str], str]) -> None:
    """Set `shared_with` on every layer whose weight is the same storage as an earlier one's."""
    first_owner: dict[str, str] = {}
    for layer in layers:
        key = canonical_key(layer.weight_key)
        if key in first_owner:
            layer.shared_with = first_owner[key]
        else:
            first_owner[key] = layer.name


def numpy_dtype_name(dtype: Any) -> str:
    """A short dtype name ('float32', 'bfloat16', 'int8') from numpy or torch dtypes."""
    text = str(dtype)
    return text.removeprefix("torch.")


# -- memory-mapped weights ------------------------------------------------------------------
#: Elements handled at a time by code that walks a whole weight (statistics, NaN counts).
CHUNK = 1 << 20


def map_file(path: Path) -> np.ndarray:
    """The whole file as a read-only uint8 array over one memory map, for zero-copy views.

    Formats slice their tensors out of it; the map lives as long as any view does. A plain
    ndarray rather than an `np.memmap`: the subclass costs microseconds per view and per
    operation, which add up over 300k small tensors. An empty file gives an empty array.
    """
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return np.zeros(0, np.uint8)
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype=np.uint8)


def chunks(array: np.ndarray, size: int = CHUNK) -> Iterator[np.ndarray]:
    """`array` flattened, `size` elements at a time; memory-mapped pages are let go after use.

    Reading a memory-mapped weight makes its pages resident in this process: walking a 4 GB
    tensor would leave 4 GB of resident memory (reclaimable, but counted as RSS). Each chunk's
    pages are handed back to the page cache once the caller is done with it.
    """
    flat = array.reshape(-1)
    # Pages a small tensor shares with its neighbours are not worth a system call each.
    mapped = _backing_map(flat) if flat.nbytes >= mmap.PAGESIZE else None
    for start in range(0, flat.size, size):
        chunk = flat[start:start + size]
        yield chunk
        if mapped is not None:
            _release(*mapped, chunk)


def _backing_map(array: np.ndarray) -> tuple[mmap.mmap, int] | None:
    """The memory map under `array` and the map's start address, if it has one.

    The last ndarray down the chain of bases wraps the whole map (`map_file`, `np.memmap`
    without an offset), so its data pointer is the map's first byte.
    """
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    base = root.base.obj if isinstance(root.base, memoryview) else root.base
    if not isinstance(base, mmap.mmap) or base.closed or len(base) == 0:
        return None
    start = root.ctypes.data
    return (base, start) if root.nbytes == len(base) else None


def _release(mapping: mmap.mmap, map_start: int, chunk: np.ndarray) -> None:
    """Drop the pages `chunk` lies on from this process; the page cache keeps the data, and
    a later read of a page that another view still uses simply maps it back in."""
    page = mmap.PAGESIZE
    address = chunk.ctypes.data - map_start
    begin = address // page * page
    end = min(address + chunk.nbytes, len(mapping))
    if end > begin:
        try:
            mapping.madvise(mmap.MADV_DONTNEED, begin, end - begin)
        except (OSError, ValueError, AttributeError):  # no madvise here: pages just stay
            pass


def default_backend(model: Model) -> Backend:
    """The backend a model's own fields imply: its torch module, its ONNX graph, or its tensors.

    Adapters that know more (TorchScript, torch.export's fixed batch) pass their own.
    """
    if model.module is not None:
        from engine.backends.torch_module import TorchModuleBackend

        return TorchModuleBackend(model.module)
    if model.onnx_model is not None:
        from engine.backends.onnx_graph import OnnxBackend

        folder = model.metadata.get("onnx.external_data_dir")
        return OnnxBackend(model.onnx_model, model.path, Path(folder) if folder else None,
                           read=model.tensors.get)
    from engine.backends.weights import WeightsBackend

    return WeightsBackend(model.tensors)

"""safetensors files: a JSON header (names, dtypes, shapes, offsets) and raw tensor bytes.

There is no graph and no code, so opening one is always safe. Tensors are read one at a time,
when a view asks. A header whose metadata names a known architecture (``slimscope.arch``) loads
as that runnable module; ``slimscope.input_shape`` gives the input shape for MACs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import SafetensorError, safe_open

from engine import zoo
from engine.errors import ModelLoadError, one_line
from engine.formats import LoadOptions
from engine.formats._torch_common import (
    architecture_model,
    parse_shape,
    tensor_to_numpy,
    weights_only_model,
)
from engine.model import Model, TensorStore

NAME = "safetensors"

#: safetensors dtype codes -> (our dtype name, bytes per element).
_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
#: Codes numpy has no dtype for: read through torch and widened to float32.
_VIA_TORCH = frozenset({"BF16", "F8_E4M3", "F8_E5M2"})


def match(path: Path, head: bytes, zip_names: list[str]) -> bool:
    """An 8-byte little-endian header length that fits the file, then the JSON header's '{'."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    header_length = int.from_bytes(head[:8], "little")
    return 0 < header_length < path.stat().st_size


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part)
            for part in re.split(r"(\d+)", name) if part]


def _reader(path: Path, key: str, code: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        if code in _VIA_TORCH:
            with safe_open(str(path), framework="pt") as handle:
                return tensor_to_numpy(handle.get_tensor(key))
        with safe_open(str(path), framework="np") as handle:
            return handle.get_tensor(key)

    return read


def load(path: Path, options: LoadOptions) -> Model:
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = dict(handle.metadata() or {})
            # The header keeps no order; sorting numbers as numbers puts "10" after "9".
            keys = sorted(handle.keys(), key=_natural_key)
            slices = {key: handle.get_slice(key) for key in keys}
            shapes = {key: tuple(slices[key].get_shape()) for key in keys}
            codes = {key: slices[key].get_dtype() for key in keys}
    except SafetensorError as exc:
        raise ModelLoadError(f"{path.name}: not a valid safetensors file (damaged or truncated): "
                             f"{one_line(exc)}") from None
    input_shape = options.input_shape
    if input_shape is None and zoo.INPUT_SHAPE_METADATA_KEY in metadata:
        input_shape = parse_shape(metadata[zoo.INPUT_SHAPE_METADATA_KEY])
    arch = metadata.get(zoo.ARCH_METADATA_KEY)
    if arch in zoo.ARCHITECTURES:
        from safetensors.torch import load_file

        return architecture_model(path, NAME, arch, load_file(str(path)),
                                  input_shape=input_shape, metadata=metadata)
    unknown = {code for code in codes.values() if code not in _DTYPES}
    if unknown:
        raise ValueError(f"unsupported tensor dtype {', '.join(sorted(unknown))}")
    store = TensorStore(
        getters={key: _reader(path, key, codes[key]) for key in keys},
        shapes=shapes,
        dtypes={key: _DTYPES[codes[key]][0] for key in keys},
        itemsizes={key: _DTYPES[codes[key]][1] for key in keys},
    )
    notes = [f"names the architecture {arch!r}, which Slimscope does not know"] if arch else []
    return weights_only_model(path, NAME, store, input_shape=input_shape, notes=notes,
                              metadata=metadata)

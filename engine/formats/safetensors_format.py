"""safetensors files: a JSON header (names, dtypes, shapes, offsets) and raw tensor bytes.

There is no graph and no code, so opening one is always safe. The header is parsed once, by
us, and every entry checked against the file before it is trusted (:mod:`engine.formats.guard`);
the file is then memory-mapped once and each tensor is a zero-copy view of that map, so a
checkpoint with 300k tensors opens in seconds and a 4 GB tensor costs no memory until read.
A header whose metadata names a known architecture (``slimscope.arch``) loads as that runnable
module; ``slimscope.input_shape`` gives the input shape for MACs.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from engine import zoo
from engine.errors import FormatError
from engine.formats import LoadOptions
from engine.formats._torch_common import architecture_model, weights_only_model
from engine.formats.guard import (
    MAX_ELEMENTS,
    element_count,
    quote,
    regular_file,
    span_inside,
)
from engine.model import Model, TensorStore, map_file

NAME = "safetensors"

#: safetensors' own reader refuses headers above 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000
#: A shape in the file's metadata may ask for at most this many input elements: a known
#: architecture is run once on zeros of that shape to count MACs.
MAX_INPUT_ELEMENTS = 1 << 24
#: safetensors dtype codes -> numpy dtype (ml_dtypes for bfloat16 and float8).
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {code: dtype.name for code, dtype in _DTYPES.items()}
_METADATA_KEY = "__metadata__"


def match(path: Path, head: bytes, zip_names: list[str]) -> bool:
    """An 8-byte little-endian header length that fits the file, then the JSON header's '{'."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    header_length = int.from_bytes(head[:8], "little")
    return 0 < header_length < path.stat().st_size


@dataclass(frozen=True, slots=True)
class _Entry:
    """One header entry, checked: where its bytes lie in the file and how to view them."""

    code: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def load(path: Path, options: LoadOptions) -> Model:
    name = quote(path.name)
    file_size = regular_file(path).st_size
    header, data_start = _read_header(path, name, file_size)
    metadata = _metadata(header.pop(_METADATA_KEY, None), name)
    entries = {key: _entry(name, key, value, data_start, file_size)
               for key, value in header.items()}
    del header  # 300k parsed JSON entries weigh more than the checked ones
    # The header keeps no order; sorting numbers as numbers puts "10" after "9".
    keys = sorted(entries, key=_natural_key)
    input_shape = options.input_shape
    if input_shape is None and zoo.INPUT_SHAPE_METADATA_KEY in metadata:
        input_shape = _metadata_input_shape(name, metadata[zoo.INPUT_SHAPE_METADATA_KEY])
    if metadata.get("format") == CODES_FORMAT:
        return _codes_model(path, metadata, input_shape)
    buffer = map_file(path)
    arch = metadata.get(zoo.ARCH_METADATA_KEY)
    if arch in zoo.ARCHITECTURES:
        tensors = {key: _torch_tensor(buffer, entries[key]) for key in keys}
        return architecture_model(path, NAME, arch, tensors, input_shape=input_shape,
                                  metadata=metadata)

    def read(key: str) -> np.ndarray:
        return _read(buffer, entries[key])

    store = TensorStore(
        read,
        shapes={key: entries[key].shape for key in keys},
        dtypes={key: _DTYPE_NAMES[entries[key].code] for key in keys},
        itemsizes={key: entries[key].dtype.itemsize for key in keys},
    )
    notes = [f"names the architecture {quote(arch)}, which Slimscope does not know"] if arch else []
    return weights_only_model(path, NAME, store, input_shape=input_shape, notes=notes,
                              metadata=metadata)


#: The `format` metadata of Slimscope's own codes files (engine.export.safetensors_codes).
CODES_FORMAT = "slimscope-codes"


def _codes_model(path: Path, metadata: dict[str, str], input_shape: Any) -> Model:
    """A ``safetensors-codes`` file, decoded: the layers as the floats its codes stand for."""
    from engine.export.safetensors_codes import read_codes

    arrays = read_codes(path)
    keys = sorted(arrays, key=_natural_key)
    store = TensorStore(
        {key: (lambda array=arrays[key]: array) for key in keys},
        shapes={key: tuple(arrays[key].shape) for key in keys},
        dtypes={key: arrays[key].dtype.name for key in keys},
        itemsizes={key: arrays[key].dtype.itemsize for key in keys},
    )
    return weights_only_model(path, NAME, store, input_shape=input_shape, metadata=metadata,
                              notes=["Slimscope codes file: integer codes, scales and masks, "
                                     "decoded to the float values they stand for"])


# -- the header, checked ----------------------------------------------------------------------
def _invalid(name: str, detail: str) -> FormatError:
    return FormatError(f"{name}: not a valid safetensors file (damaged or truncated): {detail}")


def _read_header(path: Path, name: str, file_size: int) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the file offset where tensor data starts."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _invalid(name, "shorter than its 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise _invalid(name, f"its header claims {length} bytes, more than the "
                           f"{MAX_HEADER_BYTES} safetensors allows")
        if 8 + length > file_size:
            raise _invalid(name, f"its header claims {length} bytes but the file has "
                           f"{file_size}")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise _invalid(name, f"the header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _invalid(name, "the header is not a JSON object")
    return header, 8 + length


def _metadata(value: object, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _invalid(name, f"{_METADATA_KEY} must map strings to strings")
    return dict(value)


def _entry(name: str, key: str, value: object, data_start: int, file_size: int) -> _Entry:
    """A header entry after every check: known dtype, sane shape, bytes inside the data area
    and exactly as many as the shape needs.

    An ordinary entry passes one quick test (300k of them must take well under a second);
    anything else goes through :func:`_checked_entry`, whose guard checks word the refusal.
    """
    if type(value) is dict:
        code, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
        dtype = _DTYPES.get(code) if type(code) is str else None
        if (dtype is not None and type(shape) is list and type(offsets) is list
                and len(offsets) == 2 and all(type(dim) is int and dim >= 0 for dim in shape)):
            begin, end = offsets
            count = math.prod(shape)
            if (type(begin) is int and type(end) is int and 0 <= begin <= end
                    and data_start + end <= file_size and count <= MAX_ELEMENTS
                    and end - begin == count * dtype.itemsize):
                return _Entry(code, dtype, tuple(shape), data_start + begin, data_start + end)
    return _checked_entry(name, key, value, data_start, file_size)


def _checked_entry(name: str, key: str, value: object, data_start: int,
                   file_size: int) -> _Entry:
    where = f"{name}: tensor {quote(key)}"
    if not isinstance(value, dict):
        raise _invalid(name, f"tensor {quote(key)} is not described by a JSON object")
    code, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    dtype = _DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise FormatError(f"{where}: dtype {quote(code)} is not one Slimscope reads")
    if not isinstance(shape, list):
        raise FormatError(f"{where}: shape {quote(shape)} is not a list")
    count = element_count(where, shape)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise FormatError(f"{where}: data_offsets {quote(offsets)} are not two integers")
    begin, end = offsets
    if begin < 0:  # relative to the data area: span_inside below sees absolute offsets
        raise FormatError(f"{where}: negative offset in data_offsets {quote(offsets)}")
    if end < begin:
        raise FormatError(f"{where}: data_offsets {quote(offsets)} end before they begin")
    if data_start + end > file_size:
        raise _invalid(name, f"tensor {quote(key)} ends at byte {data_start + end}, past the "
                       f"end of the file ({file_size} bytes)")
    span_inside(where, data_start + begin, end - begin, file_size)
    if end - begin != count * dtype.itemsize:
        raise FormatError(f"{where}: shape {quote(shape)} of {code} needs "
                          f"{count * dtype.itemsize} bytes but {end - begin} are stored")
    return _Entry(code, dtype, tuple(shape), data_start + begin, data_start + end)


def _metadata_input_shape(name: str, text: str) -> tuple[int, ...]:
    """The metadata's input shape, e.g. '1,3,224,224': positive integers of sane product."""
    parts = [part for part in re.split(r"[,x\s]+", text.strip()) if part]
    if not parts or len(parts) > 8 or not all(part.isdigit() and len(part) <= 12
                                              for part in parts):
        raise FormatError(f"{name}: metadata {zoo.INPUT_SHAPE_METADATA_KEY} {quote(text)} is "
                          "not a list of positive integers")
    shape = tuple(int(part) for part in parts)
    if 0 in shape:
        raise FormatError(f"{name}: metadata {zoo.INPUT_SHAPE_METADATA_KEY} {quote(text)} has "
                          "a zero dimension")
    if element_count(name, shape) > MAX_INPUT_ELEMENTS:
        raise FormatError(f"{name}: metadata {zoo.INPUT_SHAPE_METADATA_KEY} {quote(text)} asks "
                          f"for more than {MAX_INPUT_ELEMENTS} input values")
    return shape


_DIGITS = re.compile(r"(\d+)")


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part)
            for part in _DIGITS.split(name) if part]


# -- tensors as views of the one map ----------------------------------------------------------
def _read(buffer: np.ndarray, entry: _Entry) -> np.ndarray:
    """A zero-copy view; bfloat16 / float8, which most numpy code cannot use, are widened to
    float32 when read (a copy of that one tensor)."""
    view = buffer[entry.begin:entry.end].view(entry.dtype).reshape(entry.shape)
    return view.astype(np.float32) if entry.dtype.kind == "V" else view


def _torch_tensor(buffer: np.ndarray, entry: _Entry) -> Any:
    """A torch tensor over the map, for loading into a known architecture (which copies)."""
    import torch

    raw = buffer[entry.begin:entry.end]
    if entry.dtype.kind == "V":  # torch has these types; numpy only through ml_dtypes
        torch_dtype = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn,
                       "float8_e5m2": torch.float8_e5m2}[entry.dtype.name]
        if raw.size == 0:
            return torch.empty(entry.shape, dtype=torch_dtype)
        with warnings.catch_warnings():  # read-only map: torch warns; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(raw).view(torch_dtype).reshape(entry.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw.view(entry.dtype).reshape(entry.shape))

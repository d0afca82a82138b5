"""Weights-only results as real codes in safetensors, and the reader that rebuilds the floats.

A weights-only model (a bare state_dict or safetensors: no graph) cannot be run, so its
compressed form is only worth having if it is really smaller and a reader can get the floats
back. ``safetensors-codes`` stores, per tensor of the model:

* ``codes``: the integer codes, packed ``bits`` per value when bits < 8 (least significant bit
  first, as :func:`engine.bundle.pack_bits`; signed codes offset by 2**(bits-1) first), else
  int8/uint8 in the tensor's shape; beside them ``<key>:scale`` (float32) and, asymmetric,
  ``<key>:zero_point``: ``w = (codes - zero_point) * scale`` per tensor, per channel along
  ``axis`` or per ``group_size`` consecutive inputs of each output row;
* ``sparse``: a pruned float tensor as its kept values in order (``<key>:values``) and a packed
  bit mask (``<key>:mask``);
* ``plain``: the tensor itself, in the plan's 16-bit dtype where it cast one.

The header's ``slimscope.codes`` metadata entry (JSON) says for each key which of these it is
and every number needed to decode it, so any reader can rebuild the floats; :func:`read_codes`
is ours, and verification uses it to check every tensor against the compressed values
exactly. Plain ``safetensors`` (torch_files) stores the compressed floats instead: no smaller
than the original unless the plan cast to 16 bits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.bundle import pack_bits, unpack_bits
from engine.compressed import QuantizedWeight
from engine.errors import FormatError
from engine.evaluate import Runner
from engine.export.base import WEIGHTS_SOURCE, Exporter, ExportJob, register
from engine.formats.guard import element_count, quote, regular_file

#: Header entries that identify the file and describe its tensors.
FORMAT_KEY = "format"
FORMAT_NAME = "slimscope-codes"
CODES_KEY = "slimscope.codes"
VERSION = 1
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "float64": torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode(job: ExportJob) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to write and the per-key decoding table, from the compressed backend."""
    compressed, backend = job.compressed, job.compressed.backend
    assert backend is not None
    tensors: dict[str, torch.Tensor] = {}
    table: dict[str, Any] = {}
    for key in job.model.tensors.unique_keys():
        job.cancel.check()
        value = torch.from_numpy(np.array(backend.read(key)))  # a writable copy
        entry: dict[str, Any] = {"shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
        quant = compressed.quantized.get(key)
        mask = compressed.masks.get(key)
        if quant is not None:
            signed = quant.codes.dtype == torch.int8
            offset = 1 << (quant.bits - 1) if signed and quant.bits < 8 else 0
            codes = quant.codes.to(torch.int16) + offset
            if quant.bits < 8:
                packed = pack_bits(codes.numpy().astype(np.uint8), quant.bits)
                tensors[f"{key}:codes"] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
            else:
                tensors[f"{key}:codes"] = quant.codes.contiguous()
            tensors[f"{key}:scale"] = quant.scale.to(torch.float32).contiguous()
            if not quant.symmetric:
                tensors[f"{key}:zero_point"] = quant.zero_point.contiguous()
            entry.update(encoding="codes", bits=quant.bits, symmetric=quant.symmetric,
                         axis=quant.axis, group_size=quant.group_size,
                         code_dtype=_dtype_name(quant.codes.dtype), offset=offset,
                         packed=quant.bits < 8, zero_dtype=_dtype_name(quant.zero_point.dtype))
        elif mask is not None:
            stored = value.to(compressed.cast.get(key, value.dtype))
            keep = mask.to(torch.bool).reshape(value.shape)
            tensors[f"{key}:values"] = stored[keep].contiguous()
            tensors[f"{key}:mask"] = torch.frombuffer(
                bytearray(pack_bits(keep.numpy().astype(np.uint8), 1)), dtype=torch.uint8)
            entry.update(encoding="sparse", stored_dtype=_dtype_name(stored.dtype))
        else:
            tensors[key] = value.to(compressed.cast.get(key, value.dtype)).contiguous()
            entry.update(encoding="plain")
        table[key] = entry
    return tensors, table


def read_codes(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a ``safetensors-codes`` file rebuilt as floats in its original dtype.

    The file may come from anywhere: the table is checked against the stored tensors (names,
    counts, dtypes) and every problem is one FormatError line.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    regular_file(path, "codes file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            stored = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise FormatError(f"{path.name}: not a readable safetensors file ({error})") from None
    if metadata.get(FORMAT_KEY) != FORMAT_NAME or CODES_KEY not in metadata:
        raise FormatError(f"{path.name}: not a {FORMAT_NAME} file (no {CODES_KEY} table)")
    try:
        table = json.loads(metadata[CODES_KEY])
    except json.JSONDecodeError as error:
        raise FormatError(f"{path.name}: unreadable {CODES_KEY} table ({error.msg})") from None
    if not isinstance(table, dict):
        raise FormatError(f"{path.name}: the {CODES_KEY} table is not a mapping")
    return {key: _decode(str(key), entry, stored) for key, entry in table.items()}


def _tensor(stored: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in stored:
        raise FormatError(f"the codes file lacks tensor {quote(name)}")
    return stored[name]


def _float_dtype(where: str, name: object) -> torch.dtype:
    if name not in _TORCH_DTYPES:
        raise FormatError(f"{where}: unknown float dtype {quote(name)}")
    return _TORCH_DTYPES[name]  # type: ignore[index]


def _decode(key: str, entry: object, stored: dict[str, torch.Tensor]) -> np.ndarray:
    """One tensor rebuilt from its table entry (see the module docstring)."""
    where = f"codes file tensor {quote(key)}"
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: its table entry is not a mapping")
    shape = entry.get("shape")
    if not isinstance(shape, list):
        raise FormatError(f"{where}: no shape")
    count = element_count(where, shape)
    dtype = _float_dtype(where, entry.get("dtype"))
    encoding = entry.get("encoding")
    if encoding == "plain":
        value = _tensor(stored, key)
        if list(value.shape) != shape:
            raise FormatError(f"{where}: stored shape {list(value.shape)} is not {shape}")
        return value.to(dtype).numpy()
    if encoding == "sparse":
        values, mask_bytes = _tensor(stored, f"{key}:values"), _tensor(stored, f"{key}:mask")
        if mask_bytes.dtype != torch.uint8 or mask_bytes.numel() * 8 < count:
            raise FormatError(f"{where}: its mask is not {count} packed bits")
        keep = torch.from_numpy(unpack_bits(mask_bytes.numpy().tobytes(), 1, count).astype(bool))
        if int(keep.sum()) != values.numel():
            raise FormatError(f"{where}: {values.numel()} values for {int(keep.sum())} kept")
        full = torch.zeros(count, dtype=values.dtype)
        full[keep] = values.reshape(-1)
        return full.reshape(shape).to(dtype).numpy()
    if encoding == "codes":
        return _dequantized(where, entry, shape, count, stored, key).to(dtype).numpy()
    raise FormatError(f"{where}: unknown encoding {quote(encoding)}")


def _dequantized(where: str, entry: dict[str, Any], shape: list[int], count: int,
                 stored: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    bits, offset = entry.get("bits"), entry.get("offset", 0)
    code_dtype = {"int8": torch.int8, "uint8": torch.uint8}.get(entry.get("code_dtype"))
    if not isinstance(bits, int) or not 1 <= bits <= 8 or code_dtype is None \
            or not isinstance(offset, int) or not 0 <= offset <= 128:
        raise FormatError(f"{where}: bad code description (bits {quote(bits)}, dtype "
                          f"{quote(entry.get('code_dtype'))}, offset {quote(offset)})")
    raw = _tensor(stored, f"{key}:codes")
    if entry.get("packed"):
        if raw.dtype != torch.uint8 or raw.numel() * 8 < count * bits:
            raise FormatError(f"{where}: its codes are not {count} packed {bits}-bit values")
        values = unpack_bits(raw.numpy().tobytes(), bits, count).astype(np.int16) - offset
        codes = torch.from_numpy(values).to(code_dtype).reshape(shape)
    else:
        if raw.dtype != code_dtype or list(raw.shape) != shape:
            raise FormatError(f"{where}: its codes are not {entry.get('code_dtype')} of {shape}")
        codes = raw
    scale = _tensor(stored, f"{key}:scale").to(torch.float32)
    symmetric = bool(entry.get("symmetric"))
    zero = (torch.zeros_like(scale, dtype=code_dtype) if symmetric
            else _tensor(stored, f"{key}:zero_point"))
    axis, group = entry.get("axis"), entry.get("group_size")
    if (axis is not None and not (isinstance(axis, int) and 0 <= axis < len(shape))) or (
            group is not None and not (isinstance(group, int) and group > 0)):
        raise FormatError(f"{where}: bad axis {quote(axis)} or group size {quote(group)}")
    quant = QuantizedWeight(codes=codes, scale=scale, zero_point=zero, bits=bits,
                            symmetric=symmetric, axis=axis, group_size=group)
    try:
        return quant.dequantize()
    except RuntimeError as error:  # scales that do not fit the codes' shape
        raise FormatError(f"{where}: scales do not fit the codes ({error})") from None


class _WeightsExporter(Exporter):
    """Formats of weights without a graph: verified by reading back, not by running."""

    runtime = "safetensors"
    sources = frozenset({WEIGHTS_SOURCE})

    def reload(self, path: Path, job: ExportJob) -> Runner:
        raise FormatError(f"{self.name} holds weights only; there is nothing to run")

    def latency(self, path: Path, job: ExportJob) -> None:
        return None

    def baseline_bytes(self, job: ExportJob) -> tuple[int, str]:
        return job.model.file_bytes, "the original file"


@register
class SafetensorsCodesExporter(_WeightsExporter):
    name = "safetensors-codes"
    suffixes = (".safetensors",)
    description = ("safetensors with integer codes (packed below 8 bits), scales, zero points "
                   "and masks, decoding described in the header; rebuilds the exact floats")

    def write(self, job: ExportJob, path: Path) -> None:
        from safetensors.torch import save_file

        tensors, table = encode(job)
        save_file(tensors, str(path), metadata={FORMAT_KEY: FORMAT_NAME,
                                                "slimscope.codes_version": str(VERSION),
                                                CODES_KEY: json.dumps(table)})
        job.notes.append("decode with engine.export.safetensors_codes.read_codes, or any reader "
                         f"following the {CODES_KEY} header table")

    def rebuilt_tensors(self, path: Path, job: ExportJob) -> dict[str, np.ndarray]:
        return read_codes(path)

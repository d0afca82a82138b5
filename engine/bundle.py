"""The .slim bundle: sparse and low-bit weights stored packed, plus what rebuilds the module.

ONNX and PyTorch files store weights densely, in types their runtimes compute with, so pruned
zeros and 3-bit codes cost as much as any float. A bundle stores what the plan really produced:

* quantized weights as integer codes packed `bits` to a byte run (2/3/4-bit codes are not
  padded to 8), with float32 scales and packed zero points (asymmetric only);
* fp16 / bf16 casts in their 16-bit type, everything else in its own dtype;
* where more than 1/bits of a tensor is zero, a 1-bit-per-element mask of the non-zeros and
  only the non-zero codes or values;
* every member deflate-compressed in a zip (codes of bell-shaped weights shrink by ~15%).

Decoding is exact: a restored weight equals the compressed module's weight bit for bit, because
both come from :meth:`QuantizedWeight.dequantize` of the same codes.

What rebuilds the module (the *architecture recipe*), chosen when the bundle is written:

* ``zoo``: the model is an :mod:`engine.zoo` architecture. It is rebuilt by name, low-rank
  layers are replaced by their two factors, and layers narrowed by structured pruning are
  resized to the stored shapes. The result is a plain ``nn.Module``, ready to compress or
  fine-tune again.
* ``torchscript``: any other module is traced with TorchScript and saved with every tensor
  replaced by an empty one (the demo's graph and code take 28 KB); loading puts the bundle's
  tensors back in. TorchScript runs no pickled Python, so a bundle loads without trust.

We chose TorchScript over an ONNX graph because ONNX export folds BatchNorm into convolution
weights, so the stored codes would no longer be the plan's codes; and over a torch.export .pt2
because its archive cannot be written without its weights.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from engine import zoo
from engine.compressed import CompressedModel, QuantizedWeight
from engine.errors import ModelLoadError
from engine.model import TensorSpec

#: Zip member holding the manifest; its presence is what marks a zip as a bundle.
MANIFEST = "slimscope-bundle.json"
ARCHITECTURE_MEMBER = "architecture.pt"
BUNDLE_FORMAT = "slimscope-bundle"
BUNDLE_VERSION = 1

_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


# -- bit packing ------------------------------------------------------------------------------
def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned integers < 2**bits, packed `bits` per value, least significant bit first."""
    values = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return values.tobytes()
    planes = np.unpackbits(values[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """The `count` values :func:`pack_bits` packed, as uint8."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw[:count].copy()
    planes = np.unpackbits(raw, bitorder="little")[:count * bits].reshape(count, bits)
    return (planes.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(
        axis=1, dtype=np.uint8)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of any dtype numpy may lack (bfloat16 included)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def _code_offset(quant: QuantizedWeight) -> int:
    """Lowest code: symmetric codes run from -(2^(b-1)-1), asymmetric ones from 0."""
    return -(2 ** (quant.bits - 1) - 1) if quant.symmetric else 0


# -- writing ----------------------------------------------------------------------------------
class _Writer:
    """Collects members and the tensor index of one bundle."""

    def __init__(self) -> None:
        self.members: dict[str, bytes] = {}
        self.entries: list[dict[str, Any]] = []

    def member(self, index: int, part: str, data: bytes) -> str:
        name = f"tensors/{index}/{part}"
        self.members[name] = data
        return name

    def add(self, name: str, tensor: torch.Tensor, quant: QuantizedWeight | None,
            stored_dtype: torch.dtype | None) -> None:
        index = len(self.entries)
        entry: dict[str, Any] = {"name": name, "shape": list(tensor.shape),
                                 "dtype": _dtype_name(tensor.dtype)}
        if quant is not None:
            entry.update(self._quantized(index, quant))
        else:
            entry.update(self._plain(index, tensor.to(stored_dtype or tensor.dtype)))
        self.entries.append(entry)

    def alias(self, name: str, of: str) -> None:
        self.entries.append({"name": name, "encoding": "alias", "of": of})

    def _plain(self, index: int, stored: torch.Tensor) -> dict[str, Any]:
        entry: dict[str, Any] = {"encoding": "plain", "stored_dtype": _dtype_name(stored.dtype)}
        bits = stored.element_size() * 8
        flat = stored.reshape(-1)
        keep = flat != 0
        nonzero = int(keep.sum())
        if stored.dtype != torch.bool and _sparse_pays(flat.numel(), nonzero, bits):
            entry["mask"] = self.member(index, "mask", _pack_mask(keep))
            flat = flat[keep]
        entry["values"] = self.member(index, "values", _tensor_bytes(flat))
        return entry

    def _quantized(self, index: int, quant: QuantizedWeight) -> dict[str, Any]:
        offset = _code_offset(quant)
        entry: dict[str, Any] = {
            "encoding": "quantized", "bits": quant.bits, "symmetric": quant.symmetric,
            "axis": quant.axis, "group_size": quant.group_size, "code_offset": offset,
            "scale_shape": list(quant.scale.shape),
            "scale": self.member(index, "scale", _tensor_bytes(quant.scale.float())),
        }
        if not quant.symmetric:
            zero = quant.zero_point.to(torch.int16) - offset
            entry["zero_point"] = self.member(index, "zero_point",
                                              pack_bits(zero.numpy(), quant.bits))
        codes = (quant.codes.to(torch.int16) - offset).reshape(-1)
        keep = quant.dequantize().reshape(-1) != 0
        if _sparse_pays(codes.numel(), int(keep.sum()), quant.bits):
            entry["mask"] = self.member(index, "mask", _pack_mask(keep))
            codes = codes[keep]
        entry["codes"] = self.member(index, "codes", pack_bits(codes.numpy(), quant.bits))
        return entry


def _sparse_pays(count: int, nonzero: int, bits: int) -> bool:
    """A 1-bit mask plus the non-zeros beats storing every element (as tensor_storage_bytes)."""
    return (count + 7) // 8 + (nonzero * bits + 7) // 8 < (count * bits + 7) // 8


def _pack_mask(keep: torch.Tensor) -> bytes:
    return np.packbits(keep.numpy(), bitorder="little").tobytes()


def _unpack_mask(data: bytes, count: int) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:count]
    return torch.from_numpy(bits.astype(bool))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def codes_match(quant: QuantizedWeight, tensor: torch.Tensor) -> bool:
    """Whether the module still holds exactly what the codes stand for (not retrained since)."""
    return quant.codes.shape == tensor.shape and torch.equal(
        quant.dequantize().to(tensor.dtype), tensor.detach())


def zoo_architecture(module: nn.Module, metadata: Mapping[str, str]) -> str | None:
    """The engine.zoo name of `module`'s architecture, from file metadata or its class."""
    named = metadata.get(zoo.ARCH_METADATA_KEY)
    if named in zoo.ARCHITECTURES:
        return named
    for name, factory in zoo.ARCHITECTURES.items():
        if isinstance(factory, type) and type(module) is factory:
            return name
    return None


def stripped_torchscript(traced: torch.jit.ScriptModule) -> bytes:
    """A traced module saved with every parameter and buffer replaced by an empty tensor.

    Changes `traced`; pass a trace made for the purpose.
    """
    for name, tensor in traced.state_dict().items():
        _set_script_tensor(traced, name, torch.empty(0, dtype=tensor.dtype))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see _rebuild_torchscript
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _set_script_tensor(module: torch.jit.ScriptModule, name: str, tensor: torch.Tensor) -> None:
    prefix, _, leaf = name.rpartition(".")
    owner = module
    for part in prefix.split(".") if prefix else ():
        owner = getattr(owner, part)
    setattr(owner, leaf, tensor)


def write_bundle(destination: Path, compressed: CompressedModel, *, architecture: dict[str, Any],
                 architecture_bytes: bytes | None, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], source: Mapping[str, Any]) -> list[str]:
    """Write the bundle to `destination` (a path the caller made safe); return notes.

    `architecture` is the recipe ({"kind": "zoo", "name": ...} or {"kind": "torchscript"});
    `architecture_bytes` the stripped TorchScript for the latter.
    """
    notes: list[str] = []
    writer = _Writer()
    state = compressed.module.state_dict()
    primary = _primary_names(state, compressed.quantized)
    for name, tensor in state.items():
        if primary[name] != name:
            writer.alias(name, primary[name])
            continue
        quant = compressed.quantized.get(name)
        if quant is not None and not codes_match(quant, tensor):
            notes.append(f"{name}: weights changed after quantization (fine-tuned?); stored as "
                         "float, not as codes")
            quant = None
        writer.add(name, tensor, quant, compressed.cast.get(name))
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "architecture": architecture,
        "tensors": writer.entries,
        "plan": compressed.plan,
        "low_rank": compressed.low_rank,
        "channels": {k: list(v) for k, v in compressed.channels.items()},
        "activation_quant": compressed.activation_quant,
        "inputs": [spec.to_dict() for spec in inputs],
        "outputs": [spec.to_dict() for spec in outputs],
        "source": dict(source),
        "notes": list(compressed.notes),
    }
    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_DEFLATED,
                         compresslevel=9) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=1))
        if architecture_bytes is not None:
            archive.writestr(ARCHITECTURE_MEMBER, architecture_bytes)
        for name, data in writer.members.items():
            archive.writestr(name, data)
    return notes


def _primary_names(state: Mapping[str, torch.Tensor], quantized: Mapping[str, QuantizedWeight]
                   ) -> dict[str, str]:
    """Each tensor name -> the name its data is stored under: tied weights are stored once,
    under the name that has integer codes if any, else the first."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        identity = ((tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                     tuple(tensor.shape), tensor.dtype) if tensor.numel() else (name,))
        groups.setdefault(identity, []).append(name)
    primary = {}
    for names in groups.values():
        chosen = next((n for n in names if n in quantized), names[0])
        primary.update(dict.fromkeys(names, chosen))
    return primary


# -- reading ----------------------------------------------------------------------------------
@dataclass
class Bundle:
    """A loaded bundle: the runnable module (eval mode) and the manifest it was rebuilt from."""

    module: nn.Module
    manifest: dict[str, Any]

    @property
    def inputs(self) -> list[TensorSpec]:
        return [_spec(raw) for raw in self.manifest.get("inputs", [])]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [_spec(raw) for raw in self.manifest.get("outputs", [])]

    def describe(self) -> list[str]:
        """One line per storage kind, for inspection notes."""
        counts: dict[str, int] = {}
        for entry in self.manifest["tensors"]:
            if entry["encoding"] == "quantized":
                kind = f"{entry['bits']}-bit codes"
            elif entry["encoding"] == "plain":
                kind = entry["stored_dtype"]
            else:
                continue
            kind += " + non-zero mask" if "mask" in entry else ""
            counts[kind] = counts.get(kind, 0) + 1
        recipe = self.manifest["architecture"]
        rebuilt = (f"the known architecture {recipe['name']!r}" if recipe["kind"] == "zoo"
                   else "its stored TorchScript graph")
        stored = ", ".join(f"{count} as {kind}" for kind, count in counts.items())
        return [f"Slimscope bundle rebuilt from {rebuilt}; tensors stored {stored}"]


def _spec(raw: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(raw["name"], tuple(raw["shape"]), raw.get("dtype", "float32"))


def is_bundle(zip_names: list[str]) -> bool:
    return MANIFEST in zip_names


def read_bundle(path: Path) -> Bundle:
    """Decode every tensor and rebuild the module the manifest describes."""
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read(MANIFEST))
        if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != BUNDLE_VERSION:
            raise ModelLoadError(f"{path.name}: bundle version {manifest.get('version')!r} is not "
                                 f"supported (expected {BUNDLE_VERSION})")
        decoded = {entry["name"]: _decode(archive, entry) for entry in manifest["tensors"]
                   if entry["encoding"] != "alias"}
        state = {entry["name"]: decoded[entry["of"] if entry["encoding"] == "alias"
                                         else entry["name"]] for entry in manifest["tensors"]}
        recipe = manifest["architecture"]
        if recipe["kind"] == "zoo":
            module = _rebuild_zoo(recipe["name"], state, manifest.get("low_rank", {}))
        elif recipe["kind"] == "torchscript":
            module = _rebuild_torchscript(archive.read(ARCHITECTURE_MEMBER), state)
        else:
            raise ModelLoadError(f"{path.name}: unknown architecture recipe {recipe['kind']!r}")
    return Bundle(module.eval(), manifest)


def _decode(archive: zipfile.ZipFile, entry: Mapping[str, Any]) -> torch.Tensor:
    shape = tuple(entry["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    mask = _unpack_mask(archive.read(entry["mask"]), count) if "mask" in entry else None
    stored = count if mask is None else int(mask.sum())
    dtype = _DTYPES[entry["dtype"]]
    if entry["encoding"] == "plain":
        values = _tensor_from_bytes(archive.read(entry["values"]), _DTYPES[entry["stored_dtype"]],
                                    (stored,))
        return _scatter(values, mask, count).reshape(shape).to(dtype)
    bits, offset = entry["bits"], entry["code_offset"]
    codes = torch.from_numpy(unpack_bits(archive.read(entry["codes"]), bits, stored)
                             .astype(np.int16) + offset)
    scale = _tensor_from_bytes(archive.read(entry["scale"]), torch.float32,
                               tuple(entry["scale_shape"]))
    if entry["symmetric"]:
        zero = torch.zeros(scale.shape, dtype=torch.int16)
    else:
        zero = torch.from_numpy(unpack_bits(archive.read(entry["zero_point"]), bits,
                                            scale.numel()).astype(np.int16)).reshape(scale.shape)
    quant = QuantizedWeight(codes=_scatter(codes, mask, count).reshape(shape), scale=scale,
                            zero_point=zero, bits=bits, symmetric=entry["symmetric"],
                            axis=entry["axis"], group_size=entry["group_size"])
    weight = quant.dequantize()
    if mask is not None:  # masked codes were dropped, not stored as the zero point
        weight = weight.reshape(-1).masked_fill(~mask, 0.0).reshape(shape)
    return weight.to(dtype)


def _scatter(values: torch.Tensor, mask: torch.Tensor | None, count: int) -> torch.Tensor:
    if mask is None:
        return values
    full = torch.zeros(count, dtype=values.dtype)
    full[mask] = values
    return full


def _conv_width(conv: nn.Module, weight: torch.Tensor) -> dict[str, Any]:
    # A depthwise conv stays depthwise: one group per remaining channel.
    groups = weight.shape[0] if 1 < conv.groups == conv.out_channels else conv.groups
    return {"out_channels": weight.shape[0], "in_channels": weight.shape[1] * groups,
            "groups": groups}


#: Attributes that describe a layer's width, re-derived from its resized weight.
_WIDTH_ATTRIBUTES = {
    nn.modules.conv._ConvNd: _conv_width,
    nn.Linear: lambda m, w: {"out_features": w.shape[0], "in_features": w.shape[1]},
    nn.modules.batchnorm._NormBase: lambda m, w: {"num_features": w.shape[0]},
    nn.LayerNorm: lambda m, w: {"normalized_shape": tuple(w.shape)},
}


def _rebuild_zoo(arch: str, state: dict[str, torch.Tensor], low_rank: Mapping[str, int]
                 ) -> nn.Module:
    """The zoo architecture with the compressed model's factorized and narrowed layers."""
    from engine.methods.lowrank import factorize
    from engine.plan import LowRank

    try:
        module = zoo.build(arch)
    except KeyError as error:
        raise ModelLoadError(f"the bundle names the architecture {arch!r}, which this version "
                             "of Slimscope does not know") from error
    for name, rank in low_rank.items():
        pair = factorize(module.get_submodule(name), LowRank(rank=int(rank)))
        if pair is None:
            raise ModelLoadError(f"layer {name!r}: cannot rebuild its rank-{rank} factors")
        module.set_submodule(name, pair)
    for name, tensor in module.state_dict().items():
        if name in state and state[name].shape != tensor.shape:
            _resize(module, name, state[name].shape)
    module.load_state_dict(state, strict=True)
    return module


def _resize(module: nn.Module, name: str, shape: torch.Size) -> None:
    """Give a parameter or buffer a new shape, and its layer the width attributes to match."""
    prefix, _, leaf = name.rpartition(".")
    owner = module.get_submodule(prefix)
    old = getattr(owner, leaf)
    new = torch.empty(shape, dtype=old.dtype)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = new
    if leaf == "weight":
        for kind, attributes in _WIDTH_ATTRIBUTES.items():
            if isinstance(owner, kind):
                for attribute, value in attributes(owner, new).items():
                    setattr(owner, attribute, value)


def _rebuild_torchscript(data: bytes, state: Mapping[str, torch.Tensor]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    expected = set(module.state_dict())
    if expected != set(state):
        missing = sorted(expected - set(state))[:3]
        raise ModelLoadError(f"the bundle's tensors do not fit its graph (missing: "
                             f"{', '.join(missing) or 'none'})")
    for name, tensor in state.items():
        _set_script_tensor(module, name, tensor)
    return module

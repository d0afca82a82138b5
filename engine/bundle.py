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
from typing import Any, Collection, Mapping

import numpy as np
import torch
from torch import nn

from engine import zoo
from engine.compressed import CompressedModel, QuantizedWeight
from engine.errors import FormatError, ModelLoadError, one_line
from engine.formats import guard
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
    return _offset_for(quant.bits, quant.symmetric)


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


def stripped_torchscript(traced: torch.jit.ScriptModule,
                         stored: Collection[str] | None = None) -> bytes:
    """A traced module saved with every parameter and buffer the bundle stores (`stored`; None:
    all of them) replaced by an empty tensor.

    Tensors the bundle does not store stay in the graph as they are: a trace keeps buffers its
    module marked non-persistent (transformers' ``position_ids``), which are not in the
    module's state_dict, so the bundle has no copy of them. Changes `traced`; pass a trace made
    for the purpose.
    """
    for name, tensor in traced.state_dict().items():
        if stored is None or name in stored:
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
    """Decode every tensor and rebuild the module the manifest describes.

    Every manifest claim is checked against the bytes really stored before anything is
    allocated: a manifest is as untrusted as the rest of the file.
    """
    name = path.name
    size = guard.regular_file(path).st_size
    with zipfile.ZipFile(path) as archive:
        guard.check_zip(archive, size, name)
        reader = _BundleReader(archive, name)
        manifest = reader.manifest()
        decoded = {entry["name"]: reader.decode(entry) for entry in manifest["tensors"]
                   if entry["encoding"] != "alias"}
        state = {}
        for entry in manifest["tensors"]:
            source = entry["of"] if entry["encoding"] == "alias" else entry["name"]
            if source not in decoded:
                raise FormatError(f"{guard.quote(name)}: tensor {guard.quote(entry['name'])} "
                                  f"is an alias of {guard.quote(source)}, which is not stored")
            state[entry["name"]] = decoded[source]
        recipe = manifest["architecture"]
        try:
            if recipe["kind"] == "zoo":
                module = _rebuild_zoo(recipe["name"], state, manifest["low_rank"])
            else:
                module = _rebuild_torchscript(reader.torchscript(), state)
        except ModelLoadError:
            raise
        except (RuntimeError, ValueError, TypeError, AttributeError, KeyError) as exc:
            raise FormatError(f"{guard.quote(name)}: its tensors do not fit its architecture "
                              f"({guard.quote(one_line(exc), 160)})") from None
    return Bundle(module.eval(), manifest)


class _BundleReader:
    """Reads one bundle's members, refusing any manifest claim its bytes do not back."""

    def __init__(self, archive: zipfile.ZipFile, name: str) -> None:
        self.archive, self.name = archive, name

    def fail(self, message: str) -> FormatError:
        return FormatError(f"{guard.quote(self.name)}: {message}")

    def manifest(self) -> dict[str, Any]:
        """The manifest, with every field the reader relies on checked for type."""
        try:
            manifest = json.loads(guard.read_member(self.archive, MANIFEST, self.name))
        except (ValueError, RecursionError):
            raise self.fail("its manifest is not valid JSON") from None
        if not isinstance(manifest, dict):
            raise self.fail("its manifest is not a JSON object")
        if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != BUNDLE_VERSION:
            raise self.fail(f"bundle version {guard.quote(manifest.get('version'))} is not "
                            f"supported (expected {BUNDLE_VERSION})")
        recipe = manifest.get("architecture")
        if not isinstance(recipe, dict) or recipe.get("kind") not in ("zoo", "torchscript"):
            kind = recipe.get("kind") if isinstance(recipe, dict) else recipe
            raise self.fail(f"unknown architecture recipe {guard.quote(kind)}")
        if recipe["kind"] == "zoo" and not isinstance(recipe.get("name"), str):
            raise self.fail("its architecture recipe names no architecture")
        low_rank = manifest.setdefault("low_rank", {})
        if not isinstance(low_rank, dict) or not all(
                isinstance(rank, int) and not isinstance(rank, bool) and rank > 0
                for rank in low_rank.values()):
            raise self.fail("its low-rank table is not a map of layer names to ranks")
        for key in ("inputs", "outputs"):
            specs = manifest.setdefault(key, [])
            if not isinstance(specs, list) or not all(_is_spec(raw) for raw in specs):
                raise self.fail(f"its {key} are not a list of name/shape/dtype entries")
        tensors = manifest.get("tensors")
        if not isinstance(tensors, list) or not tensors:
            raise self.fail("its manifest lists no tensors")
        for entry in tensors:
            self._check_entry(entry)
        return manifest

    def _check_entry(self, entry: Any) -> None:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise self.fail(f"tensor entry {guard.quote(entry)} has no name")
        where = f"tensor {guard.quote(entry['name'])}"
        encoding = entry.get("encoding")
        if encoding == "alias":
            if not isinstance(entry.get("of"), str):
                raise self.fail(f"{where}: an alias of nothing")
            return
        if encoding not in ("plain", "quantized"):
            raise self.fail(f"{where}: unknown encoding {guard.quote(encoding)}")
        if not isinstance(entry.get("shape"), list) or entry.get("dtype") not in _DTYPES:
            raise self.fail(f"{where}: its shape or dtype {guard.quote(entry.get('dtype'))} "
                            "is not valid")
        guard.element_count(f"{guard.quote(self.name)}: {where}", entry["shape"])
        members = ["mask", "values"] if encoding == "plain" else [
            "mask", "codes", "scale", "zero_point"]
        for key in members:
            if key in entry and not isinstance(entry[key], str):
                raise self.fail(f"{where}: its {key} member name is not a string")
        if encoding == "plain":
            if entry.get("stored_dtype") not in _DTYPES or "values" not in entry:
                raise self.fail(f"{where}: stored dtype {guard.quote(entry.get('stored_dtype'))}"
                                " is not valid, or no values member")
            return
        bits = entry.get("bits")
        if not (type(bits) is int and 2 <= bits <= 8) or type(entry.get("symmetric")) is not bool:
            raise self.fail(f"{where}: {guard.quote(bits)} bits or its symmetry is not valid")
        for key in ("axis", "group_size"):
            value = entry.get(key)
            if value is not None and not (type(value) is int and value >= 0):
                raise self.fail(f"{where}: its {key} {guard.quote(value)} is not valid")
        if entry.get("code_offset") != _offset_for(bits, entry["symmetric"]):
            raise self.fail(f"{where}: code offset {guard.quote(entry.get('code_offset'))} does "
                            f"not fit {bits}-bit codes")
        if not isinstance(entry.get("scale_shape"), list) or "codes" not in entry or (
                "scale" not in entry) or (not entry["symmetric"] and "zero_point" not in entry):
            raise self.fail(f"{where}: its scales or codes are missing")

    def member(self, name: str, size: int, where: str) -> bytes:
        """Exactly `size` bytes from member `name`, as the manifest's shapes require."""
        data = guard.read_member(self.archive, name, self.name, limit=size)
        if len(data) != size:
            raise self.fail(f"{where}: member {guard.quote(name)} holds {len(data)} bytes, not "
                            f"the {size} its shape needs")
        return data

    def decode(self, entry: Mapping[str, Any]) -> torch.Tensor:
        where = f"tensor {guard.quote(entry['name'])}"
        shape = tuple(entry["shape"])
        count = guard.element_count(f"{guard.quote(self.name)}: {where}", shape)
        mask = None
        if "mask" in entry:
            mask = _unpack_mask(self.member(entry["mask"], (count + 7) // 8, where), count)
        stored = count if mask is None else int(mask.sum())
        dtype = _DTYPES[entry["dtype"]]
        if entry["encoding"] == "plain":
            stored_dtype = _DTYPES[entry["stored_dtype"]]
            itemsize = torch.empty((), dtype=stored_dtype).element_size()
            values = _tensor_from_bytes(self.member(entry["values"], stored * itemsize, where),
                                        stored_dtype, (stored,))
            return _scatter(values, mask, count).reshape(shape).to(dtype)
        return self._dequantized(entry, shape, count, stored, mask, where).to(dtype)

    def _dequantized(self, entry: Mapping[str, Any], shape: tuple[int, ...], count: int,
                     stored: int, mask: torch.Tensor | None, where: str) -> torch.Tensor:
        bits, symmetric = entry["bits"], entry["symmetric"]
        axis, group_size = entry["axis"], entry["group_size"]
        scale_shape = tuple(entry["scale_shape"])
        scales = guard.element_count(f"{guard.quote(self.name)}: {where} scales", scale_shape)
        if group_size:
            rows = shape[0] if shape else 0
            expected = count // group_size if rows and count % (rows * group_size) == 0 else -1
        elif axis is not None:
            expected = shape[axis] if axis < len(shape) else -1
        else:
            expected = 1
        if scales != expected:
            raise self.fail(f"{where}: {scales} scales do not fit shape {list(shape)} "
                            f"(axis {axis}, group size {group_size})")
        codes = unpack_bits(self.member(entry["codes"], (stored * bits + 7) // 8, where), bits,
                            stored).astype(np.int16) + entry["code_offset"]
        scale = _tensor_from_bytes(self.member(entry["scale"], scales * 4, where),
                                   torch.float32, scale_shape)
        if symmetric:
            zero = torch.zeros(scale_shape, dtype=torch.int16)
        else:
            packed = self.member(entry["zero_point"], (scales * bits + 7) // 8, where)
            zero = torch.from_numpy(unpack_bits(packed, bits, scales).astype(np.int16)
                                    ).reshape(scale_shape)
        quant = QuantizedWeight(codes=_scatter(torch.from_numpy(codes), mask, count).reshape(shape),
                                scale=scale, zero_point=zero, bits=bits, symmetric=symmetric,
                                axis=axis, group_size=group_size)
        weight = quant.dequantize()
        if mask is not None:  # masked codes were dropped, not stored as the zero point
            weight = weight.reshape(-1).masked_fill(~mask, 0.0).reshape(shape)
        return weight

    def torchscript(self) -> bytes:
        """The stripped TorchScript member, zip-checked: torch.jit.load inflates in C++."""
        data = guard.read_member(self.archive, ARCHITECTURE_MEMBER, self.name)
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                guard.check_zip(inner, len(data), f"{self.name}:{ARCHITECTURE_MEMBER}")
        except zipfile.BadZipFile:
            raise self.fail(f"member {ARCHITECTURE_MEMBER} is not a TorchScript archive"
                            ) from None
        return data


def _is_spec(raw: Any) -> bool:
    return (isinstance(raw, dict) and isinstance(raw.get("name"), str)
            and isinstance(raw.get("shape"), list)
            and all(isinstance(dim, (int, str)) for dim in raw["shape"])
            and isinstance(raw.get("dtype", "float32"), str))


def _offset_for(bits: int, symmetric: bool) -> int:
    return -(2 ** (bits - 1) - 1) if symmetric else 0


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
        warnings.simplefilter("ignore")
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    graph_tensors = module.state_dict()
    # what the writer stripped must come from the bundle; tensors the graph kept (buffers its
    # module did not persist) may come from it too
    stripped = {name for name, tensor in graph_tensors.items() if tensor.numel() == 0}
    if not stripped <= set(state) <= set(graph_tensors):
        missing = sorted(stripped - set(state))[:3]
        unknown = sorted(set(state) - set(graph_tensors))[:3]
        raise ModelLoadError(f"the bundle's tensors do not fit its graph (missing: "
                             f"{', '.join(missing) or 'none'}; not in the graph: "
                             f"{', '.join(unknown) or 'none'})")
    for name, tensor in state.items():
        _set_script_tensor(module, name, tensor)
    return module

"""ONNX models: the graph as protobuf, weights as initializers, Constant nodes or external files.

The proto is loaded without its external data, so a multi-gigabyte model costs little until a
view asks for a layer: external tensors are then memory-mapped, in-file tensors wrapped with
``np.frombuffer`` over the proto's bytes (no copy beyond protobuf's own). ``Model.onnx_model``
therefore still refers to external files; a consumer that needs the complete proto calls
:func:`proto_with_weights` (ONNX Runtime, given the file path, resolves them itself). Weights a
graph stores in Constant nodes count as weights too.
"""

from __future__ import annotations

import ast
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from engine.errors import FormatError, ModelLoadError, one_line
from engine.formats import LoadOptions
from engine.formats.guard import (
    MAX_ELEMENTS,
    element_count,
    inside_folder,
    numeric_dtype,
    quote,
    regular_file,
    span_inside,
)
from engine.macs import conv_macs, conv_transpose_macs, dense_macs, norm_macs
from engine.model import (
    Layer,
    Model,
    TensorSpec,
    TensorStore,
    layer_from_store,
    mark_shared,
)

NAME = "onnx"
#: Metadata key naming the folder external weight files are relative to, when there are any.
EXTERNAL_DATA_DIR_KEY = "onnx.external_data_dir"

#: Tags that may follow `ir_version` (field 1) in a ModelProto: fields 2-8, 14, 20, 25, 26.
_FOLLOWING_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA, 0xD2})
#: op type -> (layer kind, weight input indices to try in order, bias input index or None).
_LAYER_OPS: dict[str, tuple[str, tuple[int, ...], int | None]] = {
    "Conv": ("Conv", (1,), 2),
    "ConvTranspose": ("ConvTranspose", (1,), 2),
    "Gemm": ("Gemm", (1,), 2),
    "MatMul": ("MatMul", (1, 0), None),
    "Gather": ("Embedding", (0,), None),
    "BatchNormalization": ("BatchNormalization", (1,), 2),
    "LayerNormalization": ("LayerNormalization", (1,), 2),
    # ONNX Runtime's fused / weight-only quantized operators keep their weights as inputs.
    "QLinearConv": ("Conv", (3,), 8),
    "QLinearMatMul": ("MatMul", (3,), None),
    "MatMulNBits": ("MatMul", (1,), 5),
    "MatMulInteger": ("MatMul", (1,), None),
    "ConvInteger": ("Conv", (1,), None),
    # Recurrent layers: the input weights W here, the recurrent weights R in _SECOND_WEIGHTS.
    "LSTM": ("LSTM", (1,), 3),
    "GRU": ("GRU", (1,), 3),
    "RNN": ("RNN", (1,), 3),
}
#: op type -> (input index, name suffix) of a second weight that is a layer of its own; a
#: layer named after its node (not its weight) gets torch's parameter names as suffixes.
_SECOND_WEIGHTS: dict[str, tuple[int, str]] = {
    "LSTM": (2, "weight_hh"), "GRU": (2, "weight_hh"), "RNN": (2, "weight_hh")}
_FIRST_WEIGHT_SUFFIX = "weight_ih"
#: Nodes whose output is their first input, decoded: a weight reached through one of these
#: (QDQ graphs put DequantizeLinear between an int8 initializer and its Conv) is still a weight.
_DECODERS = frozenset({"DequantizeLinear", "Cast", "Identity"})
#: Nodes that rearrange their first input's elements and nothing else: a weight reached through
#: one (torch's exporter feeds an LSTM ``Unsqueeze(Concat(Slice(weight_ih)...))``, its gates
#: reordered and a direction axis added) is still that weight, kept in its stored shape. Every
#: other input must be a constant (the new shape, the axes, the slice bounds); a Concat counts
#: only when all its pieces come from one weight.
_RESHAPERS = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Slice", "Concat"})
#: Element types stored packed below a byte per element -> bits per element.
_PACKED_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                       ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(TensorProto, name)
}
#: Packed types are unpacked by onnx's own helper rather than viewed in place.
_INDIRECT_TYPES = frozenset(_PACKED_BITS)
#: Graphs with more nodes than this skip shape inference (and so MACs): it alone would take
#: tens of seconds, and a graph that large is inspected for its weights.
SHAPE_INFERENCE_NODE_BUDGET = 100_000
#: Initializers larger than this are replaced by shape-only stubs for shape inference.
_STUB_ABOVE_ELEMENTS = 1024


def match(path: Path, head: bytes, zip_names: list[str]) -> bool:
    """A ModelProto almost always opens with ir_version (tag 0x08, a small varint)."""
    return len(head) >= 3 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] in _FOLLOWING_TAGS


def load(path: Path, options: LoadOptions) -> Model:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise ModelLoadError(f"{path.name}: not a valid ONNX file (damaged or truncated): "
                             f"{one_line(exc)}") from None
    graph = proto.graph
    if not graph.node:
        raise ModelLoadError(f"{path.name}: the ONNX file holds no graph nodes")
    notes: list[str] = []
    sites, other_external = _walk(proto)
    constants = {key: site.tensor for key, site in sites.items()}
    sources = _checked_sources(path, constants, notes)
    _check_other_external(path, other_external)
    has_external = any(source.external is not None for source in sources.values())
    decoders = _decodable(_dequantizations(graph, sites), sources)
    store = _tensor_store(sources, path.parent, decoders)
    layers, uses = _layers(graph, store, sites)
    main_constants = {key for key, site in sites.items() if not site.graph_path}
    inputs = [_spec(value) for value in graph.input if value.name not in main_constants]
    outputs = [_spec(value) for value in graph.output]
    _fill_macs(proto, layers, uses, store, inputs, options.input_shape, notes)
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    if proto.producer_name:
        metadata["onnx.producer"] = f"{proto.producer_name} {proto.producer_version}".strip()
    if has_external:
        metadata[EXTERNAL_DATA_DIR_KEY] = str(path.parent)
    return Model(path=path, format=NAME, layers=layers, tensors=store, inputs=inputs,
                 outputs=outputs, onnx_model=proto, notes=notes, metadata=metadata)


def proto_with_weights(model: Model) -> onnx.ModelProto:
    """A copy of `model.onnx_model` with external weights read in, for serializing it whole."""
    if model.onnx_model is None:
        raise ValueError(f"{model.path.name} is not an ONNX model")
    proto = onnx.ModelProto()
    proto.CopyFrom(model.onnx_model)
    folder = model.metadata.get(EXTERNAL_DATA_DIR_KEY)
    if folder:
        onnx.load_external_data_for_model(proto, folder)
    return proto


# -- tensors, checked before use -----------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    """A constant tensor whose description has been checked against the bytes it points at."""

    tensor: TensorProto
    dtype: np.dtype
    shape: tuple[int, ...]
    count: int
    #: The external file, resolved inside the model's folder, with the tensor's byte offset.
    external: tuple[Path, int] | None = None


#: One step from a graph into a subgraph: (node index, attribute name, index in a GRAPHS list).
GraphStep = tuple[int, str, int]


@dataclass(frozen=True)
class WeightSite:
    """Where a constant tensor sits in a ModelProto, so a copy of the proto can be edited at
    the same place: the subgraph path from the main graph, then an initializer or a
    Constant node of that graph."""

    #: The value name inside its own graph (what the graph's nodes refer to).
    name: str
    graph_path: tuple[GraphStep, ...]
    #: Index in the graph's initializers, or None for a Constant node.
    initializer: int | None
    #: Index of the Constant node in the graph's nodes, or None for an initializer.
    node: int | None
    #: "If_0.then_branch/Loop_3.body": the subgraph path in words ("" for the main graph).
    label: str
    tensor: TensorProto


#: Operators whose attributes hold subgraphs. Nodes of other standard operators are not
#: searched (reading every node's attributes costs seconds over 200k-node graphs); custom
#: domains are, since their operators may hold graphs too.
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def _subgraphs(node: onnx.NodeProto, index: int) -> list[tuple[GraphStep, str, onnx.GraphProto]]:
    """The graphs a node holds, each with its step and its label part."""
    if node.op_type not in _SUBGRAPH_OPS and node.domain in ("", "ai.onnx"):
        return []
    found = []
    own = node.name or f"{node.op_type}_{index}"
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            found.append(((index, attribute.name, -1), f"{own}.{attribute.name}", attribute.g))
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            for position, graph in enumerate(attribute.graphs):
                found.append(((index, attribute.name, position),
                              f"{own}.{attribute.name}[{position}]", graph))
    return found


def graph_at(proto: onnx.ModelProto, graph_path: tuple[GraphStep, ...]) -> onnx.GraphProto:
    """The (sub)graph `graph_path` leads to, in `proto` or in any copy of it."""
    graph = proto.graph
    for node_index, attribute_name, position in graph_path:
        attribute = next(a for a in graph.node[node_index].attribute if a.name == attribute_name)
        graph = attribute.g if position < 0 else attribute.graphs[position]
    return graph


def tensor_at(proto: onnx.ModelProto, site: WeightSite) -> TensorProto:
    """The tensor `site` describes, in `proto` (which may be a copy of the one it came from)."""
    graph = graph_at(proto, site.graph_path)
    if site.initializer is not None:
        return graph.initializer[site.initializer]
    node = graph.node[site.node]  # type: ignore[index]
    return next(a.t for a in node.attribute if a.name == "value")


def weight_sites(proto: onnx.ModelProto) -> dict[str, WeightSite]:
    """Every constant tensor of the model under a unique key: initializers and Constant-node
    values of the main graph and of every subgraph (If branches, Loop and Scan bodies, to any
    depth).

    A tensor's key is its value name; a subgraph tensor whose name is taken elsewhere (two
    If branches often both hold ``Constant_0``) is keyed ``<subgraph path>/<name>``. The keys
    depend only on the graph's structure, so a copy of the proto gives the same keys.
    """
    return _walk(proto)[0]


def _walk(proto: onnx.ModelProto
          ) -> tuple[dict[str, WeightSite], list[tuple[str, TensorProto]]]:
    """:func:`weight_sites`, and the other attribute tensors that point at external data
    (ConstantOfShape's value, tensor lists): onnx's loader would follow those too."""
    found: list[WeightSite] = []
    others: list[tuple[str, TensorProto]] = []

    def visit(graph: onnx.GraphProto, graph_path: tuple[GraphStep, ...], label: str) -> None:
        for index, tensor in enumerate(graph.initializer):
            found.append(WeightSite(tensor.name, graph_path, index, None, label, tensor))
        for index, node in enumerate(graph.node):
            constant = node.op_type == "Constant" and node.domain in ("", "ai.onnx")
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    if constant and attribute.name == "value" and node.output:
                        found.append(WeightSite(node.output[0], graph_path, None, index, label,
                                                attribute.t))
                    elif _is_external(attribute.t):
                        others.append((node.name or node.op_type, attribute.t))
                elif attribute.type == onnx.AttributeProto.TENSORS:
                    others.extend((node.name or node.op_type, tensor)
                                  for tensor in attribute.tensors if _is_external(tensor))
            for step, part, subgraph in _subgraphs(node, index):
                visit(subgraph, (*graph_path, step), f"{label}/{part}" if label else part)

    visit(proto.graph, (), "")
    counts: dict[str, int] = {}
    for site in found:
        counts[site.name] = counts.get(site.name, 0) + 1
    sites: dict[str, WeightSite] = {}
    for site in found:
        key = site.name
        if key in sites or (site.graph_path and counts[key] > 1):
            key = f"{site.label}/{site.name}" if site.label else site.name
        base, suffix = key, 2
        while key in sites:  # a malformed graph naming two tensors alike in one scope
            key, suffix = f"{base}#{suffix}", suffix + 1
        sites[key] = site
    return sites, others


def _check_other_external(path: Path, others: list[tuple[str, TensorProto]]) -> None:
    """Attribute tensors that are not weights may point at external data too, and onnx's
    loader would follow them: their files are checked like the weights' ones."""
    files: dict[Path, int] = {}
    for where, tensor in others:
        _checked(path, where, tensor, files)


def _checked_sources(path: Path, constants: dict[str, TensorProto],
                     notes: list[str]) -> dict[str, _Source]:
    """The numeric constants, each checked (:func:`_checked`); text and complex constants
    (label tables, tokenizer vocabularies) cannot be weights and are left out with a note."""
    files: dict[Path, int] = {}
    sources: dict[str, _Source] = {}
    skipped: list[str] = []
    for name, tensor in constants.items():
        source = _checked(path, name, tensor, files)
        if source is None:
            skipped.append(name)
        else:
            sources[name] = source
    if skipped:
        more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
        notes.append(f"constant {quote(skipped[0])}{more} holds text or complex numbers, not "
                     "weights; left out")
    return sources


def _checked(path: Path, name: str, tensor: TensorProto,
             files: dict[Path, int]) -> _Source | None:
    """`tensor` once its type, shape and data agree with each other and with the file(s);
    None for a non-numeric tensor. `files` caches external files' sizes by resolved path."""
    dtype = _element_dtype(tensor.data_type)
    if dtype is None:
        raise FormatError(f"{_where(path, name)}: element type {tensor.data_type} is not one "
                          "ONNX defines")
    if dtype.kind in "OSUc":
        return None
    shape = tuple(tensor.dims)
    count = math.prod(shape)
    if count > MAX_ELEMENTS or any(dim < 0 for dim in shape):  # guard words the refusal
        element_count(_where(path, name), shape)
    stored = _stored_bytes(tensor.data_type, count, dtype)
    if _is_external(tensor):
        file, offset = _external_span(path, _where(path, name), tensor, stored, files)
        return _Source(tensor, dtype, shape, count, (file, offset))
    if tensor.HasField("raw_data"):
        have = len(tensor.raw_data)
        if have != stored:
            raise FormatError(f"{_where(path, name)}: shape {quote(list(shape))} of {dtype.name} "
                              f"needs {stored} bytes but {have} are stored")
    else:
        field = helper.tensor_dtype_to_field(tensor.data_type)
        have, needed = len(getattr(tensor, field)), _typed_entries(tensor.data_type, count)
        if have != needed:
            raise FormatError(f"{_where(path, name)}: shape {quote(list(shape))} needs {needed} "
                              f"values but {have} are stored")
    return _Source(tensor, dtype, shape, count)


def _where(path: Path, name: str) -> str:
    return f"{quote(path.name)}: tensor {quote(name)}"


@functools.lru_cache(maxsize=None)
def _element_dtype(data_type: int) -> np.dtype | None:
    """numpy's dtype for an ONNX element type: checked numeric by guard, except text and
    complex (returned, for the caller to leave out); None for a type ONNX does not define."""
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, TypeError, ValueError):
        return None
    if dtype.kind not in "OSUc":
        numeric_dtype(f"element type {data_type}", dtype)
    return dtype


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype: np.dtype) -> str:
    return dtype.name  # numpy works the name out anew each time: slow over 200k tensors


def _stored_bytes(data_type: int, count: int, dtype: np.dtype) -> int:
    bits = _PACKED_BITS.get(data_type)
    return -(-count * bits // 8) if bits else count * dtype.itemsize


def _typed_entries(data_type: int, count: int) -> int:
    """Entries in the typed field (int32_data, float_data...): 4- and 2-bit types pack a
    byte's worth per entry; everything else has one entry per element."""
    bits = _PACKED_BITS.get(data_type)
    return -(-count * bits // 8) if bits in (2, 4) else count


def _external_span(path: Path, where: str, tensor: TensorProto, stored: int,
                   files: dict[Path, int]) -> tuple[Path, int]:
    """The external file and offset, after checking the file lies in the model's folder (no
    absolute paths, no '..', no symlink out) and the bytes lie inside it."""
    info = _external_info(tensor)
    location = info.get("location", "")
    file = inside_folder(path.parent, location, where)
    if file not in files:
        if not file.exists():
            raise FormatError(f"{quote(path.name)}: its weights are stored in an external file "
                              f"{quote(location)} that is missing from the model's folder")
        try:
            files[file] = regular_file(file).st_size
        except FormatError as exc:
            raise FormatError(f"{where}: external data {exc}") from None
    offset = _external_number(where, info, "offset", 0)
    length = _external_number(where, info, "length", stored)
    span_inside(where, offset, length, files[file])
    if length != stored:
        raise FormatError(f"{where}: shape {quote(list(tensor.dims))} needs {stored} bytes but "
                          f"its external data is {length} bytes long")
    return file, offset


def _external_number(where: str, info: dict[str, str], key: str, default: int) -> int:
    if key not in info:
        return default
    text = info[key]
    if len(text) > 20 or not text.strip().lstrip("-").isdigit():
        raise FormatError(f"{where}: external data {key} {quote(text)} is not an integer")
    return int(text)


def _external_info(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _read(source: _Source, maps: dict[Path, np.ndarray], folder: Path) -> np.ndarray:
    """A zero-copy (memory-mapped or buffer-view) array where the storage allows it.

    Each external file is memory-mapped once, on the first read of any of its tensors.
    """
    tensor, dtype, shape, count = source.tensor, source.dtype, source.shape, source.count
    if tensor.data_type in _INDIRECT_TYPES:  # packed sub-byte types: onnx unpacks them
        array = numpy_helper.to_array(tensor, str(folder))  # (external paths checked above)
    elif source.external is not None:
        file, offset = source.external
        if count == 0:
            return np.zeros(shape, dtype)
        if file not in maps:  # an np.memmap, which callers may recognise as such
            maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        array = maps[file][offset:offset + count * dtype.itemsize].view(dtype).reshape(shape)
    elif tensor.HasField("raw_data"):
        array = np.frombuffer(tensor.raw_data, dtype=dtype, count=count).reshape(shape)
    else:
        array = numpy_helper.to_array(tensor)
    # bfloat16 / float8 / int4 come as ml_dtypes types most numpy code cannot use.
    return array.astype(np.float32) if array.dtype.kind == "V" else array


def _tensor_store(sources: dict[str, _Source], folder: Path,
                  decoders: dict[str, Dequantization] | None = None) -> OnnxTensorStore:
    maps: dict[Path, np.ndarray] = {}

    def read(name: str) -> np.ndarray:
        return _read(sources[name], maps, folder)

    return OnnxTensorStore(
        read,
        shapes={name: source.shape for name, source in sources.items()},
        dtypes={name: _dtype_name(source.dtype) for name, source in sources.items()},
        # Packed 4-bit types report one byte per element: numpy has no half-byte itemsize.
        itemsizes={name: max(source.dtype.itemsize, 1) for name, source in sources.items()},
        decoders=decoders,
    )


# -- quantized weights ----------------------------------------------------------------------
#: Operators that turn integer codes into the float weight they compute with:
#: op type -> (codes, scale, zero point) input indices, and the scale's axis when the node
#: has no ``axis`` attribute (QLinearConv scales per output channel, QLinearMatMul per column).
_CODE_INPUTS: dict[str, tuple[int, int, int, int]] = {
    "DequantizeLinear": (0, 1, 2, 1),
    "QLinearConv": (3, 4, 5, 0),
    "QLinearMatMul": (3, 4, 5, -1),
}
#: The suffix ONNX Runtime's quantizer gives the codes of a weight (``conv.weight_quantized``).
_QUANTIZED_SUFFIX = "_quantized"


@dataclass(frozen=True)
class Dequantization:
    """How a weight stored as integer codes becomes the float weight the graph computes with:
    ``(codes - zero_point) * scale``, the scale per tensor, per slice along `axis`, or per block
    of `block_size` along it (DequantizeLinear's three modes)."""

    #: Weight keys of the scale and of the zero point (None: zero).
    scale: str
    zero_point: str | None
    #: The axis a scale with several values runs along (may be negative).
    axis: int
    block_size: int = 0
    #: The float weight's own name where the graph gives it one: the output of the Mul in
    #: ``Mul(Cast(codes), scale)``, which keeps the name of the weight it replaced.
    decoded_name: str = ""

    def _spread(self, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A scale or zero point broadcastable against codes of `shape`."""
        values = np.asarray(values)
        if values.size == 1:
            return values.reshape(())
        axis = self.axis % len(shape)
        if self.block_size:
            return np.repeat(values, self.block_size, axis=axis)[
                (slice(None),) * axis + (slice(0, shape[axis]),)]
        if values.size != shape[axis]:
            raise FormatError(f"a quantized weight of shape {list(shape)} has {values.size} "
                              f"scales for axis {axis}")
        return values.reshape([-1 if index == axis else 1 for index in range(len(shape))])

    def decode(self, codes: np.ndarray, scale: np.ndarray,
               zero_point: np.ndarray | None) -> np.ndarray:
        """The float weight: codes less the zero point, times the scale (float32)."""
        shifted = codes.astype(np.float32)
        if zero_point is not None:
            shifted = shifted - self._spread(zero_point, codes.shape).astype(np.float32)
        return (shifted * self._spread(scale, codes.shape).astype(np.float32)).astype(np.float32)

    def encode(self, weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
               dtype: np.dtype) -> np.ndarray:
        """Codes of `dtype` that decode to `weight` as nearly as the scale allows; an exact zero
        stays exactly zero (its code is the zero point)."""
        scaled = np.asarray(weight, np.float64) / self._spread(scale, weight.shape).astype(np.float64)
        if zero_point is not None:
            scaled = scaled + self._spread(zero_point, weight.shape).astype(np.float64)
        limits = np.iinfo(dtype)
        return np.clip(np.rint(scaled), limits.min, limits.max).astype(dtype)


class OnnxTensorStore(TensorStore):
    """The graph's constants; integer codes a DequantizeLinear or QLinear node decodes are handed
    out as the float weight the graph computes with, so statistics, histograms and sensitivity
    see real weight values. :meth:`stored` gives the codes as the file holds them; the store's
    `dtypes` and `itemsizes` stay the stored ones, so sizes are the file's."""

    def __init__(self, read: Callable[[str], np.ndarray], shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, str], itemsizes: dict[str, int],
                 decoders: dict[str, Dequantization] | None = None) -> None:
        self._stored = read
        #: Weight key of integer codes -> how they decode.
        self.decoders = dict(decoders or {})
        super().__init__(self._decoded, shapes, dtypes, itemsizes)

    def stored(self, key: str) -> np.ndarray:
        """The tensor exactly as the file stores it (a quantized weight's integer codes)."""
        if key not in self.shapes:
            raise KeyError(key)
        return self._stored(key)

    def _decoded(self, key: str) -> np.ndarray:
        codes = self._stored(key)
        decoder = self.decoders.get(key)
        if decoder is None:
            return codes
        zero_point = self._stored(decoder.zero_point) if decoder.zero_point else None
        return decoder.decode(codes, self._stored(decoder.scale), zero_point)


def dequantizations(proto: onnx.ModelProto) -> dict[str, Dequantization]:
    """Weight key (as :func:`weight_sites` keys it) of every integer weight the graph decodes
    with a constant float scale -> how; what the loader and the ONNX backend both go by."""
    sites = weight_sites(proto)
    kinds: dict[str, str] = {}
    for key, site in sites.items():
        try:
            kinds[key] = np.dtype(helper.tensor_dtype_to_np_dtype(site.tensor.data_type)).kind
        except (KeyError, TypeError, ValueError):
            continue
    found = _dequantizations(proto.graph, sites)
    return {key: decoder for key, decoder in found.items()
            if kinds.get(key) in ("i", "u") and kinds.get(decoder.scale) == "f"
            and (decoder.zero_point is None or kinds.get(decoder.zero_point) in ("i", "u"))}


def _decodable(found: dict[str, Dequantization], sources: dict[str, _Source]
               ) -> dict[str, Dequantization]:
    """The decoders whose codes are integers and whose scale is a float constant we can read."""
    def kind(key: str | None) -> str:
        return sources[key].dtype.kind if key in sources else ""

    return {key: decoder for key, decoder in found.items()
            if kind(key) in ("i", "u") and kind(decoder.scale) == "f"
            and (decoder.zero_point is None or kind(decoder.zero_point) in ("i", "u"))}


def _dequantizations(graph: onnx.GraphProto, sites: dict[str, WeightSite]
                     ) -> dict[str, Dequantization]:
    """Every constant fed as codes to a DequantizeLinear / QLinearConv / QLinearMatMul together
    with a constant scale, in the main graph and its subgraphs (first use wins); and every
    constant decoded as ``Mul(Cast(codes), scale)``, the form Slimscope's own int8 files use
    (engine.methods.static_int8.weights_int8_everywhere: ONNX Runtime folds it at load), with
    no zero point and the scale along its one dimension that is not 1."""
    by_graph: dict[tuple[GraphStep, ...], dict[str, str]] = {}
    for key, site in sites.items():
        by_graph.setdefault(site.graph_path, {})[site.name] = key
    found: dict[str, Dequantization] = {}

    def visit(graph: onnx.GraphProto, graph_path: tuple[GraphStep, ...],
              outer: dict[str, str], outer_casts: dict[str, str]) -> None:
        scope = dict(outer)
        scope.update(by_graph.get(graph_path, {}))
        # value name -> weight key, for Casts of constants (codes on their way to a Mul)
        casts = dict(outer_casts)
        for index, node in enumerate(graph.node):
            op_type = node.op_type
            spot = _CODE_INPUTS.get(op_type)
            if spot is not None:
                codes, scale, zero, default_axis = spot
                inputs = node.input
                if len(inputs) > scale and inputs[codes] in scope and inputs[scale] in scope:
                    zero_key = (scope.get(inputs[zero])
                                if len(inputs) > zero and inputs[zero] else None)
                    attributes = {a.name: a.i for a in node.attribute
                                  if a.type == onnx.AttributeProto.INT}
                    found.setdefault(scope[inputs[codes]], Dequantization(
                        scope[inputs[scale]], zero_key,
                        int(attributes.get("axis", default_axis)),
                        max(0, int(attributes.get("block_size", 0)))))
            elif op_type == "Cast" and node.input and node.output and node.input[0] in scope:
                casts[node.output[0]] = scope[node.input[0]]
            elif op_type == "Mul" and len(node.input) == 2 and node.output:
                decoded = _cast_times_scale(node, casts, scope, sites)
                if decoded is not None:
                    found.setdefault(decoded[0], decoded[1])
            for step, _, subgraph in _subgraphs(node, index):
                visit(subgraph, (*graph_path, step), scope, casts)

    visit(graph, (), {}, {})
    return found


def _cast_times_scale(node: onnx.NodeProto, casts: dict[str, str], scope: dict[str, str],
                      sites: dict[str, WeightSite]) -> tuple[str, Dequantization] | None:
    """(codes key, how they decode) for a Mul of a Cast constant and a constant scale that
    broadcasts along at most one axis of the codes; None for any other Mul."""
    for codes_slot in (0, 1):
        codes_name, scale_name = node.input[codes_slot], node.input[1 - codes_slot]
        if codes_name not in casts or scale_name not in scope:
            continue
        codes_dims = tuple(sites[casts[codes_name]].tensor.dims)
        scale_dims = tuple(sites[scope[scale_name]].tensor.dims)
        wide = [index for index, size in enumerate(scale_dims) if size != 1]
        if len(scale_dims) > len(codes_dims) or len(wide) > 1:
            return None
        # right-aligned, as Mul broadcasts: a negative axis fits codes of any rank
        axis = wide[0] - len(scale_dims) if wide else 0
        if wide and scale_dims[wide[0]] != codes_dims[axis]:
            return None
        return casts[codes_name], Dequantization(scope[scale_name], None, axis,
                                                 decoded_name=node.output[0])
    return None


# -- layers -------------------------------------------------------------------------------
#: A layer's use by one node: the node, and whether the weight is its first input (MatMul).
Use = tuple[onnx.NodeProto, bool]


def _layers(graph: onnx.GraphProto, store: TensorStore, sites: dict[str, WeightSite]
            ) -> tuple[list[Layer], dict[str, list[Use]]]:
    """One layer per weight tensor, in order of first use; `uses` lists the nodes per layer.

    Subgraphs are searched too, and their nodes see the values of every enclosing graph (an
    If branch's Conv may use an initializer of the main graph).
    """
    decoders = store.decoders if isinstance(store, OnnxTensorStore) else {}
    by_graph: dict[tuple[GraphStep, ...], dict[str, str]] = {}
    for key, site in sites.items():
        if key in store:
            by_graph.setdefault(site.graph_path, {})[site.name] = key

    def visit(graph: onnx.GraphProto, graph_path: tuple[GraphStep, ...],
              outer: dict[str, str]) -> None:
        # value name -> weight key, for names that are weights or decoded weights here.
        scope = dict(outer)
        scope.update(by_graph.get(graph_path, {}))
        # One pass over the (possibly 200k) nodes, which protobuf makes slow to walk.
        candidates: list[onnx.NodeProto] = []
        nested: list[tuple[GraphStep, onnx.GraphProto]] = []
        for index, node in enumerate(graph.node):
            op_type = node.op_type
            if op_type in _LAYER_OPS:
                candidates.append(node)
            elif op_type in _DECODERS and node.input and node.output and node.input[0] in scope:
                scope[node.output[0]] = scope[node.input[0]]
                if node.input[0] in reshaped:
                    reshaped.add(node.output[0])
            elif op_type == "Mul" and len(node.input) == 2 and node.output:
                weight = _decoded_by_mul(node, scope, decoders)
                if weight is not None:
                    scope[node.output[0]] = weight
            elif op_type in _RESHAPERS and node.output:
                weight = _rearranged_weight(node, scope)
                if weight is not None:
                    scope[node.output[0]] = weight
                    reshaped.add(node.output[0])
            elif op_type in _SUBGRAPH_OPS or node.domain not in ("", "ai.onnx"):
                nested.extend((step, subgraph) for step, _, subgraph in _subgraphs(node, index))
        for node in candidates:
            add_use(node, scope)
        for step, subgraph in nested:
            visit(subgraph, (*graph_path, step), scope)

    def add_use(node: onnx.NodeProto, scope: dict[str, str]) -> None:
        kind, weight_indices, bias_index = _LAYER_OPS[node.op_type]
        inputs = node.input
        index = next((i for i in weight_indices if i < len(inputs) and inputs[i] in scope), None)
        if index is None or not _plausible_weight(node.op_type, store, scope[inputs[index]],
                                                  inputs[index] in reshaped):
            return
        bias = (scope.get(inputs[bias_index])
                if bias_index is not None and bias_index < len(inputs) else None)
        recurrent = node.op_type in _SECOND_WEIGHTS
        add_layer(node, scope[inputs[index]], kind, bias, index == 0,
                  _FIRST_WEIGHT_SUFFIX if recurrent else "")
        second = _SECOND_WEIGHTS.get(node.op_type)
        if second is not None and second[0] < len(inputs) and inputs[second[0]] in scope:
            add_layer(node, scope[inputs[second[0]]], kind, None, False, second[1])

    def add_layer(node: onnx.NodeProto, weight: str, kind: str, bias: str | None,
                  weight_first: bool, suffix_name: str) -> None:
        if weight not in found:
            source = sites[weight].name
            if weight in decoders:  # the float weight's name, not its codes' (`..._quantized`)
                source = (decoders[weight].decoded_name
                          or source.removesuffix(_QUANTIZED_SUFFIX) or source)
            name = _layer_name(source, node)
            if suffix_name and _GENERATED_NAME.match(sites[weight].name):
                name = f"{name}.{suffix_name}"  # named after the node: tell W and R apart
            found[weight] = (name, kind, bias)
            uses_of[weight] = []
        uses_of[weight].append((node, weight_first))

    found: dict[str, tuple[str, str, str | None]] = {}
    uses_of: dict[str, list[Use]] = {}
    #: Value names (in any graph) that hold a weight in another shape than the stored one.
    reshaped: set[str] = set()
    visit(graph, (), {})
    layers: list[Layer] = []
    uses: dict[str, list[Use]] = {}
    for weight, name in _unique_names(found, sites).items():
        _, kind, bias = found[weight]
        layers.append(layer_from_store(name, kind, store, weight, bias))
        uses[name] = uses_of[weight]
    mark_shared(layers, lambda key: key)
    return layers, uses


def _unique_names(found: dict[str, tuple[str, str, str | None]],
                  sites: dict[str, WeightSite]) -> dict[str, str]:
    """Weight key -> layer name, one name each. Subgraph layers whose names clash (the two
    branches of an If holding the same model at two sample rates) are all prefixed with their
    subgraph path, so neither branch gets the bare name by the accident of order; any other
    clash falls back to the weight key."""
    counts: dict[str, int] = {}
    for name, _, _ in found.values():
        counts[name] = counts.get(name, 0) + 1
    names: dict[str, str] = {}
    taken: set[str] = set()
    for weight, (name, _, _) in found.items():
        label = sites[weight].label
        if counts[name] > 1 and label:
            name = f"{label}/{name}"
        if name in taken:
            name = weight
        base, suffix = name, 2
        while name in taken:  # a weight named like another layer: still one name each
            name, suffix = f"{base}#{suffix}", suffix + 1
        taken.add(name)
        names[weight] = name
    return names


#: The prefix ONNX's inliner (and spox) give values of an inlined function or If branch:
#: ``If_0_then_branch__Inline_0__encoder.0.weight``, ``F0::If_0_then_branch__Inline_0__...``.
_INLINED_PREFIX = re.compile(r"^.*__Inline_\d+__(?=.)")


#: Weight names exporters generate rather than take from the model's code: torch's legacy
#: ``onnx::MatMul_704``, dynamo's ``val_16``, bare numbers, and ``_``-prefixed temporaries.
_GENERATED_NAME = re.compile(r"onnx::|_|val_\d+$|\d+$")
#: Longest dynamo name-scope list read from a node's metadata (a hostile file may hold more).
_NAME_SCOPES_LIMIT = 4096


def _layer_name(weight: str, node: onnx.NodeProto) -> str:
    """A readable layer name: the weight's own name (less an inliner's prefix), or the module
    path of the node using it when the exporter gave the weight a generated name
    (``onnx::MatMul_704``, ``val_16``).

    torch's legacy exporter names nodes ``/layers.0/q/MatMul``, the module path's parts with
    the op at the end (a list's child repeats the list's name: ``/features/features.0/Conv``);
    the dynamo exporter records the module scopes in the node's metadata instead.
    """
    if not _GENERATED_NAME.match(weight):
        readable = _INLINED_PREFIX.sub("", weight)
        return readable.removesuffix(".weight") or readable
    return _module_path(node) or node.name or weight


def _module_path(node: onnx.NodeProto) -> str | None:
    """``layers.0.q`` for a node of that module, from the node's name or its metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes" and len(prop.value) < _NAME_SCOPES_LIMIT:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                break
            if (isinstance(scopes, list) and len(scopes) >= 2
                    and all(isinstance(scope, str) for scope in scopes) and scopes[-2]):
                return scopes[-2]  # the last entry is the operation, the one before its module
    parts = [part for part in node.name.split("/") if part]
    if len(parts) < 2:
        return None
    path: list[str] = []
    for part in parts[:-1]:
        if path and part.startswith(path[-1] + "."):
            path[-1] = part  # "features", "features.0": the child of a list or Sequential
        else:
            path.append(part)
    return ".".join(path)


def _decoded_by_mul(node: onnx.NodeProto, scope: dict[str, str],
                    decoders: dict[str, Dequantization]) -> str | None:
    """The codes' weight key when `node` is the Mul of ``Mul(Cast(codes), scale)`` that
    decodes them (see :func:`_cast_times_scale`), else None. The Cast's output already maps
    to the codes' key (Cast is a decoder); the Mul's other input must be their scale."""
    for slot in (0, 1):
        key = scope.get(node.input[slot])
        decoder = decoders.get(key) if key is not None else None
        if (decoder is not None and decoder.decoded_name == node.output[0]
                and scope.get(node.input[1 - slot]) == decoder.scale):
            return key
    return None


def _rearranged_weight(node: onnx.NodeProto, scope: dict[str, str]) -> str | None:
    """The weight key a :data:`_RESHAPERS` node's output rearranges, or None: its data input
    (every input, for Concat, all the one weight) is a weight and its other inputs constants."""
    if not node.input or node.input[0] not in scope or node.domain not in ("", "ai.onnx"):
        return None  # (most reshaping nodes reshape activations: answered at once)
    inputs = [name for name in node.input if name]
    if node.op_type == "Concat":
        keys = {scope.get(name) for name in inputs}
        return keys.pop() if len(keys) == 1 and None not in keys else None
    if any(name not in scope for name in inputs[1:]):
        return None  # a shape, axes or bounds computed at run time
    return scope[inputs[0]]


def _plausible_weight(op_type: str, store: TensorStore, key: str, reshaped: bool = False) -> bool:
    """Gather only looks up embeddings in 2-D float tables (or int8 codes of one); matrix
    products need 2-D or more, which a weight reached through a reshaping node may be only
    after it (a 1-D store)."""
    rank = len(store.shapes[key])
    if op_type == "Gather":  # a table stored as int8 codes decodes to floats
        decoded = isinstance(store, OnnxTensorStore) and key in store.decoders
        return not reshaped and rank == 2 and (
            decoded or store.dtypes[key].startswith(("float", "bfloat")))
    if op_type in ("MatMul", "Gemm"):
        return rank >= (1 if reshaped else 2)
    return rank >= 1


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    shape = tuple(
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
        for dim in tensor_type.shape.dim
    )
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    except (KeyError, TypeError, ValueError):  # 0 (undefined) or a type this onnx lacks
        dtype = "unknown"
    return TensorSpec(value.name, shape, dtype)


# -- MACs ---------------------------------------------------------------------------------
def _fill_macs(proto: onnx.ModelProto, layers: list[Layer], uses: dict[str, list[Use]],
               store: TensorStore, inputs: list[TensorSpec], input_shape: tuple[int, ...] | None,
               notes: list[str]) -> None:
    """Layer MACs from shapes that ONNX shape inference derives from static input shapes.

    A dynamic leading (batch) dimension counts as 1, so MACs are per sample as usually quoted;
    other dynamic dimensions need `input_shape`.
    """
    overrides: dict[str, tuple[int, ...]] = {}
    if input_shape is not None and len(inputs) == 1:
        overrides[inputs[0].name] = tuple(input_shape)
    for spec in inputs:
        if spec.is_static or spec.name in overrides:
            continue
        if not spec.shape or not TensorSpec(spec.name, spec.shape[1:]).is_static:
            return
        overrides[spec.name] = (1, *spec.shape[1:])
        notes.append(f"MACs are for one sample: input {spec.name!r} has a dynamic batch size")
    if len(proto.graph.node) > SHAPE_INFERENCE_NODE_BUDGET:
        notes.append(f"MACs not counted: the graph has {len(proto.graph.node)} nodes, more than "
                     f"the {SHAPE_INFERENCE_NODE_BUDGET} shape inference is run on")
        return
    try:
        shapes = _inferred_shapes(proto, overrides)
    except Exception as exc:  # noqa: BLE001 - inspection goes on without MACs
        notes.append(f"shape inference failed, MACs unknown: {one_line(exc)}")
        return
    shapes.update(store.shapes)
    for layer in layers:
        counts = [_node_macs(node, weight_first, layer, shapes)
                  for node, weight_first in uses[layer.name]]
        if counts and all(count is not None for count in counts):
            layer.macs = sum(counts)


def _node_macs(node: onnx.NodeProto, weight_first: bool, layer: Layer,
               shapes: dict[str, tuple[int, ...]]) -> int | None:
    output = shapes.get(node.output[0])
    op = node.op_type
    weight = _consumed_shape(node, weight_first, layer, shapes)
    if op == "ConvTranspose":
        data = shapes.get(node.input[0])
        return conv_transpose_macs(math.prod(data), weight) if data is not None else None
    if output is None:
        return None
    numel = math.prod(output)
    if op in ("Conv", "Gemm", "MatMul") and len(weight) < 2:
        return None  # a flat weight reshaped in a way inference could not follow
    if op == "Conv":
        return conv_macs(numel, weight)
    if op == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return dense_macs(numel, weight[1] if trans_b else weight[0])
    if op == "MatMul":
        return dense_macs(numel, weight[-1] if weight_first else weight[-2])
    if op == "Gather":
        return 0
    if op in _SECOND_WEIGHTS:
        return None  # recurrent layers: the step count is the sequence length
    return norm_macs(numel)


def _consumed_shape(node: onnx.NodeProto, weight_first: bool, layer: Layer,
                    shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The weight's shape as `node` reads it: the stored shape, unless the weight reaches the
    node reshaped (an Unsqueeze in between) and inference knows the shape it arrives in."""
    index = 0 if node.op_type in ("MatMul", "Gemm") and weight_first else 1
    if index < len(node.input):
        seen = shapes.get(node.input[index])
        if seen is not None and math.prod(seen) == math.prod(layer.shape):
            return seen
    return tuple(layer.shape)


def _inferred_shapes(proto: onnx.ModelProto,
                     overrides: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Static shapes of every value, inferred on a light copy of the graph.

    Large initializers are replaced by shape-only external stubs, so inference neither
    copies the weights nor needs external files; small ones stay, as Reshape reads their values.
    """
    probe = onnx.ModelProto()
    probe.ir_version = proto.ir_version
    probe.opset_import.extend(proto.opset_import)
    probe.functions.extend(proto.functions)
    graph = probe.graph
    graph.node.extend(proto.graph.node)
    graph.output.extend(proto.graph.output)
    for value in proto.graph.input:
        copy = graph.input.add()
        copy.CopyFrom(value)
        if value.name in overrides:
            dims = copy.type.tensor_type.shape.dim
            del dims[:]
            for size in overrides[value.name]:
                dims.add().dim_value = size
    for tensor in proto.graph.initializer:
        if math.prod(tensor.dims) > _STUB_ABOVE_ELEMENTS or _is_external(tensor):
            stub = graph.initializer.add()
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
            stub.data_location = TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="shape-only-stub")
        else:
            graph.initializer.append(tensor)
    inferred = onnx.shape_inference.infer_shapes(probe)
    shapes: dict[str, tuple[int, ...]] = {}

    def collect(graph: onnx.GraphProto) -> None:  # subgraphs' values too (first name wins)
        for value in (*graph.input, *graph.value_info, *graph.output):
            dims = value.type.tensor_type.shape.dim
            if (value.type.HasField("tensor_type") and value.name not in shapes
                    and all(d.HasField("dim_value") for d in dims)):
                shapes[value.name] = tuple(d.dim_value for d in dims)
        for index, node in enumerate(graph.node):
            for _, _, subgraph in _subgraphs(node, index):
                collect(subgraph)

    collect(inferred.graph)
    return shapes

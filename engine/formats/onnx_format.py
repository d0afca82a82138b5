"""ONNX models: the graph as protobuf, weights as initializers, Constant nodes or external files.

The proto is loaded without its external data, so a multi-gigabyte model costs little until a
view asks for a layer: external tensors are then memory-mapped, in-file tensors wrapped with
``np.frombuffer`` over the proto's bytes (no copy beyond protobuf's own). ``Model.onnx_model``
therefore still refers to external files; a consumer that needs the complete proto calls
:func:`proto_with_weights` (ONNX Runtime, given the file path, resolves them itself). Weights a
graph stores in Constant nodes count as weights too.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

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
}
#: Nodes whose output is their first input, decoded: a weight reached through one of these
#: (QDQ graphs put DequantizeLinear between an int8 initializer and its Conv) is still a weight.
_DECODERS = frozenset({"DequantizeLinear", "Cast", "Identity"})
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
    constants = _constant_tensors(graph)
    sources = _checked_sources(path, constants, notes)
    has_external = any(source.external is not None for source in sources.values())
    store = _tensor_store(sources, path.parent)
    layers, uses = _layers(graph, store)
    inputs = [_spec(value) for value in graph.input if value.name not in constants]
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


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """Every named constant tensor: initializers, and the `value` of Constant nodes."""
    sources = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                    sources[node.output[0]] = attribute.t
    return sources


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


def _tensor_store(sources: dict[str, _Source], folder: Path) -> TensorStore:
    maps: dict[Path, np.ndarray] = {}

    def read(name: str) -> np.ndarray:
        return _read(sources[name], maps, folder)

    return TensorStore(
        read,
        shapes={name: source.shape for name, source in sources.items()},
        dtypes={name: _dtype_name(source.dtype) for name, source in sources.items()},
        # Packed 4-bit types report one byte per element: numpy has no half-byte itemsize.
        itemsizes={name: max(source.dtype.itemsize, 1) for name, source in sources.items()},
    )


# -- layers -------------------------------------------------------------------------------
def _layers(graph: onnx.GraphProto,
            store: TensorStore) -> tuple[list[Layer], dict[str, list[onnx.NodeProto]]]:
    """One layer per weight tensor, in order of first use; `uses` lists the nodes per layer."""
    layers: dict[str, Layer] = {}
    names: set[str] = set()
    uses: dict[str, list[onnx.NodeProto]] = {}
    # One pass over the (possibly 200k) nodes, which protobuf makes slow to walk.
    decoded: dict[str, str] = {}
    candidates: list[onnx.NodeProto] = []
    for node in graph.node:
        op_type = node.op_type
        if op_type in _LAYER_OPS:
            candidates.append(node)
        elif op_type in _DECODERS and node.input and node.output and node.input[0] in store:
            decoded[node.output[0]] = node.input[0]
    for node in candidates:
        kind, weight_indices, bias_index = _LAYER_OPS[node.op_type]
        inputs = [decoded.get(name, name) for name in node.input]
        weight = next((inputs[i] for i in weight_indices
                       if i < len(inputs) and inputs[i] in store), None)
        if weight is None or not _plausible_weight(node.op_type, store, weight):
            continue
        if weight not in layers:
            bias = inputs[bias_index] if bias_index is not None and bias_index < len(
                inputs) else None
            name = _layer_name(weight, node)
            if name in names:
                name = weight
            suffix = 2
            while name in names:  # a weight named like another layer: still one name each
                name, suffix = f"{weight}#{suffix}", suffix + 1
            names.add(name)
            layers[weight] = layer_from_store(name, kind, store, weight,
                                              bias if bias in store else None)
            uses[layers[weight].name] = []
        uses[layers[weight].name].append(node)
    result = list(layers.values())
    mark_shared(result, lambda key: key)
    return result, uses


def _layer_name(weight: str, node: onnx.NodeProto) -> str:
    """A readable layer name: the weight's own name, or the node's module path when the
    exporter gave the weight a generated name (``onnx::Conv_38``, e.g. after folding BatchNorm).

    torch's exporter names nodes ``/features/features.0/Conv``; the last path component before
    the op is the module's dotted name.
    """
    if not weight.startswith("onnx::") and not weight.startswith("_"):
        return weight.removesuffix(".weight") or weight
    parts = [p for p in node.name.split("/") if p]
    if len(parts) >= 2:
        return parts[-2]
    return node.name or weight


def _plausible_weight(op_type: str, store: TensorStore, key: str) -> bool:
    """Gather only looks up embeddings in 2-D float tables; matrix products need 2-D or more."""
    rank = len(store.shapes[key])
    if op_type == "Gather":
        return rank == 2 and store.dtypes[key].startswith(("float", "bfloat"))
    if op_type in ("MatMul", "Gemm"):
        return rank >= 2
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
def _fill_macs(proto: onnx.ModelProto, layers: list[Layer], uses: dict[str, list[onnx.NodeProto]],
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
        counts = [_node_macs(node, layer, shapes) for node in uses[layer.name]]
        if counts and all(count is not None for count in counts):
            layer.macs = sum(counts)


def _node_macs(node: onnx.NodeProto, layer: Layer,
               shapes: dict[str, tuple[int, ...]]) -> int | None:
    output = shapes.get(node.output[0])
    weight = layer.shape
    op = node.op_type
    if op == "ConvTranspose":
        data = shapes.get(node.input[0])
        return conv_transpose_macs(math.prod(data), weight) if data is not None else None
    if output is None:
        return None
    numel = math.prod(output)
    if op == "Conv":
        return conv_macs(numel, weight)
    if op == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return dense_macs(numel, weight[1] if trans_b else weight[0])
    if op == "MatMul":
        weight_first = node.input[0] == layer.weight_key
        return dense_macs(numel, weight[-1] if weight_first else weight[-2])
    if op == "Gather":
        return 0
    return norm_macs(numel)


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
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.HasField("tensor_type") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes

"""ONNX models: the graph as protobuf, weights as initializers, Constant nodes or external files.

The proto is loaded without its external data, so a multi-gigabyte model costs little until a
view asks for a layer: external tensors are then memory-mapped, in-file tensors wrapped with
``np.frombuffer`` over the proto's bytes (no copy beyond protobuf's own). ``Model.onnx_model``
therefore still refers to external files; a consumer that needs the complete proto calls
:func:`proto_with_weights` (ONNX Runtime, given the file path, resolves them itself). Weights a
graph stores in Constant nodes count as weights too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from engine.errors import ModelLoadError, one_line
from engine.formats import LoadOptions
from engine.macs import conv_macs, conv_transpose_macs, dense_macs, norm_macs
from engine.model import Layer, Model, TensorSpec, TensorStore, layer_from_store, mark_shared

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
#: Element types stored packed (two per byte) or as strings: read through onnx's own helper.
_INDIRECT_TYPES = frozenset(
    getattr(TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1", "STRING")
    if hasattr(TensorProto, name)
)
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
    sources = _weight_sources(graph)
    has_external = _check_external_files(path, sources.values())
    store = _tensor_store(sources, path.parent)
    layers, uses = _layers(graph, store)
    inputs = [_spec(value) for value in graph.input if value.name not in sources]
    outputs = [_spec(value) for value in graph.output]
    notes: list[str] = []
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


# -- tensors ------------------------------------------------------------------------------
def _weight_sources(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """Every named constant tensor: initializers, and the `value` of Constant nodes."""
    sources = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                    sources[node.output[0]] = attribute.t
    return sources


def _external_info(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _numpy_dtype(tensor: TensorProto) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))


def _check_external_files(path: Path, tensors: Iterable[TensorProto]) -> bool:
    """Fail now, with the file's name, if external weights are missing or too short."""
    found = False
    for tensor in tensors:
        if not _is_external(tensor):
            continue
        found = True
        info = _external_info(tensor)
        location = info.get("location", "")
        file = path.parent / location
        if not location or not file.is_file():
            raise ModelLoadError(f"{path.name}: its weights are stored in an external file "
                                 f"{location!r} that is missing from {path.parent}")
        end = int(info.get("offset", 0)) + math.prod(tensor.dims) * _numpy_dtype(tensor).itemsize
        if tensor.data_type not in _INDIRECT_TYPES and file.stat().st_size < end:
            raise ModelLoadError(f"{path.name}: the external weight file {location!r} is "
                                 f"truncated (tensor {tensor.name!r} ends past its end)")
    return found


def _reader(tensor: TensorProto, folder: Path) -> Callable[[], np.ndarray]:
    """A zero-copy (memory-mapped or buffer-view) reader where the storage allows it."""
    dtype, shape = _numpy_dtype(tensor), tuple(tensor.dims)
    count = math.prod(shape)
    if tensor.data_type in _INDIRECT_TYPES:
        def read() -> np.ndarray:
            return numpy_helper.to_array(tensor, str(folder))
    elif _is_external(tensor):
        info = _external_info(tensor)
        file, offset = folder / info["location"], int(info.get("offset", 0))

        def read() -> np.ndarray:
            if count == 0:
                return np.zeros(shape, dtype)
            return np.memmap(file, dtype=dtype, mode="r", offset=offset,
                             shape=(count,)).reshape(shape)
    elif tensor.HasField("raw_data"):
        def read() -> np.ndarray:
            return np.frombuffer(tensor.raw_data, dtype=dtype, count=count).reshape(shape)
    else:
        def read() -> np.ndarray:
            return numpy_helper.to_array(tensor)

    def numpy_friendly() -> np.ndarray:
        array = read()
        # bfloat16 / float8 / int4 come as ml_dtypes types most numpy code cannot use.
        return array.astype(np.float32) if array.dtype.kind == "V" else array

    return numpy_friendly


def _tensor_store(sources: dict[str, TensorProto], folder: Path) -> TensorStore:
    return TensorStore(
        getters={name: _reader(tensor, folder) for name, tensor in sources.items()},
        shapes={name: tuple(tensor.dims) for name, tensor in sources.items()},
        dtypes={name: _numpy_dtype(tensor).name for name, tensor in sources.items()},
        # Packed 4-bit types report one byte per element: numpy has no half-byte itemsize.
        itemsizes={name: max(_numpy_dtype(tensor).itemsize, 1) for name, tensor in sources.items()},
    )


# -- layers -------------------------------------------------------------------------------
def _layers(graph: onnx.GraphProto,
            store: TensorStore) -> tuple[list[Layer], dict[str, list[onnx.NodeProto]]]:
    """One layer per weight tensor, in order of first use; `uses` lists the nodes per layer."""
    layers: dict[str, Layer] = {}
    uses: dict[str, list[onnx.NodeProto]] = {}
    decoded = {node.output[0]: node.input[0] for node in graph.node
               if node.op_type in _DECODERS and node.input and node.input[0] in store}
    for node in graph.node:
        if node.op_type not in _LAYER_OPS:
            continue
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
            if any(layer.name == name for layer in layers.values()):
                name = weight
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
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name \
        if tensor_type.elem_type else "unknown"
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

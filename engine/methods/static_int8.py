"""Int8 for ONNX graphs through ONNX Runtime's quantizer: static (calibrated), dynamic, weight-only.

Which int8 format pays off depends on the operators and the CPU, so :func:`quantize_int8_best`
builds the candidates and keeps the one that measures best. Measured with
``tests/benchmarks/int8_latency.py`` (ResNet-18-like net, 3x64x64, ORT 1.32, AMD EPYC with
AVX512-VNNI, one thread; every format is 0.25x the fp32 size):

* ``quantize_dynamic`` turns Conv into ConvInteger: 4-5x *slower* than fp32;
* static QDQ with int8 activations (``QInt8``, ORT's default): 0.8x the fp32 latency;
* static QDQ with uint8 activations and int8 per-channel weights (``QUInt8``/``QInt8``),
  which ORT fuses into QLinearConv: 0.2-0.3x the fp32 latency.

So static quantization here always uses uint8 activations. Dynamic int8 is offered for MatMul
only (transformer-style models), where it measured faster than static QDQ on a small one.

Every function takes and returns an ``onnx.ModelProto`` and never changes its argument.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engine import onnx_tools
from engine.data import NamedInputs, batch_length, pad_samples, spec_sample_axis, take_samples
from engine.errors import SlimscopeError, one_line
from engine.jobs import NEVER_CANCELLED, Cancelled, CancelToken, Progress, no_progress, sub_progress
from engine.model import TensorSpec

log = logging.getLogger(__name__)

#: How activation ranges are set from calibration outputs (see quantize_static_int8).
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")

#: Operators ONNX Runtime's dynamic int8 handles well on CPU; Conv is left out on purpose
#: (ConvInteger is several times slower than fp32 Conv).
DYNAMIC_OPS = ("MatMul",)


# -- preparation ----------------------------------------------------------------------------
def prepare_for_quantization(model: onnx.ModelProto, *, per_channel: bool,
                             pre_process: bool = True,
                             keep_names: Sequence[str] = ()) -> onnx.ModelProto:
    """Weights as initializers, opset >= 13 when per-channel, and ORT's pre-processing.

    ORT's pre-processing (symbolic shape inference + basic graph optimization, e.g. folding
    BatchNorm into Conv) lets it quantize tensors whose shapes it would otherwise not know.
    It is best-effort: if it fails on an unusual graph, quantization goes on without it, which
    is why Constant-node weights are converted here rather than left to its optimizer. It is
    given a file, not a ModelProto: given a proto, ORT moves the weights out to external data
    and its optimizer then fails on them ("Cannot parse data from external tensors", seen on
    the PP-OCR classifier and on MiniLM). Where a fusion renamed a node named in `keep_names`
    (nodes the caller refers to by name), the graph is used without the optimization.
    """
    model = onnx_tools.constants_to_initializers(model)
    if per_channel:
        model = onnx_tools.upgrade_opset(model, 13)
    if not pre_process:
        return model
    from onnxruntime.quantization import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="slimscope-pre-") as folder:
        source, output = Path(folder) / "input.onnx", Path(folder) / "pre.onnx"
        source.write_bytes(model.SerializeToString())
        for skip_symbolic_shape in (False, True):
            try:
                with _quiet_onnxruntime(), _working_folder(Path(folder)):
                    quant_pre_process(str(source), str(output),
                                      skip_symbolic_shape=skip_symbolic_shape)
                optimized = onnx.load(str(output))
            except Exception as error:  # ORT's pre-processing raises anything; it is optional
                log.info("quantization pre-processing failed (symbolic shapes skipped: %s): %s",
                         skip_symbolic_shape, error)
                continue
            if not set(keep_names) <= {node.name for node in optimized.graph.node}:
                return model  # a fusion renamed a node the caller names
            return optimized
    return model


_WORKING_FOLDER_LOCK = threading.Lock()


@contextlib.contextmanager
def _working_folder(folder: Path) -> Iterator[None]:
    """Run with `folder` as the working directory: ONNX Runtime's symbolic shape inference,
    when it gives up, saves ``sym_shape_infer_temp.onnx`` and its weights into the current
    directory, which is the user's, and could overwrite a file of theirs there."""
    with _WORKING_FOLDER_LOCK:
        before = os.getcwd()
        os.chdir(folder)
        try:
            yield
        finally:
            os.chdir(before)


class _BatchReader:
    """Feeds our batches to ORT's calibrator, reporting progress and honouring cancel.

    An ORT CalibrationDataReader by duck typing (its ``__subclasshook__`` accepts any object
    with ``get_next``), so that importing this module does not load onnxruntime.
    """

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]], progress: Progress,
                 cancel: CancelToken) -> None:
        self._feeds = feeds
        self._progress = progress
        self._cancel = cancel
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self._cancel.check()
        if self._next >= len(self._feeds):
            return None
        self._progress(self._next / len(self._feeds),
                       f"calibrating on batch {self._next + 1} of {len(self._feeds)}")
        self._next += 1
        return self._feeds[self._next - 1]

    def __len__(self) -> int:
        return len(self._feeds)


def calibration_feeds(model: onnx.ModelProto,
                      batches: Iterable[onnx_tools.Batch]) -> list[dict[str, np.ndarray]]:
    """The batches as input feeds for `model`, kept in memory so they can be replayed.

    A graph exported for a fixed batch takes no other, so every batch is cut into pieces of
    exactly that many samples, each input along its own sample axis (silero's ``state
    [2, 1, 128]`` holds its batch on axis 1); a short last piece is padded with copies of its
    last sample. The axes are the batch's own where it carries them (engine.data.NamedInputs),
    else the graph's (engine.data.spec_sample_axis): feeds replayed as plain dicts keep them.
    """
    name, dtype = onnx_tools.graph_input(model)
    specs = _input_specs(model)
    graph_axes = _graph_sample_axes(specs)
    sizes = {spec.name: _size_on(spec, graph_axes.get(spec.name)) for spec in specs}
    feeds: list[dict[str, np.ndarray]] = []
    for batch in batches:
        inputs = batch[0] if isinstance(batch, tuple) else batch
        feed = onnx_tools.as_feed(inputs, name, dtype)
        axes = (dict(inputs.axes) if isinstance(inputs, NamedInputs)
                else {key: graph_axes.get(key, 0 if np.ndim(array) else None)
                      for key, array in feed.items()})
        fixed = _fixed_batch(feed, axes, sizes)
        if not fixed:
            feeds.append(feed)
            continue
        named = NamedInputs(feed, axes)
        total = batch_length(named)
        for start in range(0, total, fixed):
            piece = pad_samples(take_samples(named, start, min(start + fixed, total)), fixed)
            feeds.append({key: np.ascontiguousarray(array) for key, array in piece.items()})
    if not feeds:
        raise SlimscopeError("static int8 quantization needs at least one calibration batch")
    return feeds


def _input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The graph's real inputs (initializers are not) with their static sizes (None: dynamic)."""
    weights = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in weights:
            continue
        dims = value.type.tensor_type.shape.dim
        specs.append(TensorSpec(value.name, tuple(
            dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
            for dim in dims)))
    return specs


def _graph_sample_axes(specs: Sequence[TensorSpec]) -> dict[str, int | None]:
    """Each input's sample axis as the graph's shapes tell it (see spec_sample_axis): where
    every input is static, the batch is the first input's first size."""
    shaped = [spec for spec in specs if spec.shape]
    batch = (int(shaped[0].shape[0])  # type: ignore[arg-type]
             if shaped and all(spec.is_static for spec in shaped) else None)
    return {spec.name: spec_sample_axis(spec, batch) for spec in specs}


def _size_on(spec: TensorSpec, axis: int | None) -> int | None:
    """The static size of `spec` on its sample `axis`, or None (dynamic, or no sample axis)."""
    if axis is None or axis >= len(spec.shape):
        return None
    size = spec.shape[axis]
    return size if isinstance(size, int) and size > 0 else None


def _fixed_batch(feed: Mapping[str, np.ndarray], axes: Mapping[str, int | None],
                 sizes: Mapping[str, int | None]) -> int | None:
    """The batch the graph fixes for the fed inputs that have a sample axis, or None when one
    of them takes any batch (or they disagree, which no cut could satisfy)."""
    fixed = {sizes.get(key) for key in feed if axes.get(key) is not None}
    if len(fixed) != 1:
        return None
    size = fixed.pop()
    return size if size else None


class _DropOnnxRuntimeAdvice(logging.Filter):
    """Drops the advice ORT's quantizer logs on the root logger ("consider pre-processing")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """Keep ORT's quantizer prints and root-logger advice out of the user's console.

    Its calibrators print() progress, and it logs on the root logger; we report progress
    ourselves. What it printed goes to our debug log instead.
    """
    printed = io.StringIO()
    advice_filter = _DropOnnxRuntimeAdvice()
    logging.getLogger().addFilter(advice_filter)
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            # its zero-point arithmetic divides by a zero range on constant tensors
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        logging.getLogger().removeFilter(advice_filter)
        if printed.getvalue():
            log.debug("onnxruntime printed: %s", printed.getvalue())


def _with_temp_output(quantize: Callable[[Path], None]) -> onnx.ModelProto:
    """Run an ORT quantizer that writes a file, quietly, and load what it wrote."""
    with tempfile.TemporaryDirectory(prefix="slimscope-quant-") as folder:
        output = Path(folder) / "quantized.onnx"
        with _quiet_onnxruntime():
            quantize(output)
        return onnx.load(output)


def _static_op_types(exclude: Iterable[str] = ()) -> list[str]:
    """Every operator ORT's static quantizer knows, minus `exclude` (ORT's own default set)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - set(exclude))


# -- static int8 ------------------------------------------------------------------------------
def quantize_static_int8(
    fp32_model: onnx.ModelProto,
    calibration_batches: Iterable[onnx_tools.Batch],
    *,
    method: str = "minmax",
    per_channel: bool = True,
    op_types: Sequence[str] | None = None,
    reduce_range: bool = False,
    pre_process: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    excluded_weights_int8: bool = True,
    smoothing: float | None = None,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> onnx.ModelProto:
    """Static int8 (QDQ): int8 weights and uint8 activations with ranges from calibration.

    `smoothing` (SmoothQuant's α) first migrates activation outliers into the MatMul/Gemm
    weights (:func:`engine.methods.smoothquant.smooth_model`, exact in float); the Mul nodes
    it inserts keep float inputs, so the outliers are never rounded to int8.

    `method` picks how activation ranges are set from the calibration outputs: "minmax" (all
    values), "percentile" (clips the top 0.001%) or "entropy" (minimizes KL divergence).
    `op_types` None quantizes every operator ORT supports, which measured fastest for conv nets
    (ORT fuses whole QDQ chains into QLinear kernels). `reduce_range` (7-bit weights) helps
    accuracy on x86 CPUs without VNNI. `pre_process` False skips ORT's symbolic shape inference
    and graph optimization (slow on very large graphs).

    `nodes_to_exclude` names nodes that keep float activations (a plan's ``keep_float``): ORT
    leaves them out, :func:`float_inputs_for` stops them reading int8-rounded inputs, and with
    `excluded_weights_int8` their weights are stored as int8 codes all the same
    (:func:`weight_only_int8`). Where ORT's pre-processing would rename one of them, the graph
    is quantized without it, so the names still apply. The result is checked with
    :func:`onnx_tools.validate`.
    """
    if method not in CALIBRATION_METHODS:
        raise SlimscopeError(f"unknown calibration method {method!r} "
                             f"(choose one of {', '.join(CALIBRATION_METHODS)})")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    progress(0.0, "preparing the graph for quantization")
    excluded = list(nodes_to_exclude)
    if smoothing is not None:
        from engine.methods.smoothquant import smooth_model

        calibration_batches = calibration_feeds(fp32_model, calibration_batches)
        fp32_model, inserted, _ = smooth_model(fp32_model, calibration_batches, smoothing, cancel)
        excluded += inserted
    prepared = prepare_for_quantization(fp32_model, per_channel=per_channel,
                                        pre_process=pre_process, keep_names=excluded)
    feeds = calibration_feeds(prepared, calibration_batches)
    cancel.check()
    reader = _BatchReader(feeds, sub_progress(progress, 0.1, 0.85), cancel)
    calibrate_method = {"minmax": CalibrationMethod.MinMax,
                        "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy}[method]
    with tempfile.TemporaryDirectory(prefix="slimscope-int8-") as folder:
        # given a ModelProto, ORT moves its weights out to external data in place; a file it
        # reads itself leaves ours whole
        source = Path(folder) / "prepared.onnx"
        source.write_bytes(prepared.SerializeToString())
        quantized = _with_temp_output(lambda output: quantize_static(
            str(source),
            output,
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types) if op_types else _static_op_types(),
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,  # int8 activations are not fused on x86: see top
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate_method,
            nodes_to_exclude=excluded,
            # a Relu folded into its Q/DQ pair would vanish from the float path rewired below
            extra_options={"QDQKeepRemovableActivations": True} if excluded else {},
        ))
    if excluded:
        quantized = float_inputs_for(quantized, excluded, prepared)
        if excluded_weights_int8:
            quantized, _ = weight_only_int8(quantized, excluded, per_channel=per_channel)
    cancel.check()
    progress(0.9, "checking the quantized model")
    onnx_tools.validate(quantized)
    progress(1.0, "static int8 done")
    return quantized


#: Operators ORT fuses with the QuantizeLinear on their output into one int8 kernel.
_FUSED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def float_inputs_for(model: onnx.ModelProto, keep_float: Sequence[str],
                     before: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where the `keep_float` nodes read their activations unquantized.

    ORT's ``nodes_to_exclude`` leaves those nodes themselves in float, but a tensor they read
    is still quantized when its producer is (a Relu's output gets a QuantizeLinear ->
    DequantizeLinear pair), so the kept node would see int8 rounding all the same. Each such
    input is wired back to the tensor before the pair; pairs nobody reads any more are dropped.
    Only where that tensor is still made by the operator that made it in `before` (the graph
    given to the quantizer): ORT folds some activations into a pair, and skipping them is safe.
    Nor where it is the output of a quantized weight operator (Conv, MatMul, Gemm not kept
    float): ORT runs Conv as QLinearConv only with the QuantizeLinear on its output, and on the
    PP-OCRv4 recogniser removing those made the file 1.39x slower than fp32 instead of 0.67x.
    The kept node reads that producer's int8 output then, as ORT's own nodes_to_exclude does.
    """
    made_by = {name: node.op_type for node in before.graph.node for name in node.output}
    keep = set(keep_float)
    fused = {name for node in before.graph.node if node.op_type in _FUSED_OPS
             and node.name not in keep for name in node.output}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    producers = {name: node for node in graph.node for name in node.output}
    for node in graph.node:
        if node.name not in keep:
            continue
        for index, name in enumerate(node.input):
            dequantize = producers.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            quantize = producers.get(dequantize.input[0])
            if quantize is None or quantize.op_type != "QuantizeLinear":
                continue
            source = quantize.input[0]
            now = producers[source].op_type if source in producers else None
            if now == made_by.get(source) and source not in fused:  # graph inputs: both None
                node.input[index] = source
    _drop_unread_pairs(graph)
    return result


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of `graph` or of its subgraphs reads, and its outputs."""
    read = {value.name for value in graph.output}
    for node in graph.node:
        read.update(node.input)
        for sub in onnx_tools.subgraphs(node):
            read |= _names_read(sub)
    return read


def _drop_unread_pairs(graph: onnx.GraphProto) -> None:
    """Remove QuantizeLinear/DequantizeLinear nodes whose outputs nothing reads, repeatedly."""
    while True:
        read = _names_read(graph)
        kept = [node for node in graph.node
                if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
                or any(name in read for name in node.output)]
        if len(kept) == len(graph.node):
            return
        graph.ClearField("node")
        graph.node.extend(kept)


# -- weight-only int8 (float activations) ------------------------------------------------------
#: Float constants smaller than this stay float when every weight is made int8 (biases, norms,
#: shape-like tensors: nothing worth saving, and some are read where precision matters).
MIN_INT8_ELEMENTS = 256


def weight_slot(node: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto]
                ) -> tuple[int, int | None] | None:
    """Where `node` reads a constant float weight of rank >= 2, and the axis of its output
    channels there (None: one scale for the whole tensor); None when it reads none. An
    embedding table (Gather on axis 0) has one scale per row: each token's vector."""
    def weight(slot: int) -> onnx.TensorProto | None:
        tensor = initializers.get(node.input[slot]) if len(node.input) > slot else None
        return tensor if (tensor is not None and len(tensor.dims) >= 2
                          and tensor.data_type == onnx.TensorProto.FLOAT) else None

    if node.op_type in ("Conv", "ConvTranspose") and weight(1) is not None:
        return 1, 0 if node.op_type == "Conv" else 1
    if node.op_type == "Gemm" and weight(1) is not None:
        transposed = any(a.name == "transB" and a.i for a in node.attribute)
        return 1, 0 if transposed else 1
    if node.op_type == "MatMul":
        for slot, axis in ((1, 1), (0, 0)):  # X @ W: columns are outputs; W @ X: rows
            tensor = weight(slot)
            if tensor is not None:
                return slot, axis if len(tensor.dims) == 2 else None
    if node.op_type == "Gather" and weight(0) is not None and not any(
            a.name == "axis" and a.i != 0 for a in node.attribute):
        return 0, 0
    return None


def weight_only_int8(model: onnx.ModelProto, node_names: Iterable[str], *,
                     per_channel: bool = True) -> tuple[onnx.ModelProto, list[str]]:
    """A copy where the named nodes read their weights as symmetric int8 codes through a
    DequantizeLinear (their activations stay float), and the names of the nodes changed.

    For nodes whose activations the plan keeps float but whose weights it quantizes: the
    file shrinks as if they were int8 and ORT still runs them in float. A weight read by
    several named nodes is stored once; the float tensor goes when nothing reads it any more.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    taken = ({n for node in graph.node for n in (*node.input, *node.output)}
             | set(initializers) | {value.name for value in graph.input})
    wanted = set(node_names)
    dequantized: dict[str, str] = {}
    added: list[onnx.NodeProto] = []
    changed = []
    for node in graph.node:
        found = weight_slot(node, initializers) if node.name in wanted else None
        if found is None:
            continue
        slot, axis = found
        name = node.input[slot]
        if name not in dequantized:
            dequantized[name] = onnx_tools.unique_name(f"{name}_dequantized", taken)
            tensors, dequantize = _int8_dequantize(
                numpy_helper.to_array(initializers[name]), axis if per_channel else None,
                name, dequantized[name], taken)
            graph.initializer.extend(tensors)
            added.append(dequantize)
        node.input[slot] = dequantized[name]
        changed.append(node.name)
    if added:
        nodes = [*added, *graph.node]  # DequantizeLinear reads initializers only: first is
        graph.ClearField("node")       # topologically sound
        graph.node.extend(nodes)
        onnx_tools.remove_unused_initializers(graph)
    return result, changed


def _int8_dequantize(weight: np.ndarray, axis: int | None, name: str, output: str,
                     taken: set[str]) -> tuple[list[onnx.TensorProto], onnx.NodeProto]:
    """Codes and scale tensors for `weight` and the DequantizeLinear making `output` of them."""
    codes, scale = symmetric_int8(weight, axis)
    codes_name = onnx_tools.unique_name(f"{name}_int8", taken)
    scale_name = onnx_tools.unique_name(f"{name}_scale", taken)
    node = helper.make_node("DequantizeLinear", [codes_name, scale_name], [output],
                            name=onnx_tools.unique_name(f"{name}_DequantizeLinear", taken),
                            **({"axis": axis} if scale.ndim else {}))
    return [numpy_helper.from_array(codes, codes_name),
            numpy_helper.from_array(scale, scale_name)], node


def _int8_decoded_at_load(weight: np.ndarray, axis: int | None, name: str, taken: set[str]
                          ) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Codes and scale tensors for `weight` and the Cast -> Mul that make `name` of them.

    Not a DequantizeLinear: ONNX Runtime keeps those unfolded (to fuse them with quantized
    kernels), so one feeding a float operator dequantizes the weight at every run (Silero VAD
    at batch 1: 1.7x the fp32 latency). Cast and Mul of constants it folds when the session is
    created, so the file is int8 on disk and runs at fp32 speed, with the same values.
    """
    codes, scale = symmetric_int8(weight, axis)
    if axis is not None:
        view = [1] * weight.ndim
        view[axis] = -1
        scale = scale.reshape(view)
    codes_name = onnx_tools.unique_name(f"{name}_int8", taken)
    scale_name = onnx_tools.unique_name(f"{name}_scale", taken)
    widened = onnx_tools.unique_name(f"{name}_int8_float", taken)
    nodes = [helper.make_node("Cast", [codes_name], [widened], to=onnx.TensorProto.FLOAT,
                              name=onnx_tools.unique_name(f"{name}_Cast", taken)),
             helper.make_node("Mul", [widened, scale_name], [name],
                              name=onnx_tools.unique_name(f"{name}_Scale", taken))]
    return [numpy_helper.from_array(codes, codes_name),
            numpy_helper.from_array(scale, scale_name)], nodes


def symmetric_int8(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Codes in [-127, 127] and the float scale (one per index of `axis`, or one)."""
    other = tuple(i for i in range(weight.ndim) if i != axis) if axis is not None else None
    largest = np.abs(weight).max(axis=other) if weight.size else np.zeros(())
    scale = np.where(largest > 0, largest / 127.0, 1.0).astype(np.float32)
    shaped = scale
    if axis is not None:
        view = [1] * weight.ndim
        view[axis] = -1
        shaped = scale.reshape(view)
    codes = np.clip(np.rint(weight / shaped), -127, 127).astype(np.int8)
    return codes, scale


def _channel_axes(graph: onnx.GraphProto, axes: dict[str, int | None]) -> None:
    """For every tensor a weight operator of `graph` or its subgraphs reads as its weight, the
    axis of its output channels (see weight_slot); first reader wins."""
    for node in graph.node:
        slot_axis: tuple[int, int | None] | None = None
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 1:
            slot_axis = (1, 1 if node.op_type == "ConvTranspose" or (
                node.op_type == "Gemm" and not any(a.name == "transB" and a.i
                                                   for a in node.attribute)) else 0)
        elif node.op_type == "MatMul" and len(node.input) > 1:
            slot_axis = (1, -1)
        elif node.op_type == "Gather":
            slot_axis = (0, 0)
        if slot_axis is not None:
            axes.setdefault(node.input[slot_axis[0]], slot_axis[1])
        for sub in onnx_tools.subgraphs(node):
            _channel_axes(sub, axes)


def weights_int8_everywhere(model: onnx.ModelProto, *, per_channel: bool = True,
                            min_elements: int = MIN_INT8_ELEMENTS,
                            skip: Iterable[str] = ()) -> tuple[onnx.ModelProto, int]:
    """A copy where every float32 constant of rank >= 2 and at least `min_elements` values that
    is still float (initializers and Constant nodes, in the main graph and inside If / Loop /
    Scan bodies) is stored as int8 codes and a scale, decoded under the same name by a Cast and
    a Mul that ONNX Runtime folds at load (see _int8_decoded_at_load); and how many were
    converted. Weights in subgraphs are out of reach of ONNX Runtime's
    quantizers, which look at main-graph initializers only, so this is how they shrink.

    Per-channel scales go on the output-channel axis of the operator reading the weight (rows
    where none is known, which is never coarser than one scale). Graph inputs (overridable) and the tensors
    named in `skip` stay as they are.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    taken = onnx_tools.taken_names(result.graph)
    axes: dict[str, int | None] = {}
    _channel_axes(result.graph, axes)
    # the scales of weights already stored as codes stay float: run twice (every candidate of
    # quantize_int8_best is, and the weight-only one is built this way), a [258, 1, 1] scale
    # was itself stored as int8 codes and a scale, larger and no longer foldable as one step
    kept = set(skip) | _scales_of_codes(result.graph, set())
    count = _int8_in_graph(result.graph, axes, per_channel, min_elements, taken, kept)
    return result, count


def _scales_of_codes(graph: onnx.GraphProto, found: set[str],
                     outer_constants: frozenset[str] = frozenset()) -> set[str]:
    """Names of the scales that decode integer codes in `graph` and its subgraphs: a
    DequantizeLinear's scale, and the other input of a Mul reading a Cast of a constant (our
    ``Mul(Cast(codes), scale)``, see _int8_decoded_at_load)."""
    constants = outer_constants | {tensor.name for tensor in graph.initializer} | {
        node.output[0] for node in graph.node if node.op_type == "Constant" and node.output}
    casts = {node.output[0] for node in graph.node
             if node.op_type == "Cast" and node.output and node.input
             and node.input[0] in constants}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 1:
            found.add(node.input[1])
        elif node.op_type == "Mul" and len(node.input) == 2:
            for slot in (0, 1):
                if node.input[slot] in casts:
                    found.add(node.input[1 - slot])
        for sub in onnx_tools.subgraphs(node):
            _scales_of_codes(sub, found, constants)
    return found


def _int8_axis(name: str, weight: np.ndarray, axes: Mapping[str, int | None],
               per_channel: bool) -> int | None:
    if not per_channel:
        return None
    axis = axes.get(name, 0)
    if axis is None:
        return None
    return axis % weight.ndim


def _constant_tensor(node: onnx.NodeProto) -> np.ndarray | None:
    """The tensor of a Constant node's ``value`` attribute (where weights sit), else None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(attribute.t)
    return None


def _int8_in_graph(graph: onnx.GraphProto, axes: Mapping[str, int | None], per_channel: bool,
                   min_elements: int, taken: set[str], skip: set[str]) -> int:
    inputs = {value.name for value in graph.input} | skip

    def wanted(array: np.ndarray | None, name: str) -> bool:
        return (array is not None and array.dtype == np.float32 and array.ndim >= 2
                and array.size >= min_elements and name not in inputs)

    count = 0
    head: list[onnx.NodeProto] = []
    kept_initializers: list[onnx.TensorProto] = []
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor) if tensor.data_type == onnx.TensorProto.FLOAT \
            else None
        if not wanted(array, tensor.name):
            kept_initializers.append(tensor)
            continue
        assert array is not None
        tensors, decode = _int8_decoded_at_load(
            array, _int8_axis(tensor.name, array, axes, per_channel), tensor.name, taken)
        kept_initializers.extend(tensors)
        head.extend(decode)
        count += 1
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for sub in onnx_tools.subgraphs(node):
            count += _int8_in_graph(sub, axes, per_channel, min_elements, taken, skip)
        value = _constant_tensor(node)
        if not wanted(value, node.output[0] if node.output else ""):
            nodes.append(node)
            continue
        assert value is not None
        name = node.output[0]
        tensors, decode = _int8_decoded_at_load(
            value, _int8_axis(name, value, axes, per_channel), name, taken)
        nodes.extend(helper.make_node("Constant", [], [tensor.name], value=tensor,
                                      name=onnx_tools.unique_name(f"{tensor.name}_Constant",
                                                                  taken))
                     for tensor in tensors)
        nodes.extend(decode)
        count += 1
    if head or len(nodes) != len(graph.node):
        graph.ClearField("initializer")
        graph.initializer.extend(kept_initializers)
        graph.ClearField("node")
        graph.node.extend([*head, *nodes])
    return count


# -- dynamic int8 -----------------------------------------------------------------------------
def quantize_dynamic_int8(
    model: onnx.ModelProto,
    *,
    op_types: Sequence[str] | None = DYNAMIC_OPS,
    per_channel: bool = False,
    nodes_to_exclude: Sequence[str] = (),
) -> onnx.ModelProto:
    """Dynamic int8: int8 weights, activations quantized on the fly at each run.

    Suits MatMul-heavy models (transformers) and needs no calibration. Gemm (nn.Linear on 2-D
    input) is rewritten as MatMul first: ORT's quantizer does so itself only when alpha = beta
    = 1. `op_types` None is ORT's own default set, which includes Conv: several times slower
    than fp32 on CPU. `nodes_to_exclude` stay float (a Gemm rewritten as MatMul keeps its
    exclusion).
    """
    from onnxruntime.quantization import quantize_dynamic

    prepared = onnx_tools.gemm_to_matmul(onnx_tools.constants_to_initializers(model))
    # gemm_to_matmul names the MatMul it makes "<gemm name>_MatMul"
    excluded = [*nodes_to_exclude, *(f"{name}_MatMul" for name in nodes_to_exclude)]
    quantized = _with_temp_output(lambda output: quantize_dynamic(
        prepared, output, op_types_to_quantize=list(op_types) if op_types else None,
        per_channel=per_channel, nodes_to_exclude=excluded,
    ))
    onnx_tools.validate(quantized)
    return quantized


# -- choosing the best int8 format --------------------------------------------------------------
@dataclass
class Int8Candidate:
    """One int8 format tried by :func:`quantize_int8_best`, with what was measured."""

    name: str
    description: str
    bytes: int
    size_ratio: float
    median_ms: float
    p90_ms: float
    latency_ratio: float
    #: cosine similarity of its outputs to fp32's over the calibration batches.
    output_cosine: float
    chosen: bool = False
    reason: str = ""


@dataclass
class Int8Report:
    """What :func:`quantize_int8_best` measured, as plain data for the GUI, CLI and logs."""

    fp32_bytes: int
    fp32_median_ms: float
    threads: int
    candidates: list[Int8Candidate] = field(default_factory=list)
    #: Candidates that could not be built, "name: why" each.
    failed: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> Int8Candidate:
        return next(candidate for candidate in self.candidates if candidate.chosen)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _has_constant_matmul(model: onnx.ModelProto) -> bool:
    weights = {tensor.name for tensor in model.graph.initializer}
    return any(node.op_type in ("MatMul", "Gemm") and len(node.input) > 1
               and node.input[1] in weights for node in model.graph.node)


def real_positions(feed: Mapping[str, np.ndarray], output: np.ndarray) -> np.ndarray | None:
    """Which (sample, position) entries of a text model's output are real tokens: the feed's
    ``attention_mask`` where it has the output's first two axes; None where there is none.

    What a transformer writes at padding positions is never read by anything downstream (the
    mask hides it from attention and from pooling), and int8 moves it freely: on MiniLM the
    padding rows alone took the output cosine from 0.9996 to 0.988. Comparing them would
    measure noise, not the file.
    """
    mask = feed.get("attention_mask")
    if mask is None or np.ndim(mask) != 2 or output.ndim < 3 \
            or tuple(output.shape[:2]) != tuple(np.shape(mask)):
        return None
    return np.asarray(mask) != 0


def _output_cosine(reference: list[np.ndarray], candidate: onnx.ModelProto,
                   feeds: Sequence[dict[str, np.ndarray]]) -> float:
    """Cosine of the candidate's outputs with fp32's over all feeds (real tokens only)."""
    sess = onnx_tools.session(candidate, threads=1)
    produced, expected = [], []
    for feed, wanted in zip(feeds, reference):
        output = sess.run(None, feed)[0]
        real = real_positions(feed, wanted)
        produced.append((output if real is None else output[real]).ravel())
        expected.append((wanted if real is None else wanted[real]).ravel())
    a = np.concatenate(expected).astype(np.float64)
    b = np.concatenate(produced).astype(np.float64)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm else 0.0


def _weight_only_candidate(model: onnx.ModelProto, per_channel: bool) -> onnx.ModelProto:
    """Every weight as int8 codes decoded when ONNX Runtime loads the file, activations float:
    runs at fp32 speed where int8 kernels are slower, and as accurate as int8 weights get."""
    prepared = onnx_tools.constants_to_initializers(model)
    quantized, _ = weights_int8_everywhere(prepared, per_channel=per_channel)
    onnx_tools.validate(quantized)
    return quantized


def quantize_int8_best(
    fp32_model: onnx.ModelProto,
    calibration_batches: Iterable[onnx_tools.Batch],
    *,
    method: str = "minmax",
    per_channel: bool = True,
    threads: int = 1,
    repeats: int = 20,
    min_cosine: float = 0.99,
    keep_float: Sequence[str] = (),
    smoothing: float | None = None,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> tuple[onnx.ModelProto, Int8Report]:
    """Build the int8 candidates, time them on the first calibration batch, keep the best.

    Candidates: static QDQ for every supported operator; int8 weights with float activations
    (weight-only, as fast as fp32 where ORT's int8 kernels are slower, e.g. small conv nets);
    and, when the model has MatMul/Gemm weights, dynamic int8 for MatMul only and static for
    the rest + dynamic for MatMul. Weights a candidate leaves float (embedding tables, weights
    inside subgraphs) are made int8 weight-only in every candidate (:func:`weights_int8_every
    where`), so each one stores every weight in 8 bits. A candidate that cannot be built is
    skipped and named in the report. Text models are compared on real tokens only
    (:func:`real_positions`). A
    candidate qualifies when its outputs match fp32 (cosine >= `min_cosine`) and it is not
    slower than fp32 (10% allowance for timing noise). Among those the smallest wins;
    candidates within 5% in size count as equal and go to the fastest, where within 10% in
    latency counts as equal too and goes to the earlier (simpler) candidate. These bands keep
    the choice stable from run to run despite timing noise. A candidate at most 15% larger
    than that and taking at most 0.8x its latency wins instead (static QDQ, with its activation
    Q/DQ nodes, is always a little larger than weight-only int8). If none is as fast as fp32, the
    fastest accurate one is returned and the report says so.

    `keep_float` names nodes whose activations must stay float (a plan's ``keep_float``): the
    candidates are then static QDQ with those nodes excluded (their weights int8) and
    weight-only int8, which keeps every activation float; the dynamic ones would quantize
    the kept nodes again and are left out. `smoothing` (SmoothQuant's α) applies to the static
    QDQ candidate (see :func:`quantize_static_int8`).
    """
    feeds = calibration_feeds(fp32_model, calibration_batches)
    kept = list(keep_float)
    static_name, static_description = (
        ("static_qdq_keep_float", f"static int8 (QDQ) with {len(kept)} nodes kept float as "
         "the plan says (their weights int8)") if kept
        else ("static_qdq", "static int8 (QDQ) for every supported operator"))
    if smoothing is not None:
        static_name, static_description = (f"{static_name}_smoothed", f"{static_description}, "
                                           f"SmoothQuant-smoothed (alpha {smoothing:g})")
    builders: list[tuple[str, str, Callable[[Progress], onnx.ModelProto]]] = [
        (static_name, static_description,
         lambda stage: quantize_static_int8(fp32_model, feeds, method=method,
                                            per_channel=per_channel, nodes_to_exclude=kept,
                                            smoothing=smoothing, progress=stage, cancel=cancel)),
        ("weight_only", "int8 weights decoded at load, float activations",
         lambda stage: _weight_only_candidate(fp32_model, per_channel)),
    ]
    if not kept and _has_constant_matmul(onnx_tools.constants_to_initializers(fp32_model)):
        builders.append(("dynamic_matmul", "dynamic int8 for MatMul/Gemm, the rest in float",
                         lambda stage: quantize_dynamic_int8(fp32_model,
                                                             per_channel=per_channel)))
        builders.append((
            "static_rest_dynamic_matmul", "static int8 (QDQ) except MatMul/Gemm, dynamic int8 "
            "for MatMul/Gemm",
            lambda stage: quantize_dynamic_int8(quantize_static_int8(
                onnx_tools.gemm_to_matmul(fp32_model), feeds, method=method,
                per_channel=per_channel, op_types=_static_op_types(exclude=("MatMul", "Gemm")),
                progress=stage, cancel=cancel), per_channel=per_channel),
        ))

    models: dict[str, onnx.ModelProto] = {}
    descriptions: dict[str, str] = {}
    failures: list[str] = []
    for index, (name, description, build) in enumerate(builders):
        cancel.check()
        stage = sub_progress(progress, 0.8 * index / len(builders),
                             0.8 * (index + 1) / len(builders))
        stage(0.0, f"building {description}")
        try:
            built = build(stage)
        except Cancelled:
            raise
        except Exception as error:  # noqa: BLE001 - ORT's quantizers fail on some graphs
            failures.append(f"{name}: {one_line(error)}")
            continue
        # weights the quantizer did not reach (embedding tables, weights inside If / Loop /
        # Scan bodies, nodes it skipped) are stored as int8 too: every candidate stores int8
        models[name], _ = weights_int8_everywhere(built, per_channel=per_channel)
        descriptions[name] = description
    if not models:
        raise SlimscopeError(f"no int8 form of this graph could be built ({'; '.join(failures)})")

    cancel.check()
    progress(0.8, "timing fp32 and the int8 candidates")
    latency = onnx_tools.compare_latency_ms({"fp32": fp32_model, **models}, feeds[0],
                                            repeats=repeats, threads=threads)
    reference_session = onnx_tools.session(fp32_model, threads=1)
    reference = [reference_session.run(None, feed)[0] for feed in feeds]
    report = Int8Report(fp32_bytes=onnx_tools.serialized_size(fp32_model),
                        fp32_median_ms=latency["fp32"]["median_ms"], threads=threads)
    for name, model in models.items():
        size = onnx_tools.serialized_size(model)
        report.candidates.append(Int8Candidate(
            name=name, description=descriptions[name], bytes=size,
            size_ratio=size / report.fp32_bytes,
            median_ms=latency[name]["median_ms"], p90_ms=latency[name]["p90_ms"],
            latency_ratio=latency[name]["median_ms"] / report.fp32_median_ms,
            output_cosine=_output_cosine(reference, model, feeds),
        ))
    _second_timing(report, models, fp32_model, feeds[0], repeats, threads, min_cosine)
    report.failed = failures
    _choose(report, min_cosine)
    progress(1.0, f"chose {report.chosen.name}")
    return models[report.chosen.name], report


#: Candidates measured up to this much slower than fp32 are timed again (see _second_timing).
_RETIME_BELOW = 1.5


def _second_timing(report: Int8Report, models: dict[str, onnx.ModelProto],
                   fp32_model: onnx.ModelProto, feed: dict[str, np.ndarray], repeats: int,
                   threads: int, min_cosine: float) -> None:
    """Time again, against fp32, the accurate candidates that measured a little slower than
    fp32, and keep the better of the two ratios. On a shared machine one burst of load can
    make a candidate that runs fp32's very kernels (weight-only, decoded at load) measure
    1.2x; a real slowdown (static QDQ on a small conv net: 1.3-1.7x) shows both times."""
    doubtful = [c for c in report.candidates if _LATENCY_ALLOWANCE < c.latency_ratio
                <= _RETIME_BELOW and c.output_cosine >= min_cosine]
    if not doubtful:
        return
    again = onnx_tools.compare_latency_ms(
        {"fp32": fp32_model, **{c.name: models[c.name] for c in doubtful}}, feed,
        repeats=repeats, threads=threads)
    for candidate in doubtful:
        ratio = again[candidate.name]["median_ms"] / again["fp32"]["median_ms"]
        if ratio < candidate.latency_ratio:
            candidate.latency_ratio = ratio
            candidate.median_ms = ratio * report.fp32_median_ms
            candidate.p90_ms = again[candidate.name]["p90_ms"]


#: Timing noise allowance when comparing with fp32, and the size and latency bands within
#: which candidates count as equal (the earlier, simpler candidate then wins).
_LATENCY_ALLOWANCE = 1.10
_SIZE_TIE = 1.05
_LATENCY_TIE = 1.10
#: A candidate at most this much larger than the chosen one wins when it takes at most this
#: fraction of its latency (see _choose).
_FASTER_SIZE_ALLOWANCE = 1.15
_CLEARLY_FASTER = 0.8


def _choose(report: Int8Report, min_cosine: float) -> None:
    """Mark the chosen candidate and write every candidate's reason (see quantize_int8_best)."""
    candidates = report.candidates
    accurate = [c for c in candidates if c.output_cosine >= min_cosine]
    for c in candidates:
        if c.output_cosine < min_cosine:
            c.reason = f"outputs differ from fp32 (cosine {c.output_cosine:.4f} < {min_cosine})"
    if not accurate:
        best = max(candidates, key=lambda c: c.output_cosine)
        best.chosen = True
        best.reason = "no candidate matches fp32 closely; this one is the closest"
        return
    fast = [c for c in accurate if c.latency_ratio <= _LATENCY_ALLOWANCE]
    for c in accurate:
        if c not in fast:
            c.reason = f"slower than fp32 ({c.latency_ratio:.2f}x the latency)"
    if not fast:
        best = min(accurate, key=lambda c: c.median_ms)
        best.chosen = True
        best.reason = (f"every candidate is slower than fp32; this is the fastest "
                       f"({best.latency_ratio:.2f}x)")
        return
    smallest = min(c.bytes for c in fast)
    tied = [c for c in fast if c.bytes <= smallest * _SIZE_TIE]
    fastest = min(c.median_ms for c in tied)
    best = next(c for c in tied if c.median_ms <= fastest * _LATENCY_TIE)  # simplest first
    reason = "smallest that is not slower than fp32"
    # a clearly faster file that is hardly larger is worth its few bytes: static QDQ carries
    # its activation Q/DQ nodes, so int8 weights alone are always a little smaller
    quicker = [c for c in fast if c.bytes <= best.bytes * _FASTER_SIZE_ALLOWANCE
               and c.median_ms <= best.median_ms * _CLEARLY_FASTER]
    if quicker:
        best = min(quicker, key=lambda c: c.median_ms)
        reason = (f"clearly faster than the smallest and at most "
                  f"{_FASTER_SIZE_ALLOWANCE - 1:.0%} larger")
        tied = [best]
    best.chosen = True
    best.reason = f"{reason}: {best.size_ratio:.2f}x the size, {best.latency_ratio:.2f}x the latency"
    for c in fast:
        if c is not best:
            c.reason = ("larger" if c not in tied else "as small, not faster than the chosen") + \
                f" ({c.size_ratio:.2f}x size, {c.latency_ratio:.2f}x latency)"


# -- weight-only 4/8-bit ------------------------------------------------------------------------
#: Operators that hold layer weights, as opposed to reading constant shapes or offsets.
_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Einsum",
                         "LSTM", "GRU", "RNN"})


def _weight_carrying_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Weight operators that read a constant of rank >= 2 (a weight, not a bias)."""
    ranks = {tensor.name: len(tensor.dims) for tensor in model.graph.initializer}
    return [node for node in model.graph.node
            if node.op_type in _WEIGHT_OPS and any(ranks.get(name, 0) >= 2 for name in node.input)]


def weight_only_ops(bits: int) -> tuple[str, ...]:
    """Operators ONNX Runtime has a `bits`-bit weight-only kernel for (after Gemm -> MatMul).

    MatMulNBits takes 4 or 8 bits; GatherBlockQuantized (embeddings) takes 4 bits only.
    """
    return ("MatMul", "Gather") if bits == 4 else ("MatMul",)


def quantize_weight_only(
    model: onnx.ModelProto,
    bits: int = 4,
    block_size: int = 32,
    *,
    symmetric: bool = False,
    skip_unsupported: bool = False,
) -> onnx.ModelProto:
    """Weights in `bits` (4 or 8) with one scale per `block_size` values; activations float.

    Runs on ONNX Runtime's MatMulNBits kernel (MatMul and Gemm, which is rewritten as MatMul
    first) and, at 4 bits, GatherBlockQuantized for embeddings, which needs opset 21: the model
    is converted. ORT has no low-bit kernel for other weight operators (Conv, ConvTranspose,
    ...): they raise a SlimscopeError naming them, unless `skip_unsupported` leaves them float.
    """
    if bits not in (4, 8):
        raise SlimscopeError(f"weight-only quantization supports 4 or 8 bits, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise SlimscopeError(f"block size must be a power of two >= 16, not {block_size}")
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    prepared = onnx_tools.gemm_to_matmul(onnx_tools.constants_to_initializers(model))
    weighted = _weight_carrying_nodes(prepared)
    kernels = weight_only_ops(bits)
    present = {node.op_type for node in weighted}
    unsupported = sorted(present - set(kernels))
    if unsupported and (not skip_unsupported or not present & set(kernels)):
        raise SlimscopeError(
            f"weight-only {bits}-bit quantization runs on {', '.join(kernels)} only (ONNX "
            f"Runtime kernels); ONNX Runtime has no {bits}-bit kernel for {', '.join(unsupported)}"
            ": use static int8 for those layers"
        )
    op_types = tuple(op for op in kernels if op in present)
    if not op_types:
        raise SlimscopeError("the model has no MatMul/Gemm weights to quantize")
    if "Gather" in op_types:  # ORT writes int4 Gather tables at opset 21 without converting
        prepared = onnx_tools.upgrade_opset(prepared, 21)
    quantizer = MatMulNBitsQuantizer(prepared, bits=bits, block_size=block_size,
                                     is_symmetric=symmetric, quant_format=QuantFormat.QOperator,
                                     op_types_to_quantize=op_types)
    with _quiet_onnxruntime():
        quantizer.process()  # changes `prepared`, our own copy, in place
    quantized = quantizer.model.model
    onnx_tools.validate(quantized)
    return quantized

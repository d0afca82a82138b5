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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx

from engine import onnx_tools
from engine.errors import SlimscopeError
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress, sub_progress

log = logging.getLogger(__name__)

#: How activation ranges are set from calibration outputs (see quantize_static_int8).
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")

#: Operators ONNX Runtime's dynamic int8 handles well on CPU; Conv is left out on purpose
#: (ConvInteger is several times slower than fp32 Conv).
DYNAMIC_OPS = ("MatMul",)


# -- preparation ----------------------------------------------------------------------------
def prepare_for_quantization(model: onnx.ModelProto, *, per_channel: bool,
                             pre_process: bool = True) -> onnx.ModelProto:
    """Weights as initializers, opset >= 13 when per-channel, and ORT's pre-processing.

    ORT's pre-processing (symbolic shape inference + basic graph optimization, e.g. folding
    BatchNorm into Conv) lets it quantize tensors whose shapes it would otherwise not know.
    It is best-effort: if it fails on an unusual graph, quantization goes on without it, which
    is why Constant-node weights are converted here rather than left to its optimizer.
    """
    model = onnx_tools.constants_to_initializers(model)
    if per_channel:
        model = onnx_tools.upgrade_opset(model, 13)
    if not pre_process:
        return model
    from onnxruntime.quantization import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="slimscope-pre-") as folder:
        output = Path(folder) / "pre.onnx"
        for skip_symbolic_shape in (False, True):
            try:
                # a copy each time: ORT points a ModelProto it is given at weights files of its
                # own, so a failed attempt would leave the next one (or us) an emptied model
                attempt = onnx.ModelProto()
                attempt.CopyFrom(model)
                with _quiet_onnxruntime(), _working_folder(Path(folder)):
                    quant_pre_process(attempt, output, skip_symbolic_shape=skip_symbolic_shape)
                return onnx.load(output)
            except Exception as error:  # ORT's pre-processing raises anything; it is optional
                log.info("quantization pre-processing failed (symbolic shapes skipped: %s): %s",
                         skip_symbolic_shape, error)
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
    """The batches as input feeds for `model`, kept in memory so they can be replayed."""
    name, dtype = onnx_tools.graph_input(model)
    feeds = [onnx_tools.as_feed(batch, name, dtype) for batch in batches]
    fixed = _fixed_batch(model, name)
    if fixed:  # a graph exported for exactly this many samples takes no other batch
        feeds = [{name: feed[name][start:start + fixed]} for feed in feeds if name in feed
                 and len(feed) == 1
                 for start in range(0, len(feed[name]) - fixed + 1, fixed)] or feeds
    if not feeds:
        raise SlimscopeError("static int8 quantization needs at least one calibration batch")
    return feeds


def _fixed_batch(model: onnx.ModelProto, name: str) -> int | None:
    """The static first dimension of input `name` when the graph fixes it, else None."""
    for value in model.graph.input:
        if value.name == name:
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
    return None


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
        with contextlib.redirect_stdout(printed):
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
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> onnx.ModelProto:
    """Static int8 (QDQ): int8 weights and uint8 activations with ranges from calibration.

    `method` picks how activation ranges are set from the calibration outputs: "minmax" (all
    values), "percentile" (clips the top 0.001%) or "entropy" (minimizes KL divergence).
    `op_types` None quantizes every operator ORT supports, which measured fastest for conv nets
    (ORT fuses whole QDQ chains into QLinear kernels). `reduce_range` (7-bit weights) helps
    accuracy on x86 CPUs without VNNI. `pre_process` False skips ORT's symbolic shape inference
    and graph optimization (slow on very large graphs). The result is checked with
    :func:`onnx_tools.validate`.
    """
    if method not in CALIBRATION_METHODS:
        raise SlimscopeError(f"unknown calibration method {method!r} "
                             f"(choose one of {', '.join(CALIBRATION_METHODS)})")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    progress(0.0, "preparing the graph for quantization")
    prepared = prepare_for_quantization(fp32_model, per_channel=per_channel,
                                        pre_process=pre_process)
    feeds = calibration_feeds(prepared, calibration_batches)
    cancel.check()
    reader = _BatchReader(feeds, sub_progress(progress, 0.1, 0.85), cancel)
    calibrate_method = {"minmax": CalibrationMethod.MinMax,
                        "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy}[method]
    quantized = _with_temp_output(lambda output: quantize_static(
        prepared,
        output,
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(op_types) if op_types else _static_op_types(),
        per_channel=per_channel,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,  # int8 activations are not fused on x86: see top
        weight_type=QuantType.QInt8,
        calibrate_method=calibrate_method,
    ))
    cancel.check()
    progress(0.9, "checking the quantized model")
    onnx_tools.validate(quantized)
    progress(1.0, "static int8 done")
    return quantized


# -- dynamic int8 -----------------------------------------------------------------------------
def quantize_dynamic_int8(
    model: onnx.ModelProto,
    *,
    op_types: Sequence[str] | None = DYNAMIC_OPS,
    per_channel: bool = False,
) -> onnx.ModelProto:
    """Dynamic int8: int8 weights, activations quantized on the fly at each run.

    Suits MatMul-heavy models (transformers) and needs no calibration. Gemm (nn.Linear on 2-D
    input) is rewritten as MatMul first: ORT's quantizer does so itself only when alpha = beta
    = 1. `op_types` None is ORT's own default set, which includes Conv: several times slower
    than fp32 on CPU.
    """
    from onnxruntime.quantization import quantize_dynamic

    prepared = onnx_tools.gemm_to_matmul(onnx_tools.constants_to_initializers(model))
    quantized = _with_temp_output(lambda output: quantize_dynamic(
        prepared, output, op_types_to_quantize=list(op_types) if op_types else None,
        per_channel=per_channel,
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

    @property
    def chosen(self) -> Int8Candidate:
        return next(candidate for candidate in self.candidates if candidate.chosen)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _has_constant_matmul(model: onnx.ModelProto) -> bool:
    weights = {tensor.name for tensor in model.graph.initializer}
    return any(node.op_type in ("MatMul", "Gemm") and len(node.input) > 1
               and node.input[1] in weights for node in model.graph.node)


def _output_cosine(reference: list[np.ndarray], candidate: onnx.ModelProto,
                   feeds: Sequence[dict[str, np.ndarray]]) -> float:
    sess = onnx_tools.session(candidate, threads=1)
    produced = np.concatenate([sess.run(None, feed)[0].ravel() for feed in feeds])
    expected = np.concatenate([output.ravel() for output in reference])
    norm = float(np.linalg.norm(expected) * np.linalg.norm(produced))
    return float(np.dot(expected, produced) / norm) if norm else 0.0


def quantize_int8_best(
    fp32_model: onnx.ModelProto,
    calibration_batches: Iterable[onnx_tools.Batch],
    *,
    method: str = "minmax",
    per_channel: bool = True,
    threads: int = 1,
    repeats: int = 20,
    min_cosine: float = 0.99,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> tuple[onnx.ModelProto, Int8Report]:
    """Build the int8 candidates, time them on the first calibration batch, keep the best.

    Candidates: static QDQ for every supported operator; and, when the model has MatMul/Gemm
    weights, dynamic int8 for MatMul only and static for the rest + dynamic for MatMul. A
    candidate qualifies when its outputs match fp32 (cosine >= `min_cosine`) and it is not
    slower than fp32 (10% allowance for timing noise). Among those the smallest wins;
    candidates within 5% in size count as equal and go to the fastest, where within 10% in
    latency counts as equal too and goes to the earlier (simpler) candidate. These bands keep
    the choice stable from run to run despite timing noise. If none is as fast as fp32, the
    fastest accurate one is returned and the report says so.
    """
    feeds = calibration_feeds(fp32_model, calibration_batches)
    builders: list[tuple[str, str, Callable[[Progress], onnx.ModelProto]]] = [
        ("static_qdq", "static int8 (QDQ) for every supported operator",
         lambda stage: quantize_static_int8(fp32_model, feeds, method=method,
                                            per_channel=per_channel, progress=stage,
                                            cancel=cancel)),
    ]
    if _has_constant_matmul(onnx_tools.constants_to_initializers(fp32_model)):
        builders.append(("dynamic_matmul", "dynamic int8 for MatMul/Gemm, the rest in float",
                         lambda stage: quantize_dynamic_int8(fp32_model)))
        builders.append((
            "static_rest_dynamic_matmul", "static int8 (QDQ) except MatMul/Gemm, dynamic int8 "
            "for MatMul/Gemm",
            lambda stage: quantize_dynamic_int8(quantize_static_int8(
                onnx_tools.gemm_to_matmul(fp32_model), feeds, method=method,
                per_channel=per_channel, op_types=_static_op_types(exclude=("MatMul", "Gemm")),
                progress=stage, cancel=cancel)),
        ))

    models: dict[str, onnx.ModelProto] = {}
    descriptions: dict[str, str] = {}
    for index, (name, description, build) in enumerate(builders):
        cancel.check()
        stage = sub_progress(progress, 0.8 * index / len(builders),
                             0.8 * (index + 1) / len(builders))
        stage(0.0, f"building {description}")
        models[name] = build(stage)
        descriptions[name] = description

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
    _choose(report, min_cosine)
    progress(1.0, f"chose {report.chosen.name}")
    return models[report.chosen.name], report


#: Timing noise allowance when comparing with fp32, and the size and latency bands within
#: which candidates count as equal (the earlier, simpler candidate then wins).
_LATENCY_ALLOWANCE = 1.10
_SIZE_TIE = 1.05
_LATENCY_TIE = 1.10


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
    best.chosen = True
    best.reason = (f"smallest that is not slower than fp32: {best.size_ratio:.2f}x the size, "
                   f"{best.latency_ratio:.2f}x the latency")
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

"""How good a model is: accuracy against labels, and fidelity against the original model.

A *runner* is anything with ``run(batch) -> outputs`` on numpy arrays, so the same metrics
judge a torch module before compression and the ONNX file written after it. Without labels,
``agreement`` with the original (top-1 match) stands in for accuracy; KL divergence, cosine
similarity and the largest output difference say how far the outputs moved.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from engine.data import DataSource, Inputs, batch_length, pad_samples, sample_axes, take_samples
from engine.errors import NeedsModuleError, SlimscopeError, one_line
from engine.formats.guard import quote
from engine.jobs import NEVER_CANCELLED, CancelToken, Progress, no_progress

if TYPE_CHECKING:
    import onnx
    import torch

    from engine.model import Model

DEFAULT_BATCH_SIZE = 64
#: Attribute on a torch module that only takes batches of exactly this many samples.
FIXED_BATCH_ATTRIBUTE = "_slimscope_fixed_batch"


class Runner(Protocol):
    """Runs a model on one batch of inputs (one array, or arrays by input name, see
    engine.data); outputs are the model's first output as a (batch, ...) float array."""

    def run(self, batch: Inputs) -> np.ndarray: ...

    def with_threads(self, threads: int | None) -> Runner:
        """The same model run on `threads` CPU threads (None: the library's default)."""
        ...


def fixed_batch_of(module: "torch.nn.Module") -> int | None:
    """The batch size a torch module takes exclusively, or None when any size works.

    The backend marks a static-batch torch.export module (FIXED_BATCH_ATTRIBUTE). A deep copy of
    that module (the compressed one) loses the mark and also its input guard, and would then
    run a wrong batch silently; its graph still records the shapes it was exported for, so a
    torch.export module whose every input is static is read from its placeholders.
    """
    marked = getattr(module, FIXED_BATCH_ATTRIBUTE, None)
    if marked:
        return int(marked)
    graph = getattr(module, "graph", None)
    if graph is None or getattr(module, "_in_spec", None) is None:  # not from torch.export
        return None
    shapes = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        shape = getattr(value, "shape", None)
        if shape is None:
            return None
        if not all(isinstance(size, int) for size in shape):
            return None
        shapes.append(tuple(shape))
    return _first_batch(shapes)


def _first_batch(shapes: list[tuple[int, ...]]) -> int | None:
    shaped = [shape for shape in shapes if shape]
    return shaped[0][0] if shaped and shaped[0][0] > 0 else None


def input_names(module: "torch.nn.Module") -> list[str]:
    """The names of a module's forward arguments, in order (TorchScript from its schema)."""
    import inspect

    import torch

    if isinstance(module, torch.jit.ScriptModule):
        return [argument.name for argument in module.forward.schema.arguments[1:]]
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _takes_varargs(module: "torch.nn.Module") -> bool:
    """Whether forward() takes ``*args`` (then any number of inputs may be right)."""
    import inspect

    import torch

    if isinstance(module, torch.jit.ScriptModule):
        return False
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind == p.VAR_POSITIONAL for p in parameters)


def check_named_inputs(given: Sequence[str], names: Sequence[str]) -> None:
    """Refuse, in one line, named inputs a module's forward() cannot take: one whose name is not
    an argument while others' are (it would be passed in another's place), or more inputs than
    arguments. Inputs none of whose names match go by position (names from an ONNX spec).

    A module without input specs (TorchScript) is checked here, at its first batch, since the
    data could not be checked against specs when it was opened."""
    if not names:
        return
    unknown = [name for name in given if name not in names]
    if unknown and (len(unknown) < len(given) or len(given) > len(names)):
        raise SlimscopeError(
            f"the data holds {quote(unknown[0])}, which the model does not take: its "
            f"forward() takes {', '.join(map(quote, names))}; give one array per input")


def torch_arguments(module: "torch.nn.Module", batch: "Inputs | Mapping[str, np.ndarray]"
                    ) -> tuple[Any, ...]:
    """Positional arguments for one batch: one tensor, or the named inputs in the module's own
    argument order (by name when the names match, else in the order the data gives them, which
    open_data takes from the model's input specs). Floats follow the module's parameter dtype;
    a scalar for a TorchScript ``int``/``float``/``bool`` argument becomes a Python number."""
    import torch

    param = next((p for p in module.parameters() if p.is_floating_point()), None)

    def tensor(array: np.ndarray) -> torch.Tensor:
        value = torch.from_numpy(np.ascontiguousarray(array))
        if value.is_floating_point() and param is not None:
            value = value.to(param.dtype)  # half-precision modules take half-precision input
        return value

    if not isinstance(batch, Mapping):
        return (tensor(batch),)
    names = input_names(module)
    if not _takes_varargs(module):
        check_named_inputs(list(batch), names)
    order = names[:len(batch)] if set(batch) == set(names[:len(batch)]) else list(batch)
    kinds = {}
    if isinstance(module, torch.jit.ScriptModule):
        kinds = {a.name: str(a.type) for a in module.forward.schema.arguments[1:]}
    scalars = {"int": int, "float": float, "bool": bool}
    arguments = []
    for name in order:
        array = np.asarray(batch[name])
        if kinds.get(name) in scalars and array.ndim == 0:
            arguments.append(scalars[kinds[name]](array.item()))
        else:
            arguments.append(tensor(array))
    return tuple(arguments)


class TorchRunner:
    """Runs a torch module in eval mode without gradients, and leaves the module as it found it:
    its train/eval flags are restored after every call, and no weight or buffer is written.
    """

    def __init__(self, module: "torch.nn.Module", threads: int | None = None,
                 fixed_batch: int | None = None) -> None:
        self.module = module
        self.threads = threads
        #: A program exported for exactly this many samples (torch.export with a static batch)
        #: is fed that many at a time (see fixed_batch_of).
        self.fixed_batch = fixed_batch or fixed_batch_of(module)

    def run(self, batch: Inputs) -> np.ndarray:
        if self.fixed_batch:
            return in_fixed_batches(self._run, batch, self.fixed_batch)
        return self._run(batch)

    def _run(self, batch: Inputs) -> np.ndarray:
        import torch

        arguments = torch_arguments(self.module, batch)
        modes = [(m, m.training) for m in self.module.modules()]
        threads_before = torch.get_num_threads()
        change_threads = bool(self.threads) and self.threads != threads_before
        try:
            if change_threads:
                torch.set_num_threads(self.threads)
            _to_eval(self.module)
            fresh_stream_state(self.module)
            with torch.inference_mode():
                output = first_tensor(self.module(*arguments))
        finally:
            for submodule, training in modes:
                submodule.training = training
            if change_threads:
                torch.set_num_threads(threads_before)
        return output.detach().float().numpy()

    def with_threads(self, threads: int | None) -> TorchRunner:
        return TorchRunner(self.module, threads, self.fixed_batch)


def fresh_stream_state(module: "torch.nn.Module") -> None:
    """Reset a streaming TorchScript model's carried state (Silero VAD's ``reset_states``).

    Such a model feeds each call's state into the next, so an output would depend on which
    batches ran before it: two runners over the same data (compressed and original, file and
    memory) would be compared from different states. Every call starts fresh instead, as each
    sensitivity piece does; the samples of a data file are independent chunks."""
    import torch

    if isinstance(module, torch.jit.ScriptModule) and module._c._has_method("reset_states"):
        module.reset_states()


def in_fixed_batches(run: Callable[[Inputs], np.ndarray], batch: Inputs,
                     size: int) -> np.ndarray:
    """`run` over pieces of exactly `size` samples: a model exported for a fixed batch takes no
    other. The last piece is padded with copies of its last sample, whose outputs are dropped.
    Named inputs are cut along each input's own sample axis; constants go whole."""
    outputs = []
    total = batch_length(batch)
    for start in range(0, total, size):
        piece = take_samples(batch, start, min(start + size, total))
        kept = batch_length(piece)
        outputs.append(run(pad_samples(piece, size))[:kept])
    return np.concatenate(outputs)


def _to_eval(module: "torch.nn.Module") -> None:
    """Eval mode; modules from torch.export refuse .eval() and run as they were exported."""
    try:
        module.eval()
    except NotImplementedError:
        pass


class OnnxRunner:
    """Runs an ONNX model (path, bytes or ModelProto) on onnxruntime's CPU provider.

    A model with several inputs is fed by name (a batch of named inputs, see engine.data); a
    single array feeds a single-input model. A model exported with a fixed batch size is fed
    that many samples at a time, so any data batch size works.
    """

    def __init__(self, model: "str | Path | bytes | onnx.ModelProto", threads: int | None = None
                 ) -> None:
        from engine import onnx_tools

        if isinstance(model, (str, Path)):
            model = Path(model).read_bytes()
        elif not isinstance(model, bytes):
            model = model.SerializeToString()
        self._model_bytes = model
        self.threads = threads
        try:
            self.session = onnx_tools.session(model, threads=threads)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise SlimscopeError(f"onnxruntime cannot run this model: {one_line(exc)}") from None
        self.inputs = {i.name: (tuple(i.shape), _ort_dtype(i.type))
                       for i in self.session.get_inputs()}
        self.input_name = next(iter(self.inputs))

    def _fixed_batch(self, batch: Inputs) -> int | None:
        """The static size of the fed inputs' sample axis, where the model fixes it."""
        if isinstance(batch, Mapping):
            axes = sample_axes(batch)
            name = next((n for n, a in axes.items() if a is not None and n in self.inputs), None)
            axis = axes.get(name) if name is not None else None
        else:
            name, axis = self.input_name, 0
        if name is None or axis is None:
            return None
        shape = self.inputs[name][0]
        size = shape[axis] if axis < len(shape) else None
        return size if isinstance(size, int) and size > 0 else None

    def _feed(self, batch: Inputs) -> dict[str, np.ndarray]:
        if not isinstance(batch, Mapping):
            if len(self.inputs) != 1:
                raise SlimscopeError(
                    f"this ONNX model takes {len(self.inputs)} inputs "
                    f"({', '.join(map(quote, self.inputs))}); give an .npz with one array per "
                    "input name")
            return {self.input_name: np.ascontiguousarray(batch, dtype=self.inputs[self.input_name][1])}
        missing = [name for name in self.inputs if name not in batch]
        if missing:
            raise SlimscopeError(f"the data has no array for the model input {quote(missing[0])} "
                                 f"(it has {', '.join(map(quote, batch))})")
        return {name: np.ascontiguousarray(batch[name], dtype=dtype)
                for name, (_, dtype) in self.inputs.items()}

    def _run(self, batch: Inputs) -> np.ndarray:
        return self.session.run(None, self._feed(batch))[0]

    def run(self, batch: Inputs) -> np.ndarray:
        fixed = self._fixed_batch(batch)
        outputs = in_fixed_batches(self._run, batch, fixed) if fixed else self._run(batch)
        return np.asarray(outputs).astype(np.float32, copy=False)

    def with_threads(self, threads: int | None) -> OnnxRunner:
        return OnnxRunner(self._model_bytes, threads)


def _ort_dtype(type_name: str) -> np.dtype:
    """The numpy dtype for an ONNX Runtime input type string such as ``tensor(int64)``."""
    name = type_name.removeprefix("tensor(").removesuffix(")")
    try:
        return np.dtype({"float": "float32", "double": "float64"}.get(name, name))
    except TypeError:
        return np.dtype(np.float32)


#: Protobuf's 2 GiB message limit, with room for the graph.
ONNX_IN_MEMORY_LIMIT = 1_800_000_000


def runner_for(model: "Model", threads: int | None = None) -> Runner:
    """A runner for a loaded model: its backend's, with external ONNX weights read in."""
    if model.backend is not None and model.onnx_model is None and model.can("run"):
        return model.backend.runner(threads)
    if model.module is not None:
        return TorchRunner(model.module, threads)
    if model.onnx_model is not None:
        from engine.formats.onnx_format import EXTERNAL_DATA_DIR_KEY, proto_with_weights

        if EXTERNAL_DATA_DIR_KEY in model.metadata and model.nbytes < ONNX_IN_MEMORY_LIMIT:
            # ONNX Runtime cannot read external data for shape-like inputs; give it all inline.
            return OnnxRunner(proto_with_weights(model), threads)
        return OnnxRunner(model.path, threads)
    raise NeedsModuleError(f"{model.path.name} holds only weights; evaluating it needs a "
                           "runnable model (a known architecture, TorchScript, or ONNX)")


@dataclass(frozen=True)
class Metrics:
    """Evaluation results; a metric is None when the data or the call could not measure it."""

    samples: int
    #: Top-1 accuracy and mean cross-entropy, when the data has labels.
    accuracy: float | None = None
    loss: float | None = None
    #: Fidelity to the reference model, when one was given.
    agreement: float | None = None
    kl_divergence: float | None = None
    cosine_similarity: float | None = None
    max_abs_diff: float | None = None
    #: For score outputs (one number per position: a probability, a logit, a regression
    #: value), which have no classes to agree on: 1 - mean |output - original| over the
    #: original's scale (1 for probabilities), and the mean squared difference.
    score_fidelity: float | None = None
    mse: float | None = None

    @property
    def primary(self) -> float | None:
        """The one number to rank results by: accuracy with labels, else agreement."""
        return self.accuracy if self.accuracy is not None else self.agreement

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "primary": self.primary}
        for name in SCORE_FIELDS:  # classification results keep their exact keys
            if out[name] is None:
                del out[name]
        return out


#: Metrics fields only score outputs have (see :func:`is_score_output`).
SCORE_FIELDS = ("score_fidelity", "mse")
#: Decision threshold of a score output: 0.5 for probabilities, 0 for logits and the like.
PROBABILITY_THRESHOLD, LOGIT_THRESHOLD = 0.5, 0.0


def is_score_output(outputs: np.ndarray) -> bool:
    """Whether outputs hold one number per position (last axis of size 1, or no axis beyond
    the batch) rather than a class distribution: softmax agreement and KL are constant there
    (one class always agrees with itself), so they are scored as values instead."""
    return outputs.ndim < 2 or outputs.shape[-1] == 1


class MetricTotals:
    """Running sums of the metrics, so evaluation memory does not grow with the data; public
    because sensitivity scores its batched suffix passes with them too."""

    def __init__(self) -> None:
        self.samples = 0
        self.correct = 0
        self.nll = 0.0
        self.labelled_positions = 0
        self.agree = 0
        self.kl = 0.0
        self.compared_positions = 0
        self.cosine = 0.0
        self.max_abs = 0.0
        # Score outputs: positions, absolute and squared differences, the original's absolute
        # values, decisions agreeing at either threshold, and whether the original stayed in
        # [0, 1] (a probability) on every batch so far.
        self.scored_positions = 0
        self.abs_error = 0.0
        self.squared_error = 0.0
        self.reference_abs = 0.0
        self.agree_probability = 0
        self.agree_logit = 0
        self.probabilities = True

    def add_labels(self, outputs: np.ndarray, labels: np.ndarray) -> None:
        log_probs = _class_log_probs(outputs)
        if log_probs.shape[:-1] != labels.shape:
            raise SlimscopeError(f"labels of shape {labels.shape[1:]} per sample do not fit "
                                 f"outputs of shape {outputs.shape[1:]}")
        classes = log_probs.shape[-1]
        if labels.size and labels.max() >= classes:
            raise SlimscopeError(f"label {int(labels.max())} is outside the model's "
                                 f"{classes} outputs")
        picked = np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
        self.correct += int(np.count_nonzero(log_probs.argmax(-1) == labels))
        self.nll -= float(picked.sum())
        self.labelled_positions += labels.size

    def add_reference(self, outputs: np.ndarray, reference: np.ndarray) -> None:
        if outputs.shape != reference.shape:
            raise SlimscopeError(f"outputs of shape {outputs.shape[1:]} per sample cannot be "
                                 f"compared with the original's {reference.shape[1:]}")
        out64 = outputs.astype(np.float64).reshape(len(outputs), -1)
        ref64 = reference.astype(np.float64).reshape(len(reference), -1)
        norms = np.linalg.norm(out64, axis=1) * np.linalg.norm(ref64, axis=1)
        dots = np.einsum("ij,ij->i", out64, ref64)
        # Two all-zero outputs are identical; one zero output points nowhere.
        cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0),
                          np.where(np.all(out64 == ref64, axis=1), 1.0, 0.0))
        self.cosine += float(cosine.sum())
        self.max_abs = max(self.max_abs, float(np.max(np.abs(out64 - ref64), initial=0.0)))
        if is_score_output(reference):
            self._add_scores(out64.reshape(-1), ref64.reshape(-1))
        elif outputs.ndim >= 2:
            log_p = _class_log_probs(reference)
            log_q = _class_log_probs(outputs)
            self.kl += float((np.exp(log_p) * (log_p - log_q)).sum())
            self.agree += int(np.count_nonzero(log_p.argmax(-1) == log_q.argmax(-1)))
            self.compared_positions += log_p[..., 0].size

    def _add_scores(self, outputs: np.ndarray, reference: np.ndarray) -> None:
        difference = outputs - reference
        self.scored_positions += reference.size
        self.abs_error += float(np.abs(difference).sum())
        self.squared_error += float(np.square(difference).sum())
        self.reference_abs += float(np.abs(reference).sum())
        self.probabilities &= bool(np.all((reference >= 0.0) & (reference <= 1.0)))
        self.agree_probability += int(np.count_nonzero(
            (outputs > PROBABILITY_THRESHOLD) == (reference > PROBABILITY_THRESHOLD)))
        self.agree_logit += int(np.count_nonzero(
            (outputs > LOGIT_THRESHOLD) == (reference > LOGIT_THRESHOLD)))

    def metrics(self, has_labels: bool, has_reference: bool) -> Metrics:
        fields: dict[str, float | None] = {}
        if has_labels and self.labelled_positions:
            fields["accuracy"] = self.correct / self.labelled_positions
            fields["loss"] = self.nll / self.labelled_positions
        if has_reference and self.samples:
            fields["cosine_similarity"] = self.cosine / self.samples
            fields["max_abs_diff"] = self.max_abs
            if self.compared_positions:
                fields["agreement"] = self.agree / self.compared_positions
                fields["kl_divergence"] = max(0.0, self.kl / self.compared_positions)
            if self.scored_positions:
                fields.update(self._score_fields())
        return Metrics(samples=self.samples, **fields)

    def _score_fields(self) -> dict[str, float]:
        """Decision agreement (p > 0.5 for probabilities, > 0 otherwise), fidelity, MSE."""
        count = self.scored_positions
        agree = self.agree_probability if self.probabilities else self.agree_logit
        # Probabilities: the error in probability units. Other scores: relative to the
        # original's mean magnitude (an all-zero original leaves the absolute error).
        scale = 1.0 if self.probabilities else (self.reference_abs / count or 1.0)
        return {"agreement": agree / count,
                "score_fidelity": 1.0 - self.abs_error / count / scale,
                "mse": self.squared_error / count}


def run_batch(runner: "Runner", inputs: Inputs) -> tuple[np.ndarray, int]:
    """`runner`'s outputs for one batch and its sample count, refused in one line when the
    outputs do not have one row per sample (evaluation and export verification both rely on it)."""
    outputs = runner.run(inputs)
    count = batch_length(inputs)
    if len(outputs) != count:
        raise SlimscopeError(f"the model returned {len(outputs)} outputs for a batch of "
                             f"{count}; is its first output axis the batch?")
    return outputs, count


def evaluate(
    runner: Runner,
    data: DataSource,
    *,
    reference: Runner | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
    cancel: CancelToken = NEVER_CANCELLED,
) -> Metrics:
    """Run `runner` over `data`, scoring against labels and, if given, the `reference` model.

    Outputs are read as class scores along their last axis (logits; extra axes such as
    sequence positions are scored position by position). Checks `cancel` before every batch.
    """
    total = len(data)
    if total == 0:
        raise SlimscopeError(f"{data.name}: no samples to evaluate")
    totals = MetricTotals()
    progress(0.0, f"evaluating on {data.describe()}")
    for inputs, labels in _checked(data.batches(batch_size), cancel):
        outputs, count = run_batch(runner, inputs)
        if labels is not None:
            totals.add_labels(outputs, labels)
        if reference is not None:
            totals.add_reference(outputs, reference.run(inputs))
        totals.samples += count
        progress(totals.samples / total, f"evaluated {totals.samples}/{total} samples")
    return totals.metrics(data.has_labels, reference is not None)


def _checked(batches: Iterator[Any], cancel: CancelToken) -> Iterator[Any]:
    """`batches`, with the cancel token checked before each is produced."""
    while True:
        cancel.check()
        try:
            yield next(batches)
        except StopIteration:
            return


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock time of one forward pass on a fixed batch, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    repeats: int
    batch_size: int
    threads: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(
    runner: Runner,
    example_batch: Inputs,
    *,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = 1,
    cancel: CancelToken = NEVER_CANCELLED,
) -> LatencyStats:
    """Time `repeats` runs after `warmup` untimed ones. One thread by default: multi-threaded
    timings on a shared desktop vary too much to compare before and after compression.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    timed = runner.with_threads(threads)
    for _ in range(warmup):
        cancel.check()
        timed.run(example_batch)
    times_ms = []
    for _ in range(repeats):
        cancel.check()
        start = time.perf_counter()
        timed.run(example_batch)
        times_ms.append((time.perf_counter() - start) * 1000.0)
    times = np.asarray(times_ms)
    return LatencyStats(
        median_ms=float(np.median(times)),
        p90_ms=float(np.percentile(times, 90)),
        mean_ms=float(times.mean()),
        min_ms=float(times.min()),
        repeats=repeats,
        batch_size=batch_length(example_batch),
        threads=threads,
    )


def _class_log_probs(outputs: np.ndarray) -> np.ndarray:
    """Log-softmax along the last axis, in float64 so KL of near-identical outputs stays >= 0."""
    logits = outputs.astype(np.float64)
    if logits.ndim < 2:
        raise SlimscopeError(f"outputs of shape {outputs.shape[1:]} per sample have no class "
                             "axis to score")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def first_tensor(output: Any) -> "torch.Tensor":
    """The logits of whatever a module returns: a tensor, a tuple, or a dict with 'logits'."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = [output["logits"]] if "logits" in output else list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise SlimscopeError(f"the model returned {type(output).__name__}, not a tensor to score")

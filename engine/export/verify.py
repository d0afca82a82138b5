"""Proof that a written file runs: reload it with its users' runtime and compare with memory.

The file is run on the evaluation data next to the in-memory compressed model. Formats that
store exactly what is in memory must match it to float rounding (ONNX Runtime and PyTorch
kernels sum in different orders); formats that quantize activations or re-quantize weights are
held to what int8 can promise: outputs pointing the same way (cosine) and the same top-1; a
score output (one probability or logit per sample) is held to its score fidelity instead, as
top-1 of one value means nothing and a cosine of one value is its sign.

The in-memory reference is the compressed torch module, or, for a model without one, the
compressed backend's runner (ONNX Runtime on the compressed graph). Weights without a graph
cannot run: their files are read back as a user's reader would and every tensor must equal the
compressed value exactly.

Two things a transformer's outputs need that class scores do not:

* padding positions (``attention_mask`` 0) are not compared: nothing downstream reads them, and
  int8 moves them freely (MiniLM: max |diff| 6.1 there, 0.09 on real tokens);
* outputs that are features (hidden states, embeddings: a base model with no head) have no
  class axis, so top-1 "agreement" of their largest hidden unit is noise, not fidelity (MiniLM
  at cosine 0.9996 per token agrees on 0.93 of them). Those are held to cosine per real
  position instead, which is stricter than per sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from engine.data import DataSource
from engine.errors import SlimscopeError, one_line
from engine.evaluate import (
    DEFAULT_BATCH_SIZE, Metrics, MetricTotals, Runner, TorchRunner, run_batch)
from engine.export.base import WEIGHTS_SOURCE, Exporter, ExportJob
from engine.jobs import NEVER_CANCELLED, Cancelled, CancelToken
from engine.methods.static_int8 import real_positions
from engine.model import Model

#: Exact formats: largest output difference, as a fraction of the largest output magnitude.
EXACT_RELATIVE_TOLERANCE = 1e-3
#: Approximate formats: mean cosine similarity of outputs and top-1 agreement with memory.
MIN_COSINE = 0.99
MIN_AGREEMENT = 0.95
#: Approximate formats, score outputs (one probability or logit per sample, see
#: engine.evaluate.is_score_output): 1 - mean |difference| over the original's scale. A
#: decision flips wherever a score sits near its threshold, so agreement is reported, not
#: required (Silero VAD int8: 2 of 32 flips at |dp| 0.03, score fidelity 0.995).
MIN_SCORE_FIDELITY = 0.98


@dataclass
class Verification:
    """How the reloaded file compared with the in-memory compressed model."""

    passed: bool
    runtime: str
    data: str
    criterion: str
    #: File vs memory on the data: agreement, cosine_similarity, max_abs_diff, and accuracy
    #: when the data has labels (see engine.evaluate.Metrics).
    metrics: dict[str, Any] | None = None
    #: Largest output magnitude of the in-memory model, what exact tolerances scale with.
    output_scale: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        if self.error:
            return f"verification {verdict} ({self.runtime}): {self.error}"
        m = self.metrics or {}
        parts = [f"max |diff| {m.get('max_abs_diff', float('nan')):.3g}"]
        if m.get("cosine_similarity") is not None:
            parts.append(f"cosine {m['cosine_similarity']:.4f}")
        if m.get("score_fidelity") is not None:
            parts.append(f"score fidelity {m['score_fidelity']:.4f}")
        if m.get("agreement") is not None:
            parts.append(f"agreement {m['agreement']:.4f}")
        if m.get("accuracy") is not None:
            parts.append(f"accuracy {m['accuracy']:.4f}")
        return (f"verification {verdict}: reloaded with {self.runtime} on {self.data}: "
                f"{', '.join(parts)} (needs {self.criterion})")


class _ScaleRecorder:
    """A reference runner that remembers the largest output magnitude it produced."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.scale = 0.0

    def run(self, batch: np.ndarray) -> np.ndarray:
        outputs = self.runner.run(batch)
        self.scale = max(self.scale, float(np.max(np.abs(outputs), initial=0.0)))
        return outputs

    def with_threads(self, threads: int | None) -> _ScaleRecorder:
        return _ScaleRecorder(self.runner.with_threads(threads))


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    import torch

    return f"torch {torch.__version__}"


def reference_runner(job: ExportJob) -> Runner:
    """The compressed model in memory, runnable: its torch module or its backend's runner."""
    if job.compressed.module is not None:
        return TorchRunner(job.compressed.module)
    assert job.compressed.backend is not None
    return job.compressed.backend.runner()


def verify_tensors(exporter: Exporter, path: Path, job: ExportJob) -> Verification:
    """Read `path` back to floats and compare every tensor with the compressed backend's value,
    bit for bit (weights without a graph: there is nothing to run)."""
    found = Verification(passed=False, runtime=f"{exporter.runtime} reader", data="every tensor",
                         criterion="every tensor rebuilt equal to the compressed value")
    backend = job.compressed.backend
    assert backend is not None
    try:
        rebuilt = exporter.rebuilt_tensors(path, job)
    except Cancelled:
        raise
    except Exception as error:  # noqa: BLE001 - a file that will not read is the finding
        found.error = f"could not read the file back: {one_line(error)}"
        return found
    expected_keys = set(job.model.tensors.unique_keys())
    missing = sorted(expected_keys - set(rebuilt))
    mismatched, worst = [], 0.0
    for key in sorted(expected_keys & set(rebuilt)):
        job.cancel.check()
        want = np.asarray(backend.read(key))
        got = rebuilt[key]
        if got.shape != want.shape or not np.array_equal(got.astype(np.float64),
                                                         want.astype(np.float64)):
            mismatched.append(key)
            if got.shape == want.shape:
                worst = max(worst, float(np.max(np.abs(got.astype(np.float64)
                                                       - want.astype(np.float64)), initial=0)))
    found.metrics = {"tensors": len(rebuilt), "missing": len(missing),
                     "mismatched": len(mismatched), "max_abs_diff": worst}
    found.passed = not missing and not mismatched
    if not found.passed:
        found.error = (f"{len(missing)} tensors missing, {len(mismatched)} differ "
                       f"(first: {(missing + mismatched)[0]!r}, max |diff| {worst:.3g})")
    return found


#: Output names that say the output is features, not class scores (see outputs_are_features).
_FEATURE_NAMES = ("hidden_state", "embedding", "pooler_output", "features")


def outputs_are_features(model: Model) -> bool:
    """Whether the model's first output is features (hidden states, embeddings) rather than
    class scores: a Hugging Face base model (an architecture without a ``For...`` head), or an
    output named like one."""
    architecture = model.metadata.get("hf.architecture")
    if architecture is not None and "For" not in architecture:
        return True
    first = model.outputs[0].name.lower() if model.outputs else ""
    return any(part in first for part in _FEATURE_NAMES)


def criterion(exact: bool, features: bool = False, scores: bool = False) -> str:
    if exact:
        return f"max |diff| <= {EXACT_RELATIVE_TOLERANCE:g} x the largest output"
    if scores:
        return (f"score fidelity >= {MIN_SCORE_FIDELITY} (one score per sample: decision "
                "agreement reported, not required)")
    if features:
        return (f"cosine >= {MIN_COSINE} per output position (features: no class axis for "
                "agreement)")
    return f"cosine >= {MIN_COSINE} and agreement >= {MIN_AGREEMENT}"


def compare(runner: Runner, reference: Runner, data: DataSource,
            cancel: CancelToken = NEVER_CANCELLED) -> tuple[Metrics, bool]:
    """The file against memory on `data`, as engine.evaluate.evaluate scores it, except that a
    text model's padding positions are left out (see :func:`real_positions`); and whether any
    were. Fidelity metrics are then per real position, accuracy as evaluate has it."""
    totals = MetricTotals()
    samples, masked = 0, False
    for inputs, labels in data.batches(DEFAULT_BATCH_SIZE):
        cancel.check()
        outputs, count = run_batch(runner, inputs)
        if labels is not None:
            totals.add_labels(outputs, labels)
        expected = reference.run(inputs)
        real = real_positions(inputs, expected) if isinstance(inputs, Mapping) else None
        if real is not None and outputs.shape == expected.shape and real.any():
            masked = masked or not real.all()
            outputs, expected = outputs[real], expected[real]
        totals.add_reference(outputs, expected)
        totals.samples += len(outputs)
        samples += count
    if not samples:
        raise SlimscopeError(f"{data.name}: no samples to evaluate")
    return replace(totals.metrics(data.has_labels, True), samples=samples), masked


def verify(exporter: Exporter, path: Path, job: ExportJob, data: DataSource) -> Verification:
    """Reload `path` as `exporter`'s users would and compare it with the in-memory model.

    Any failure to load or run the file is a failed verification, not an exception: that is
    exactly what this check exists to catch. Cancelling still cancels.
    """
    if job.source == WEIGHTS_SOURCE:
        return verify_tensors(exporter, path, job)
    features = outputs_are_features(job.model)
    found = Verification(passed=False, runtime=runtime_version(exporter.runtime),
                         data=data.describe(), criterion=criterion(exporter.exact, features))
    reference = _ScaleRecorder(reference_runner(job))
    try:
        runner = exporter.reload(path, job)
        metrics, masked = compare(runner, reference, data, job.cancel)
    except Cancelled:
        raise
    except Exception as error:  # noqa: BLE001 - a file that will not load is the finding
        found.error = f"could not load or run the file: {one_line(error)}"
        return found
    if masked:
        found.data += " (padding positions, attention_mask 0, not compared)"
    found.metrics = metrics.to_dict()
    found.output_scale = reference.scale
    found.passed, found.criterion = judge(metrics, exporter.exact, features, reference.scale)
    return found


def judge(metrics: Metrics, exact: bool, features: bool, output_scale: float
          ) -> tuple[bool, str]:
    """Whether the file's `metrics` against memory pass, and the criterion they were held to.

    Exact formats: the largest difference within float rounding of `output_scale`. Otherwise
    class scores need cosine and top-1 agreement, features cosine only, and score outputs
    (metrics with a score fidelity) their score fidelity only: a cosine of one value per
    sample is its sign, and a decision flips wherever a score sits near its threshold.
    """
    if exact:
        return (metrics.max_abs_diff is not None and metrics.max_abs_diff
                <= EXACT_RELATIVE_TOLERANCE * max(output_scale, 1e-6)), criterion(True)
    if metrics.score_fidelity is not None:
        return metrics.score_fidelity >= MIN_SCORE_FIDELITY, criterion(False, scores=True)
    passed = (metrics.cosine_similarity or 0.0) >= MIN_COSINE and (
        features or metrics.agreement is None or metrics.agreement >= MIN_AGREEMENT)
    return passed, criterion(False, features)

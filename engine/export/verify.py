"""Proof that a written file runs: reload it with its users' runtime and compare with memory.

The file is run on the evaluation data next to the in-memory compressed model. Formats that
store exactly what is in memory must match it to float rounding (ONNX Runtime and PyTorch
kernels sum in different orders); formats that quantize activations or re-quantize weights are
held to what int8 can promise: outputs pointing the same way (cosine) and the same top-1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.data import DataSource
from engine.errors import one_line
from engine.evaluate import Runner, TorchRunner, evaluate
from engine.export.base import Exporter, ExportJob
from engine.jobs import Cancelled

#: Exact formats: largest output difference, as a fraction of the largest output magnitude.
EXACT_RELATIVE_TOLERANCE = 1e-3
#: Approximate formats: mean cosine similarity of outputs and top-1 agreement with memory.
MIN_COSINE = 0.99
MIN_AGREEMENT = 0.95


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


def criterion(exact: bool) -> str:
    if exact:
        return f"max |diff| <= {EXACT_RELATIVE_TOLERANCE:g} x the largest output"
    return f"cosine >= {MIN_COSINE} and agreement >= {MIN_AGREEMENT}"


def verify(exporter: Exporter, path: Path, job: ExportJob, data: DataSource) -> Verification:
    """Reload `path` as `exporter`'s users would and compare it with the in-memory model.

    Any failure to load or run the file is a failed verification, not an exception: that is
    exactly what this check exists to catch. Cancelling still cancels.
    """
    found = Verification(passed=False, runtime=runtime_version(exporter.runtime),
                         data=data.describe(), criterion=criterion(exporter.exact))
    reference = _ScaleRecorder(TorchRunner(job.compressed.module))
    try:
        runner = exporter.reload(path, job)
        metrics = evaluate(runner, data, reference=reference, cancel=job.cancel)
    except Cancelled:
        raise
    except Exception as error:  # noqa: BLE001 - a file that will not load is the finding
        found.error = f"could not load or run the file: {one_line(error)}"
        return found
    found.metrics = metrics.to_dict()
    found.output_scale = reference.scale
    if exporter.exact:
        found.passed = metrics.max_abs_diff is not None and \
            metrics.max_abs_diff <= EXACT_RELATIVE_TOLERANCE * max(reference.scale, 1e-6)
    else:
        found.passed = (metrics.cosine_similarity or 0.0) >= MIN_COSINE and (
            metrics.agreement is None or metrics.agreement >= MIN_AGREEMENT)
    return found

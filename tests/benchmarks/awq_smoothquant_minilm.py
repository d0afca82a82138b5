"""SmoothQuant before static int8 and AWQ for 4-bit weight-only, on a real transformer ONNX.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/awq_smoothquant_minilm.py \\
        --model /tmp/realmodels/derived/minilm_l6_v2.onnx \\
        --data /tmp/realmodels/data/sentences.npz [--group-size 32] [--asymmetric]

(both files: tests/benchmarks/real_models_prepare.py). The metric is the cosine of the first output
(the pooled sentence embedding) against the fp32 file on the 16 sentences; "held-out 8" is the
cosine on sentences 9-16 when calibration used 1-8.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.data import open_data  # noqa: E402
from engine.export import export  # noqa: E402
from engine.formats import load_model  # noqa: E402
from engine.methods.static_int8 import quantize_static_int8  # noqa: E402
from engine.plan import Plan  # noqa: E402
from engine.tensor_compress import apply_tensor_plan  # noqa: E402


def run(model: onnx.ModelProto | str, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = {spec.name for spec in session.get_inputs()}
    return np.concatenate([session.run(None, {k: v for k, v in feed.items() if k in names})[0]
                           for feed in feeds])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--asymmetric", action="store_true")
    args = parser.parse_args()
    arrays = dict(np.load(args.data))
    feeds = [{k: v[i:i + 4] for k, v in arrays.items()} for i in range(0, 16, 4)]
    fp32 = onnx.load(args.model)
    reference = run(fp32, feeds)
    print("| variant | cosine, all 16 | cosine, held-out 8 | seconds |")
    print("|---|---|---|---|")
    for alpha in (None, 0.5):
        started = time.perf_counter()
        held_out = quantize_static_int8(fp32, feeds[:2], per_channel=True, smoothing=alpha,
                                        op_types=["MatMul"])
        everything = quantize_static_int8(fp32, feeds, per_channel=True, smoothing=alpha,
                                          op_types=["MatMul"])
        print(f"| static int8, MatMul only, smoothing {alpha or 'off'} | "
              f"{cosine(run(everything, feeds), reference):.4f} | "
              f"{cosine(run(held_out, feeds)[8:], reference[8:]):.4f} | "
              f"{time.perf_counter() - started:.0f} |", flush=True)
    model = load_model(args.model)
    data = open_data(args.data, model.inputs)
    with tempfile.TemporaryDirectory() as folder:
        for method in ("rtn", "awq"):
            plan = Plan.from_dict({"kinds": {"MatMul": {"quantization": {
                "bits": 4, "granularity": "group", "group_size": args.group_size,
                "method": method, "symmetric": not args.asymmetric}}}})
            started = time.perf_counter()
            compressed, _ = apply_tensor_plan(model, plan, calibration=data)
            destination = Path(folder) / f"w4_{method}.onnx"
            export(compressed, model, destination, format="onnx-w4", data=data, measure=False,
                   keep_unverified=True)
            print(f"| onnx-w4, group {args.group_size}, {method} "
                  f"({os.path.getsize(destination) / 1e6:.1f} MB) | "
                  f"{cosine(run(str(destination), feeds), reference):.4f} | — | "
                  f"{time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Latency of two ONNX files timed alternately, so that a busy machine slows both alike.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/alternating_latency.py ORIGINAL.onnx \\
        COMPRESSED.onnx --data X.npz [--runs 40]

One ONNX Runtime thread, batch 1 (the first sample of the .npz's first array, or of each named
input); prints both medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original")
    parser.add_argument("compressed")
    parser.add_argument("--data", required=True)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    arrays = np.load(args.data)
    sessions = [session(args.original), session(args.compressed)]
    inputs = sessions[0].get_inputs()
    if len(inputs) == 1:
        feed = {inputs[0].name: arrays[arrays.files[0]][:1]}
    else:
        feed = {spec.name: arrays[spec.name][:1] for spec in inputs}
    times: list[list[float]] = [[], []]
    for _ in range(args.runs):
        for index, running in enumerate(sessions):
            started = time.perf_counter()
            running.run(None, feed)
            times[index].append(time.perf_counter() - started)
    original, compressed = (statistics.median(t) * 1000 for t in times)
    print(f"original {original:.2f} ms, compressed {compressed:.2f} ms, "
          f"ratio {compressed / original:.2f}x ({args.runs} alternating runs each)")


if __name__ == "__main__":
    main()

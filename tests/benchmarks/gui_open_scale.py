"""How the app opens checkpoints with many tensors: time to the table, time until every
layer's statistics are in, and the longest the window stopped answering.

    .venv/bin/python tests/benchmarks/gui_open_scale.py [--counts 10000,30000,300000]
                                                        [--nodes 200000]

Each count is a safetensors file of that many 4x4 weights, and `--nodes` an ONNX chain of
MatMul + Add with that many nodes (tests/benchmarks/bench_hostile_scale.py's generators);
each is opened by the main window offscreen in a fresh process,
the way File > Open does (``MainWindow.open_model``). A 5 ms timer on the GUI thread records
the gaps between its ticks (tests/benchmarks/gui_stall.py); the longest gap beyond 5 ms is the
longest stall. The bundled demo, measured in the same run, is the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def measure(path: str) -> dict[str, float]:
    """In this (fresh) process: open `path` in the main window and time it."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path[:0] = [str(ROOT), str(HERE)]
    from gui_stall import GapRecorder, spin

    from gui.main_window import MainWindow
    from gui.preview import ensure_app
    from gui.workers import live_jobs

    app = ensure_app()
    window = MainWindow()
    window.resize(1280, 800)
    window.show()
    recorder = GapRecorder()
    recorder.start()
    started = time.perf_counter()
    window.open_model(path)
    spin(app, 600, lambda: window.session.model is not None)
    opened = time.perf_counter() - started
    spin(app, 600, lambda: not window.session.busy and not live_jobs())
    settled = time.perf_counter() - started
    stalls = recorder.stop()
    selected = time.perf_counter()
    window.session.select_layer(window.session.model.layers[-1].name)
    spin(app, 0.2)
    return {"layers": len(window.session.model.layers), "opened_s": opened,
            "stats_s": settled, "max_stall_ms": stalls["max_ms"], "p99_ms": stalls["p99_ms"],
            "select_last_ms": (time.perf_counter() - selected) * 1000 - 200}


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10000,30000,300000")
    parser.add_argument("--nodes", type=int, default=200_000, help="0 leaves the ONNX file out")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from bench_hostile_scale import long_graph, many_tensors

    from engine.demo import DEMO_MODEL

    rows = [("baseline: the bundled demo", DEMO_MODEL)]
    with tempfile.TemporaryDirectory(prefix="slimscope-gui-scale-") as folder:
        for count in (int(c) for c in args.counts.split(",")):
            path = Path(folder) / f"many_{count}.safetensors"
            many_tensors(path, count)
            rows.append((f"safetensors, {count:,} tensors", path))
        if args.nodes:
            path = Path(folder) / "long.onnx"
            long_graph(path, args.nodes)
            rows.append((f"ONNX, {args.nodes:,} nodes", path))
        print("| file | layers | table shown | statistics done | longest stall | p99 stall "
              "| select the last layer |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, path in rows:
            result = subprocess.run([sys.executable, __file__, "--measure", str(path)],
                                    capture_output=True, text=True, check=True, cwd=ROOT)
            numbers = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"| {label} | {numbers['layers']:,} | {numbers['opened_s']:.1f} s "
                  f"| {numbers['stats_s']:.1f} s | {numbers['max_stall_ms']:,.0f} ms "
                  f"| {numbers['p99_ms']:,.0f} ms | {numbers['select_last_ms']:,.0f} ms |",
                  flush=True)


if __name__ == "__main__":
    main()

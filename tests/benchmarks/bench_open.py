"""How fast a model opens and a layer's histogram appears; run on demand, not in CI.

    .venv/bin/python tests/benchmarks/bench_open.py [--params 100e6]

Generates a ~100M-parameter transformer-shaped safetensors file (once, in a temp folder), then
times, for the demo and for that file: detecting + loading (lazy), building the app's layer
table (offscreen Qt), and the first histogram + statistics of the largest (~25M-weight) layer.
Baseline in the same run: reading every tensor eagerly with safetensors' own `load_file`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from engine.demo import DEMO_MODEL  # noqa: E402
from engine.formats import load_model  # noqa: E402
from engine.stats import StatsCache  # noqa: E402


def make_big_model(path: Path, target_params: float) -> int:
    """A transformer-shaped state dict: embeddings, blocks of Linear + LayerNorm, a big head."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    width, vocab = 768, 32768
    tensors: dict[str, np.ndarray] = {
        "tok_embeddings.weight": rng.standard_normal((vocab, width), np.float32) * 0.02,
        "head.weight": rng.standard_normal((vocab, width), np.float32) * 0.02,
    }
    block = 0
    while sum(t.size for t in tensors.values()) < target_params:
        prefix = f"blocks.{block}"
        for name, shape in (("attn.qkv", (3 * width, width)), ("attn.proj", (width, width)),
                            ("mlp.fc1", (4 * width, width)), ("mlp.fc2", (width, 4 * width))):
            tensors[f"{prefix}.{name}.weight"] = rng.standard_normal(shape, np.float32) * 0.02
            tensors[f"{prefix}.{name}.bias"] = np.zeros(shape[0], np.float32)
        for norm in ("ln1", "ln2"):
            tensors[f"{prefix}.{norm}.weight"] = np.ones(width, np.float32)
            tensors[f"{prefix}.{norm}.bias"] = np.zeros(width, np.float32)
        block += 1
    save_file(tensors, str(path))
    return sum(t.size for t in tensors.values())


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def table_seconds(model) -> float:
    """Time to build the app's layer table over `model` and let Qt lay it out once."""
    from PySide6.QtWidgets import QApplication, QTableView

    from gui.panels.layer_table import LayerTable
    from gui.session import Session

    app = QApplication.instance() or QApplication([])
    start = time.perf_counter()
    session = Session()
    table = LayerTable(session)
    session.set_model(model)  # statistics for the sparsity column then fill in off-thread
    view = table.findChild(QTableView)
    if view is not None:
        view.resizeColumnsToContents()
    app.processEvents()
    return time.perf_counter() - start


def measure(label: str, path: Path) -> None:
    model, load_s = timed(lambda: load_model(path))
    table_s = table_seconds(model)
    largest = max(model.layers, key=lambda layer: layer.params)
    cache = StatsCache(model)
    _, hist_s = timed(lambda: cache.histogram(largest))
    _, stats_s = timed(lambda: cache.stats(largest))
    print(f"{label}: {model.params / 1e6:.1f}M params, {len(model.layers)} layers, "
          f"file {path.stat().st_size / 2**20:.0f} MiB")
    print(f"  open (detect + lazy load)      {load_s * 1000:8.1f} ms")
    print(f"  layer table built              {table_s * 1000:8.1f} ms")
    print(f"  => table interactive after     {(load_s + table_s) * 1000:8.1f} ms")
    print(f"  histogram of {largest.name} ({largest.params / 1e6:.1f}M weights) "
          f"{hist_s * 1000:8.1f} ms")
    print(f"  statistics of the same layer   {stats_s * 1000:8.1f} ms")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        _, eager_s = timed(lambda: load_file(str(path)))
        print(f"  baseline: eager load_file      {eager_s * 1000:8.1f} ms  "
              f"(lazy open is {eager_s / max(load_s, 1e-9):.1f}x faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the generated model in this folder for the next run "
                             "(default: a temp folder removed at the end; it is ~400 MB)")
    args = parser.parse_args()
    _, import_s = timed(lambda: __import__("torch"))
    print(f"import torch (once per app start, off the GUI thread) {import_s * 1000:.0f} ms")
    measure("demo", DEMO_MODEL)
    with tempfile.TemporaryDirectory(prefix="slimscope-bench-") as scratch:
        folder = args.cache or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        big = folder / f"big_{int(args.params / 1e6)}m.safetensors"
        if not big.exists():
            count, make_s = timed(lambda: make_big_model(big, args.params))
            print(f"(generated {big} with {count / 1e6:.1f}M params in {make_s:.1f} s)")
        measure("generated transformer", big)


if __name__ == "__main__":
    main()

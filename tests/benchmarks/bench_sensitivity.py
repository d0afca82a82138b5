"""Sensitivity speed and fidelity: the naive loop against the exact method and the fast estimate.

Why: engine.sensitivity claims its exact method measures what the naive loop measures (deep-copy
the model, compress one layer, evaluate all the data, repeat) at least 5x faster, and that the
fast estimate (one forward+backward pass) is at least 50x faster. In one process, on the same
data, this runs all three on the bundled demo model (DigitsData test split) and on a
ResNet-18-sized network built here (torchvision's ResNet-18 layout, 11.2M parameters, 3x32x32
inputs, seeded random weights with batch-norm statistics recalibrated on a fixed random data set
whose labels are the unpruned model's own top-1, so accuracy starts at 100% and means "still
agrees"). It prints wall times, speed ratios, and the Spearman rank correlation of each method's
per-(layer, level) drops against the naive ones, and the multiply-add ceiling of any exact method
(see :func:`mac_ceiling`); on the demo the fast estimate also runs on the
calibration split (128 samples), the data it is meant for. Run from the repository root:

    .venv/bin/python tests/benchmarks/bench_sensitivity.py [--threads 1] [--samples 256]
        [--stem cifar|imagenet] [--only demo|resnet] [--cancel-latency]

The exact method evaluates exactly the data the naive loop evaluates; levels it skips after a
collapse are counted and reported. `--cancel-latency` instead cancels exact sweeps of the ResNet
part-way through (after 2, 5 and 9 s) and prints how long each took to stop. Each method first runs once on a few samples, untimed, so no
one pays for the others' kernel set-up; wall and CPU time are both printed, since a shared
machine stretches wall time unevenly.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import zoo  # noqa: E402
from engine.data import ArraySource, DataSource, DigitsData  # noqa: E402
from engine.demo import DEMO_MODEL  # noqa: E402
from engine.formats import load_model  # noqa: E402
from engine.jobs import Cancelled, CancelToken  # noqa: E402
from engine.macs import conv_macs, dense_macs  # noqa: E402
from engine.sensitivity import (  # noqa: E402
    EXTRAPOLATED,
    Sensitivity,
    SweepSettings,
    paired_drops,
    spearman,
    sweep_module,
)


def resnet_and_data(stem: str, samples: int) -> tuple[nn.Module, DataSource]:
    """Seeded ResNet-18, batch norm recalibrated on the data, labels = its own top-1."""
    torch.manual_seed(0)
    model = zoo.ResNet18(stem)
    inputs = torch.from_numpy(np.random.default_rng(0).standard_normal(
        (samples, 3, 32, 32), dtype=np.float32))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the recalibration pass
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        for batch in inputs.split(64):
            model(batch)
    model.eval()
    with torch.inference_mode():
        labels = torch.cat([model(batch).argmax(-1) for batch in inputs.split(64)]).numpy()
    return model, ArraySource(inputs.numpy(), labels.astype(np.int64), "random 3x32x32")


def run(name: str, module: nn.Module, data: DataSource, settings: SweepSettings,
        calibration: DataSource | None = None) -> None:
    """Time and compare the methods on `data`; the fast estimate also on `calibration`, the
    smaller split it is meant for, when one is given."""
    print(f"\n== {name}: {sum(p.numel() for p in module.parameters()) / 1e6:.2f}M parameters, "
          f"{data.describe()}", flush=True)
    warm_up = SweepSettings(sparsities=(0.0, 0.5), bits=(4,))
    for method in ("fast", "exact", "naive"):  # first calls pay for kernel set-up; not timed
        sweep_module(module, data.head(32), method, warm_up, layers=[_last_layer(module)])
    results: dict[str, Sensitivity] = {}
    cpu: dict[str, float] = {}
    for method in ("fast", "exact", "naive"):
        started = time.process_time()
        results[method] = sweep_module(module, data, method, settings)
        cpu[method] = time.process_time() - started
        print(f"{method:>6}: {results[method].seconds:8.2f} s wall, {cpu[method]:8.2f} s CPU",
              flush=True)
    if calibration is not None:
        started = time.process_time()
        results["fast (calibration)"] = sweep_module(module, calibration, "fast", settings)
        cpu["fast (calibration)"] = time.process_time() - started
        print(f"  fast on {calibration.describe()}: {results['fast (calibration)'].seconds:.2f} s "
              f"wall, {cpu['fast (calibration)']:.2f} s CPU", flush=True)
    naive = results["naive"]
    levels = sum(len(c.levels) - 1 for layer in naive.layers for c in layer.curves.values())
    skipped = sum(c.status.count(EXTRAPOLATED) for layer in results["exact"].layers
                  for c in layer.curves.values())
    print(f"layers {len(naive.layers)}, non-baseline levels {levels}, exact skipped after "
          f"collapse {skipped}; baseline {naive.metric} {naive.baseline:.4f}")
    sample = torch.from_numpy(next(data.batches(1))[0])
    every_level, before_collapse = mac_ceiling(module, sample, results["exact"])
    print(f"multiply-add ceiling of any exact method (caching what comes before the swept layer): "
          f"{every_level:.2f}x measuring every level, {before_collapse:.2f}x skipping the levels "
          "after collapse", flush=True)
    for method in [m for m in results if m != "naive"]:
        ratio = naive.seconds / results[method].seconds
        drops, reference = paired_drops(results[method], naive)
        line = (f"{method}: {ratio:.1f}x faster than naive (wall; CPU time "
                f"{cpu['naive'] / cpu[method]:.1f}x); Spearman vs naive "
                f"{naive.metric} drop {spearman(drops, reference):.4f}")
        _, reference_loss = paired_drops(results[method], naive, secondary_b=True)
        line += f", vs naive {naive.secondary_metric} rise {spearman(drops, reference_loss):.4f}"
        if method == "exact":
            measured = measured_mask(results[method])
            line += (f"; on the {measured.sum()} levels it measured (not extrapolated): Spearman "
                     f"{spearman(drops[measured], reference[measured]):.4f}, largest |difference| "
                     f"{np.max(np.abs(drops[measured] - reference[measured])):.4f}")
        print(line, flush=True)


def layer_macs_in_call_order(module: nn.Module, sample: torch.Tensor) -> list[tuple[str, int]]:
    """(layer, multiply-adds per sample) for every Conv/Linear call of one forward, in order."""
    calls: list[tuple[str, int]] = []
    handles = []
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            def count(layer: nn.Module, _: object, output: torch.Tensor, name: str = name) -> None:
                per_sample = output[:1].numel()
                calls.append((name, dense_macs(per_sample, layer.weight.shape[1])
                              if isinstance(layer, nn.Linear)
                              else conv_macs(per_sample, layer.weight.shape)))
            handles.append(layer.register_forward_hook(count))
    try:
        with torch.inference_mode():
            module.eval()(sample[:1])
    finally:
        for handle in handles:
            handle.remove()
    return calls


def mac_ceiling(module: nn.Module, sample: torch.Tensor, exact: Sensitivity
                ) -> tuple[float, float]:
    """The most any exact method can gain over the naive loop in multiply-adds.

    To measure one level on all the data, a method has to run the compressed layer and every
    layer after it (their inputs change); only the layers before it can be cached. The naive
    loop runs all of them. The ratio of the two, summed over every (layer, level), bounds the
    speed-up that caching and batching alone can give, however they are implemented; only
    skipping levels or per-level overhead the naive loop pays can add to it. Returned twice:
    over all of `exact`'s levels, and with the levels it skipped after collapse not run.
    """
    calls = layer_macs_in_call_order(module, sample)
    total = sum(macs for _, macs in calls)
    naive = all_levels = measured = 0
    for layer in exact.layers:
        first = next(i for i, (name, _) in enumerate(calls) if name == layer.name)
        suffix = sum(macs for _, macs in calls[first:])
        for curve in layer.curves.values():
            levels = len(curve.levels) - 1
            naive += levels * total
            all_levels += levels * suffix
            measured += (levels - curve.status.count(EXTRAPOLATED)) * suffix
    return naive / all_levels, naive / measured


def cancel_latencies(module: nn.Module, data: DataSource, delays: tuple[float, ...]) -> None:
    """Seconds from cancel() to the exact sweep raising Cancelled, cancelled after each delay."""
    for delay in delays:
        token, stopped = CancelToken(), threading.Event()
        outcome: list[str] = []

        def work(token: CancelToken = token) -> None:
            try:
                sweep_module(module, data, "exact", SweepSettings(), cancel=token)
                outcome.append("finished")
            except Cancelled:
                outcome.append("cancelled")
            stopped.set()

        threading.Thread(target=work, daemon=True).start()
        time.sleep(delay)
        cancelled_at = time.perf_counter()
        token.cancel()
        stopped.wait()
        print(f"cancelled after {delay:.0f} s: {outcome[0]} {time.perf_counter() - cancelled_at:.3f} "
              "s after cancel()", flush=True)


def measured_mask(result: Sensitivity) -> np.ndarray:
    """Which entries of paired_drops(result, ...) were measured, in the same order."""
    return np.array([status != EXTRAPOLATED for layer in result.layers
                     for curve in layer.curves.values() for status in curve.status[1:]])


def _last_layer(module: nn.Module) -> str:
    from engine.sensitivity import sweepable_layers

    return sweepable_layers(module)[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine multi-threaded "
                        "timings swing with the load, as engine.evaluate.measure_latency says)")
    parser.add_argument("--samples", type=int, default=256, help="ResNet data set size")
    parser.add_argument("--stem", choices=("cifar", "imagenet"), default="imagenet")
    parser.add_argument("--only", choices=("demo", "resnet"))
    parser.add_argument("--cancel-latency", action="store_true",
                        help="only measure how fast an exact ResNet sweep stops when cancelled")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    if args.cancel_latency:
        cancel_latencies(*resnet_and_data(args.stem, args.samples), delays=(2.0, 5.0, 9.0))
        return 0
    if args.only != "resnet":
        demo = load_model(DEMO_MODEL).module
        run("demo DigitsCNN", demo, DigitsData("test"), SweepSettings(),
            calibration=DigitsData("calibration"))
    if args.only != "demo":
        module, data = resnet_and_data(args.stem, args.samples)
        counts = np.bincount(data.labels, minlength=10)  # type: ignore[attr-defined]
        print(f"\nResNet-18 ({args.stem} stem) labels per class: {counts.tolist()}")
        run(f"ResNet-18 ({args.stem} stem)", module, data, SweepSettings())
    return 0


if __name__ == "__main__":
    sys.exit(main())

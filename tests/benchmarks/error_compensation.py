"""Error-compensating quantization and pruning on the demo, side by side with the textbook ones.

Why: issue 15's "done when" on the demo: 2-bit per-channel GPTQ must lose at most half the
accuracy 2-bit round-to-nearest loses, and 70% per-layer OBS pruning at most half of what 70%
per-layer magnitude pruning loses. This prints the accuracy of every variant, exactly as
``slimscope compress demo --plan PLAN --data demo`` measures it (evaluation on the digits test
split, calibration on the demo's calibration split, 128 samples). Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/error_compensation.py

Pass ``--save-plans DIR`` to write each variant's plan as YAML, for the CLI.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.compress import compress  # noqa: E402
from engine.data import DigitsData  # noqa: E402
from engine.demo import DEMO_MODEL  # noqa: E402
from engine.formats import LoadOptions, load_model  # noqa: E402
from engine.plan import Plan  # noqa: E402

Q2 = {"bits": 2, "granularity": "per-channel"}
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("2-bit per-channel", "RTN (today)", {"quantization": Q2}),
    ("2-bit per-channel", "RTN + bias correction", {"quantization": Q2, "bias_correction": True}),
    ("2-bit per-channel", "GPTQ", {"quantization": {**Q2, "method": "gptq"}}),
    ("2-bit per-channel", "GPTQ act-order", {"quantization": {**Q2, "method": "gptq",
                                                             "act_order": True}}),
    ("2-bit per-channel", "GPTQ + bias correction",
     {"quantization": {**Q2, "method": "gptq"}, "bias_correction": True}),
    ("70% per layer", "magnitude (today)", {"pruning": {"method": "magnitude", "amount": 0.7}}),
    ("70% per layer", "magnitude + bias correction",
     {"pruning": {"method": "magnitude", "amount": 0.7}, "bias_correction": True}),
    ("70% per layer", "OBS", {"pruning": {"method": "obs", "amount": 0.7}}),
    ("70% per layer", "OBS + bias correction",
     {"pruning": {"method": "obs", "amount": 0.7}, "bias_correction": True}),
    # the first convolution (one input channel) cannot take 2:4: it stays dense
    ("2:4 (not features.0)", "N:M magnitude", {"pruning": {"method": "nm", "pattern": "2:4"}}),
    ("2:4 (not features.0)", "OBS 2:4", {"pruning": {"method": "obs", "pattern": "2:4"}}),
]
#: Layers every variant leaves alone where the setting cannot apply.
KEEP = {"2:4 (not features.0)": {"features.0": "keep"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-plans", type=Path, help="write each variant's plan here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(DEMO_MODEL, LoadOptions())
    evaluation, calibration = DigitsData("test"), DigitsData("calibration")
    baseline: float | None = None
    losses: dict[tuple[str, str], float] = {}
    print(f"{'setting':<20} {'method':<30} {'accuracy':>9} {'loss':>7} {'seconds':>8}")
    for i, (setting, method, defaults) in enumerate(VARIANTS):
        plan = Plan.from_dict({"version": 1, "defaults": defaults,
                               "layers": KEEP.get(setting, {})})
        if args.save_plans:
            args.save_plans.mkdir(parents=True, exist_ok=True)
            plan.save(args.save_plans / f"variant_{i:02d}.yaml")
        start = time.perf_counter()
        _, report = compress(model, plan, evaluation, calibration=calibration)
        seconds = time.perf_counter() - start
        before = report.metrics_before["accuracy"]
        after = report.metrics_after["accuracy"]
        if baseline is None:
            baseline = before
            print(f"{'original':<20} {'':<30} {100 * before:>8.2f}%")
        losses[(setting, method)] = before - after
        print(f"{setting:<20} {method:<30} {100 * after:>8.2f}% {100 * (before - after):>6.2f} "
              f"{seconds:>8.1f}")
    for setting, today, better in (("2-bit per-channel", "RTN (today)", "GPTQ"),
                                   ("70% per layer", "magnitude (today)", "OBS")):
        ratio = losses[(setting, better)] / max(losses[(setting, today)], 1e-9)
        verdict = "meets" if ratio <= 0.5 else "MISSES"
        print(f"{setting}: {better} loses {ratio:.2f}x what {today} loses "
              f"({verdict} 'at most half')")


if __name__ == "__main__":
    main()

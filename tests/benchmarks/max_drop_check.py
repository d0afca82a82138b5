"""A largest accuracy drop, predicted against checked by measurement, on the demo model.

Why: `slimscope plan --max-drop X` picks the smallest plan whose *predicted* drop (the sum of
the layers' one-at-a-time drops) is at most X, and compressing layers together usually costs
more than that sum. `--check DATA` (engine.plan_check) compresses and evaluates candidate plans
and searches until the *measured* drop fits. For several limits this prints, side by side, the
unchecked plan (predicted drop, measured drop, size) and the checked one (measured drop, size,
plans measured, seconds). Exact sensitivity, checks and measurements all use the DigitsData
test split, as a user checking on their evaluation data would. Run from the repository root:

    .venv/bin/python tests/benchmarks/max_drop_check.py [--threads 1] [--markdown]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.allocate import allocate  # noqa: E402
from engine.data import DigitsData  # noqa: E402
from engine.demo import DEMO_MODEL  # noqa: E402
from engine.formats import load_model  # noqa: E402
from engine.plan_check import allocate_within_measured_drop, check_allocation  # noqa: E402
from engine.sensitivity import SweepSettings, sweep  # noqa: E402

LIMITS = (0.005, 0.01, 0.02, 0.03, 0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, test = load_model(DEMO_MODEL), DigitsData("test")
    sens = sweep(model, test, "exact", SweepSettings())
    print(f"exact sensitivity on {test.describe()}: baseline accuracy {sens.baseline:.2%}, "
          f"{sens.seconds:.1f} s")
    rows = []
    for limit in LIMITS:
        unchecked = check_allocation(sens, model, test, allocate(sens, max_drop=limit)).chosen
        started = time.perf_counter()
        checked = allocate_within_measured_drop(sens, model, test, limit)
        seconds = time.perf_counter() - started
        rows.append((limit, unchecked, checked.chosen, len(checked.trials), seconds))
    header = ("| limit | unchecked: predicted drop | measured drop | size | checked: measured "
              "drop | size | plans measured | seconds |")
    print(header if args.markdown else header.replace("|", " "))
    if args.markdown:
        print("|" + "---|" * 8)
    for limit, plain, chosen, tries, seconds in rows:
        held = "" if plain.drop <= limit else " (broken)"
        cells = (f"{limit * 100:.1f} pts", f"{plain.allocation.drop * 100:.2f} pts",
                 f"{plain.drop * 100:.2f} pts{held}", f"{plain.bytes / 1024:.1f} KiB",
                 f"{chosen.drop * 100:.2f} pts", f"{chosen.bytes / 1024:.1f} KiB", str(tries),
                 f"{seconds:.1f}")
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

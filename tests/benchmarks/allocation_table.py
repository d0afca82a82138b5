"""Allocated plans against the best uniform plan on the demo model, from 1/4 to 1/16 of fp32.

Why: the allocator's promise is that spending bytes where the sensitivity curves say they matter
beats compressing every layer alike. For each target size this applies, with
engine.compress.compress, every uniform plan (the same sparsity and bits for all layers), keeps
the most accurate one that fits, then allocates a plan no larger than that uniform plan's real
size from each kind of sensitivity result and applies it too ("exact + ranks": exact results
that also measured truncated-SVD ranks, so the allocator may factorize layers as well). All accuracies are measured on
the DigitsData test split; the exact sensitivity is measured on that split as well, the fast
estimate on the calibration split, the data-free one on nothing. Run from the repository root:

    .venv/bin/python tests/benchmarks/allocation_table.py [--threads 2] [--markdown]

It checks the two claims for the plans allocated from the exact results (accuracy as the cost,
and the loss as the cost) and says PASS or FAIL: no allocated plan is less accurate than the
best uniform plan, and where the best uniform plan loses at least 3 points the allocated plan
loses at most half as much. Two readings of "the same (or larger) size" are checked: *same
budget* (both fit the target; the uniform plan may be smaller) and *strict* (the allocation's
budget is the best uniform plan's real size, so it is never larger; checked where that size is
itself within 1/4..1/16, since elsewhere it moves the comparison outside the claimed range).
"""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.allocate import allocate, plan_from_choices, uniform_choices  # noqa: E402
from engine.compress import compress  # noqa: E402
from engine.data import DigitsData  # noqa: E402
from engine.demo import DEMO_MODEL  # noqa: E402
from engine.evaluate import TorchRunner, evaluate  # noqa: E402
from engine.formats import load_model  # noqa: E402
from engine.model import Model  # noqa: E402
from engine.plan import Plan  # noqa: E402
from engine.sensitivity import Sensitivity, SweepSettings, sweep  # noqa: E402

TARGETS = [Fraction(1, n) for n in (4, 5, 6, 8, 10, 12, 14, 16)]
UNIFORM_SPARSITIES = tuple(round(0.05 * i, 2) for i in range(20))
UNIFORM_BITS = (None, 8, 7, 6, 5, 4, 3, 2)
#: Fractions of full rank the "exact + ranks" column may also factorize layers to.
RANKS = (0.75, 0.5, 0.375, 0.25, 0.125, 0.0625)


def measure(model: Model, plan: Plan, test: DigitsData, calibration: DigitsData
            ) -> tuple[int, float, float]:
    """(bytes, size ratio, test accuracy) of a plan applied by compress()."""
    compressed, report = compress(model, plan, None, calibration=calibration, measure=False)
    accuracy = evaluate(TorchRunner(compressed.module), test).accuracy
    return report.bytes_after, report.size_ratio, float(accuracy)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(DEMO_MODEL)
    test, calibration = DigitsData("test"), DigitsData("calibration")
    started = time.perf_counter()
    results: dict[str, Sensitivity] = {
        "exact": sweep(model, test, "exact", SweepSettings()),
        "exact + ranks": sweep(model, test, "exact", SweepSettings(ranks=RANKS)),
        "fast": sweep(model, calibration, "fast", SweepSettings()),
        "datafree": sweep(model, None, "datafree", SweepSettings()),
    }
    print(f"sensitivity: {', '.join(f'{m} {r.seconds:.1f} s' for m, r in results.items())}",
          file=sys.stderr)
    exact = results["exact"]
    baseline = exact.baseline

    uniform = []
    for sparsity in UNIFORM_SPARSITIES:
        for bits in UNIFORM_BITS:
            choices = uniform_choices(exact, sparsity, bits)
            if sum(o.bytes for o in choices.values()) + exact.fixed_bytes > exact.model_bytes / 4:
                continue  # predicted bytes never undercount, so this cannot fit 1/4
            size, ratio, accuracy = measure(model, plan_from_choices(exact, choices), test,
                                            calibration)
            uniform.append((size, ratio, accuracy, sparsity, bits))
    print(f"{len(uniform)} uniform plans measured", file=sys.stderr)

    columns = [("exact", False), ("exact", True), ("exact + ranks", False), ("fast", False),
               ("datafree", False)]
    rows, failures = [], []
    for target in TARGETS:
        fitting = [u for u in uniform if u[1] <= float(target)]
        if not fitting:
            rows.append((target, None, {}, {}))
            continue
        best = max(fitting, key=lambda u: (u[2], -u[0]))
        same_budget, strict = {}, {}
        for method, secondary in columns:
            key = f"{method}{' (loss)' if secondary else ''}"
            sens = results[method]
            same_budget[key] = measure(model, allocate(sens, target_ratio=float(target),
                                                       secondary=secondary).plan, test, calibration)
            if method == "exact":
                strict[key] = measure(model, allocate(sens, target_bytes=best[0],
                                                      secondary=secondary).plan, test, calibration)
        rows.append((target, best, same_budget, strict))
        for reading, allocated in (("same budget", same_budget), ("strict", strict)):
            if reading == "strict" and best[1] < float(TARGETS[-1]):
                continue  # the uniform plan itself is outside the range the claim is about
            for key in ("exact", "exact (loss)"):
                failures += check(key, reading, target, best, allocated[key], baseline)
    print("Same budget: every plan fits the target; the uniform one is the most accurate that "
          "does.")
    print_table(rows, baseline, args.markdown, strict=False)
    print("\nStrict: the allocation's budget is the best uniform plan's real size (claims checked "
          f"where that is at least 1/{TARGETS[-1].denominator}).")
    print_table(rows, baseline, args.markdown, strict=True)
    print(f"\nbaseline accuracy {baseline:.2%}; {time.perf_counter() - started:.0f} s in all")
    for failure in failures:
        print("FAIL:", failure)
    if not failures:
        print("PASS: both readings, both costs")
    return 0 if not failures else 1


def check(key: str, reading: str, target: Fraction, best: tuple, allocated: tuple,
          baseline: float) -> list[str]:
    """The two claims for one allocated plan against the best uniform plan."""
    failures = []
    size, _, accuracy = allocated
    where = f"{key}, {reading}, 1/{target.denominator}"
    if reading == "strict" and size > best[0]:
        failures.append(f"{where}: larger than the uniform plan")
    if accuracy < best[2]:
        failures.append(f"{where}: {accuracy:.2%} < uniform {best[2]:.2%}")
    uniform_drop = baseline - best[2]
    if uniform_drop >= 0.03 and baseline - accuracy > uniform_drop / 2:
        failures.append(f"{where}: loses {baseline - accuracy:.2%}, more than half of the "
                        f"uniform plan's {uniform_drop:.2%}")
    return failures


def print_table(rows: list, baseline: float, markdown: bool, strict: bool) -> None:
    header = ["target", "best uniform", "size", "accuracy"]
    keys = ["exact", "exact (loss)"] if strict else \
        ["exact", "exact (loss)", "exact + ranks", "fast", "datafree"]
    for key in keys:
        header += [f"{key} size", f"{key} accuracy"]
    lines = [header]
    for target, best, same_budget, strict_results in rows:
        allocated = strict_results if strict else same_budget
        if best is None:
            lines.append([f"1/{target.denominator}", "none fits"] + [""] * (len(header) - 2))
            continue
        bits = "float" if best[4] is None else f"{best[4]}-bit"
        line = [f"1/{target.denominator}", f"{best[3]:.0%} sparse, {bits}", f"{best[1]:.4f}",
                f"{best[2]:.2%}"]
        for key in keys:
            _, ratio, accuracy = allocated[key]
            line += [f"{ratio:.4f}", f"{accuracy:.2%}"]
        lines.append(line)
    if markdown:
        print("| " + " | ".join(lines[0]) + " |")
        print("|" + "---|" * len(lines[0]))
        for line in lines[1:]:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


if __name__ == "__main__":
    sys.exit(main())

"""`slimscope plan MODEL --sensitivity sens.json (--target-size RATIO|BYTES | --max-drop X)
[--check DATA] -o plan.yaml`: the per-layer plan predicted best for a size or a largest drop.

With `--check`, plans are compressed and evaluated on DATA: a size target reports the measured
metric beside the predicted one, and a largest drop is searched until the *measured* drop fits
(engine.plan_check), since the additive prediction is usually optimistic. The plan replays with
`slimscope compress MODEL --plan plan.yaml`.
"""

from __future__ import annotations

import argparse
import sys

from engine import workflows
from engine.allocate import Allocation
from engine.commands._common import (
    add_model_arguments,
    guard_outputs,
    human_bytes,
    load_from_args,
    named_shapes,
    print_progress,
    write_json,
)
from engine.data import DataSpec
from engine.plan_check import DEFAULT_TRIES, CheckedAllocation
from engine.safe_write import data_input
from engine.sensitivity import Sensitivity


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="allocate sparsity and bits per layer from sensitivity results")
    add_model_arguments(parser)
    parser.add_argument("--sensitivity", required=True, help="JSON from `slimscope sensitivity`")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-size", metavar="SIZE",
                        help="a fraction of the uncompressed size (0.25, 1/16) or bytes "
                        "(200000, 180KiB, 1.5MB)")
    target.add_argument("--max-drop", type=float, metavar="X",
                        help="largest predicted drop of the cost metric (0.01 = one accuracy "
                        "point)")
    parser.add_argument("--cost", choices=("primary", "secondary"), default="primary",
                        help="what the drops are measured in: the primary metric (accuracy or "
                        "agreement, or the estimate), or the secondary one (loss or KL "
                        "divergence; exact results only)")
    parser.add_argument("--check", metavar="DATA",
                        help="compress and evaluate on DATA (demo, demo:calibration, a folder, "
                        ".npy/.npz): report the measured metric; with --max-drop, search until "
                        "the measured drop fits (held-out data gives an unbiased figure)")
    parser.add_argument("--tries", type=int, default=DEFAULT_TRIES,
                        help="with --check and --max-drop: plans to measure at most "
                        "(default %(default)s)")
    parser.add_argument("-o", "--output", required=True, help="plan file (.yaml/.yml/.json)")
    parser.add_argument("--report", help="write choices, predictions and the Pareto front as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    guard_outputs(args, [args.output, args.report], ("sensitivity results", args.sensitivity),
                  data_input("check data", args.check))
    model = load_from_args(args)
    sens = Sensitivity.load(args.sensitivity)
    target = (workflows.Target.size(args.target_size) if args.target_size is not None
              else workflows.Target(max_drop=args.max_drop))
    outcome = workflows.allocate_plan(
        sens, model, target, check=DataSpec(args.check, shapes=named_shapes(args)) if args.check else None,
        secondary=args.cost == "secondary", tries=args.tries, progress=print_progress)
    result, checked = outcome.allocation, outcome.checked
    # Files first: a failed write must be the only stderr line.
    result.plan.save(args.output)
    if args.report:
        write_json(outcome.to_dict(), args.report)
    if checked is not None and sys.stderr.isatty():
        print(file=sys.stderr)
    print(format_summary(result, sens), file=sys.stderr)
    if checked is not None:
        print(format_check(checked), file=sys.stderr)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


#: keep_float node names the summary lists before "and N more".
KEEP_FLOAT_SHOWN = 5


def format_summary(result: Allocation, sens: Sensitivity) -> str:
    lines = [f"predicted: size {human_bytes(result.bytes)} ({result.ratio:.4f} of "
             f"{human_bytes(sens.model_bytes)}), {result.cost_metric} {result.metric:.4g} "
             f"(drop {result.drop:.3g}, assuming the layers' drops add up)"]
    for name, option in result.choices.items():
        bits = f"{option.bits}-bit" if option.quantized else "float"
        shape = f"rank {option.rank:>5}" if option.rank is not None else \
            f"sparsity {option.sparsity:>5.0%}"
        lines.append(f"  {name[:40]:<40} {shape:<14}  {bits:<6} "
                     f"{human_bytes(option.bytes):>10}  drop {option.cost:.3g}")
    quant = result.plan.activation_quant
    if quant is not None:
        kept = list(quant.keep_float)
        shown = ", ".join(kept[:KEEP_FLOAT_SHOWN]) + (
            f" and {len(kept) - KEEP_FLOAT_SHOWN} more" if len(kept) > KEEP_FLOAT_SHOWN else "")
        lines.append(f"activations in int8: predicted drop {result.activation_drop:.3g}; "
                     f"{len(kept)} node(s) kept in float" + (f": {shown}" if kept else ""))
    return "\n".join(lines)


def format_check(checked: CheckedAllocation) -> str:
    """Each measured try, then the measured figures of the plan written."""
    lines = []
    if len(checked.trials) > 1:
        for trial in checked.trials:
            lines.append(f"  tried: predicted drop {trial.allocation.drop:.4g} -> measured "
                         f"{trial.drop:.4g}, {human_bytes(trial.bytes)}")
    chosen = checked.chosen
    lines.append(f"measured on {checked.data}: {checked.metric_name} {chosen.metric:.4g} "
                 f"(baseline {checked.baseline:.4g}, drop {chosen.drop:.4g}), "
                 f"size {human_bytes(chosen.bytes)}")
    return "\n".join(lines)

"""`slimscope plan MODEL --sensitivity sens.json (--target-size RATIO|BYTES | --max-drop X)
-o plan.yaml`: the per-layer plan predicted best for a size or a largest drop.

The plan replays with `slimscope compress MODEL --plan plan.yaml`.
"""

from __future__ import annotations

import argparse
import sys

from engine.allocate import Allocation, allocate, parse_size
from engine.commands._common import add_model_arguments, human_bytes, load_from_args, write_json
from engine.errors import SlimscopeError
from engine.model import Model
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
    parser.add_argument("-o", "--output", required=True, help="plan file (.yaml/.yml/.json)")
    parser.add_argument("--report", help="write choices, predictions and the Pareto front as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    model = load_from_args(args)
    sens = Sensitivity.load(args.sensitivity)
    check_matches(sens, model)
    secondary = args.cost == "secondary"
    if args.target_size is not None:
        size, ratio = parse_size(args.target_size)
        result = allocate(sens, target_bytes=size, target_ratio=ratio, secondary=secondary)
    else:
        result = allocate(sens, max_drop=args.max_drop, secondary=secondary)
    result.plan.save(args.output)
    print(format_summary(result, sens), file=sys.stderr)
    print(f"wrote {args.output}", file=sys.stderr)
    if args.report:
        write_json(result.to_dict(), args.report)
    return 0


def check_matches(sens: Sensitivity, model: Model) -> None:
    """Refuse results measured on another model: every layer must exist with the same shape."""
    for layer in sens.layers:
        try:
            found = model.layer(layer.name)
        except KeyError:
            raise SlimscopeError(f"the sensitivity results name layer {layer.name!r}, which "
                                 f"{model.path.name} does not have") from None
        if tuple(found.shape) != tuple(layer.shape):
            raise SlimscopeError(f"layer {layer.name!r} is {tuple(found.shape)} in "
                                 f"{model.path.name} but {tuple(layer.shape)} in the "
                                 "sensitivity results")


def format_summary(result: Allocation, sens: Sensitivity) -> str:
    lines = [f"predicted: size {human_bytes(result.bytes)} ({result.ratio:.4f} of "
             f"{human_bytes(sens.model_bytes)}), {result.cost_metric} {result.metric:.4g} "
             f"(drop {result.drop:.3g}, assuming the layers' drops add up)"]
    for name, option in result.choices.items():
        bits = f"{option.bits}-bit" if option.quantized else "float"
        lines.append(f"  {name[:40]:<40} sparsity {option.sparsity:>5.0%}  {bits:<6} "
                     f"{human_bytes(option.bytes):>10}  drop {option.cost:.3g}")
    return "\n".join(lines)

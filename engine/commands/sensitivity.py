"""`slimscope sensitivity MODEL [--data PATH|demo] [--method exact|fast|datafree]
[--quant-method rtn|gptq] [--prune-method magnitude|obs] -o sens.json`.

Measures (exact) or estimates (fast, datafree) every prunable layer's metric at each sparsity
and bit width with only that layer compressed, and writes the curves as JSON for `slimscope
plan` and the app. ONNX graphs run in ONNX Runtime (exact also measures each node with int8
activations; fast uses layer-input statistics); weights-only files take datafree alone.
With `--quant-method gptq` / `--prune-method obs` (exact, PyTorch modules) the levels are made
by those error-compensating methods from each layer's input statistics, collected once on the
data's first samples, and `slimscope plan` then writes plans that use them.
"""

from __future__ import annotations

import argparse
import math
import sys

from engine import workflows
from engine.commands._common import (
    add_model_arguments,
    guard_outputs,
    load_from_args,
    named_shapes,
    print_progress,
)
from engine.data import DataSpec
from engine.errors import SlimscopeError
from engine.formats.guard import quote
from engine.plan import GRANULARITIES, RANGE_METHODS, Quantization
from engine.safe_write import data_input
from engine.sensitivity import (
    DEFAULT_BITS,
    DEFAULT_RANKS,
    DEFAULT_SPARSITIES,
    METHODS,
    PRUNE_METHODS,
    QUANT_METHODS,
    Sensitivity,
    SweepSettings,
)

#: Nodes the summary lists by their int8-activation drop.
ACTIVATION_LINES = 5


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sensitivity", help="per-layer metric at each sparsity and bit width, as JSON")
    add_model_arguments(parser)
    parser.add_argument("--data", help="demo, demo:calibration, synthetic[:N], an image folder, "
                        "or a .npy/.npz file (default for the demo model: demo for exact, "
                        "demo:calibration for fast)")
    parser.add_argument("--method", choices=METHODS, default="exact",
                        help="exact: measured; fast: one forward+backward pass (Fisher "
                        "estimate of the loss change); datafree: weight error, no data")
    parser.add_argument("--no-activations", dest="activations", action="store_false",
                        help="ONNX, exact: skip measuring each node with int8 activations")
    parser.add_argument("-o", "--output", required=True, help="JSON file to write ('-' = stdout)")
    parser.add_argument("--samples", type=int, help="use only the first N samples of the data")
    parser.add_argument("--sparsities", type=_floats, default=DEFAULT_SPARSITIES, metavar="LIST",
                        help="sparsity levels, e.g. 0,0.5,0.9 or START:STOP:STEP (default "
                        "0:0.95:0.05)")
    parser.add_argument("--bits", type=_ints, default=DEFAULT_BITS, metavar="LIST",
                        help="bit widths, e.g. 8,4,2 (default 8..2)")
    parser.add_argument("--ranks", type=_ranks, default=(), metavar="LIST",
                        help="fractions of full rank to try by SVD, e.g. 0.5,0.25, or 'default' "
                        f"({','.join(f'{r:g}' for r in DEFAULT_RANKS)}); `slimscope plan` may "
                        "then factorize layers (default: none)")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="per-channel")
    parser.add_argument("--group-size", type=int, help="for --granularity group")
    parser.add_argument("--asymmetric", action="store_true", help="asymmetric integer codes")
    parser.add_argument("--range", dest="range_method", choices=RANGE_METHODS, default="minmax")
    parser.add_argument("--quant-method", choices=QUANT_METHODS, default="rtn",
                        help="how the bits levels round: rtn (to nearest) or gptq (errors "
                        "compensated from each layer's inputs; exact method, PyTorch modules)")
    parser.add_argument("--prune-method", choices=PRUNE_METHODS, default="magnitude",
                        help="how the sparsity levels prune: magnitude, or obs (chosen and "
                        "compensated from each layer's inputs; exact method, PyTorch modules)")
    parser.add_argument("--collapse", type=float, default=SweepSettings.collapse_fraction,
                        metavar="F", help="exact: stop an axis once the metric is within F of "
                        "the way from chance to the baseline (default %(default)s)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    guard_outputs(args, [args.output], data_input("data", args.data))
    if args.granularity == "group" and not args.group_size:
        raise SlimscopeError("--granularity group needs --group-size")
    model = load_from_args(args)
    settings = SweepSettings(
        sparsities=args.sparsities, bits=args.bits, ranks=args.ranks,
        quantization=Quantization(8, not args.asymmetric, args.granularity,
                                  args.group_size if args.granularity == "group" else None,
                                  args.range_method, method=args.quant_method),
        collapse_fraction=args.collapse, activations=args.activations,
        prune_method=args.prune_method)
    result = workflows.sweep(model, DataSpec(args.data, limit=args.samples or 0, shapes=named_shapes(args)), args.method,
                             settings, progress=print_progress)
    if args.output != "-":
        result.save(args.output)  # first: a failed write must be the only stderr line
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(format_summary(result), file=sys.stderr)
    if args.output == "-":
        import json

        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def format_summary(result: Sensitivity) -> str:
    """Per layer and axis, the drop at a few levels: enough to see which layers are fragile."""
    methods = [f"{result.quantization.method} bits"] if result.quantization.method != "rtn" else []
    methods += [f"{result.pruning_method} sparsity"] if result.pruning_method != "magnitude" else []
    lines = [f"{result.method} sensitivity" + (f" ({', '.join(methods)})" if methods else "")
             + f", {result.metric} {result.baseline:.4g} at baseline"
             + (f", on {result.data}" if result.data else "") + f" ({result.seconds:.1f} s)"]
    lines += [f"note: {note}" for note in result.notes]
    for layer in result.layers:
        for axis, curve in layer.curves.items():
            drops = result.drops(layer, axis)
            shown = [f"{level:g}: {drop:+.3g}{'*' if status == 'extrapolated' else ''}"
                     for level, drop, status in zip(curve.levels, drops, curve.status)][1::3]
            lines.append(f"{layer.name[:32]:<32} {axis:<8} drop  " + "  ".join(shown))
    if any("extrapolated" in c.status for layer in result.layers for c in layer.curves.values()):
        lines.append("* not evaluated: the axis had collapsed at an earlier level")
    if result.activations:
        drops = result.activation_drops()
        worst = sorted(drops.items(), key=lambda item: -item[1])[:ACTIVATION_LINES]
        lines.append(f"int8 activations, {len(drops)} nodes; the most harmful:")
        lines += [f"  {name[:40]:<40} drop {drop:+.3g}" for name, drop in worst]
    return "\n".join(lines)


#: Most levels one axis may list: each level is measured on every layer.
MAX_LEVELS = 1000


def _floats(text: str) -> tuple[float, ...]:
    """'0,0.5,0.9' or 'START:STOP:STEP' (inclusive); finite numbers, 1..MAX_LEVELS of them."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if not all(map(math.isfinite, (start, stop, step))) or step == 0:
                raise ValueError
            steps = (stop - start) / step  # inf for 0:1e308:1e-300
            count = int(round(steps)) + 1 if abs(steps) <= MAX_LEVELS else MAX_LEVELS + 1
            _check_level_count(count, text)
            return tuple(round(start + i * step, 6) for i in range(count))
        parts = text.split(",")
        _check_level_count(len(parts), text)
        values = tuple(float(part) for part in parts)
        if not all(map(math.isfinite, values)):
            raise ValueError
        return values
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers or START:STOP:STEP with a "
                                         f"non-zero step: {quote(text)}") from None


def _check_level_count(count: int, text: str) -> None:
    if not 1 <= count <= MAX_LEVELS:
        many = "no" if count < 1 else f"over {MAX_LEVELS}"
        raise argparse.ArgumentTypeError(f"{quote(text)} gives {many} levels; give 1 to "
                                         f"{MAX_LEVELS}")


def _ranks(text: str) -> tuple[float, ...]:
    return DEFAULT_RANKS if text.strip() == "default" else _floats(text)


def _ints(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    _check_level_count(len(parts), text)
    try:
        return tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {quote(text)}") from None

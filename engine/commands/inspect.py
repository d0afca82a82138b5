"""`slimscope inspect MODEL [--json] [--trust]`: every layer with its shape, size and statistics."""

from __future__ import annotations

import argparse
import sys

from engine.commands._common import (
    add_model_arguments,
    human_bytes,
    human_count,
    load_from_args,
    write_json,
)
from engine.stats import model_report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="list layers, sizes and weight statistics")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    model = load_from_args(args)
    report = model_report(model)
    # from the statistics just computed: model.non_finite() would read every weight again
    bad = {layer["name"]: layer["stats"]["non_finite"] for layer in report["layers"]
           if layer.get("stats", {}).get("non_finite")}
    if bad:
        where = ", ".join(f"{name} ({count})" for name, count in list(bad.items())[:5])
        print(f"slimscope: warning: non-finite weights (NaN/Inf) in {where}", file=sys.stderr)
    report["non_finite"] = bad
    if args.json:
        write_json(report, None)
    else:
        print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    """A plain-text table for a terminal."""
    lines = [
        f"{report['path']}  [{report['format']}]",
        f"params {human_count(report['params'])}  size {human_bytes(report['bytes'])}"
        + (f"  MACs {human_count(report['macs'])}" if report.get("macs") else ""),
    ]
    for spec in report["inputs"]:
        lines.append(f"input  {spec['name']}: {spec['shape']} {spec['dtype']}")
    lines.extend(f"note: {note}" for note in report["notes"])
    header = f"{'layer':<36} {'kind':<14} {'shape':<20} {'params':>9} {'size':>10} " \
             f"{'dtype':<9} {'sparsity':>8} {'mean':>10} {'std':>10}"
    lines += ["", header, "-" * len(header)]
    for layer in report["layers"]:
        stats = layer["stats"]
        shape = "x".join(str(d) for d in layer["shape"])
        tied = f"  (shares {layer['shared_with']})" if layer.get("shared_with") else ""
        lines.append(
            f"{layer['name'][:36]:<36} {layer['kind'][:14]:<14} {shape[:20]:<20} "
            f"{human_count(layer['params']):>9} {human_bytes(layer['bytes']):>10} "
            f"{layer['dtype'][:9]:<9} {layer['sparsity']:>8.1%} {stats['mean']:>10.4g} "
            f"{stats['std']:>10.4g}{tied}"
        )
    return "\n".join(lines)

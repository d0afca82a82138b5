"""`slimscope inspect MODEL [--json] [--trust]`: every layer with its shape, size and statistics."""

from __future__ import annotations

import argparse
import sys

from engine import workflows
from engine.commands._common import (
    add_model_arguments,
    human_bytes,
    human_count,
    load_from_args,
    write_json,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="list layers, sizes and weight statistics")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    model = load_from_args(args)
    report = workflows.inspect(model, on_event=print_note)
    if args.json:
        write_json(report, None)
    else:
        print(format_report(report))
    return 0


def print_note(event: workflows.Event) -> None:
    if isinstance(event, workflows.Note):
        print(f"slimscope: warning: {event.message}", file=sys.stderr)


def _file_size(report: dict) -> str:
    """The file's own size where it differs from the weights' (a .slim packs codes; the weights
    are counted as they decode): a 113 KiB .slim was shown as "size 737 KiB" alone."""
    file_bytes = report.get("file_bytes")
    if not file_bytes or abs(file_bytes - report["bytes"]) <= 0.05 * report["bytes"]:
        return ""
    return f" as weights (file {human_bytes(file_bytes)}, {file_bytes / report['bytes']:.3f}x)"


def format_report(report: dict) -> str:
    """A plain-text table for a terminal."""
    lines = [
        f"{report['path']}  [{report['format']}]",
        f"params {human_count(report['params'])}  size {human_bytes(report['bytes'])}"
        + _file_size(report)
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

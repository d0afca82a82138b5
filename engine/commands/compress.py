"""`slimscope compress MODEL --plan PLAN [-o OUT] [--format NAME] [--data PATH|demo] [--report R]`.

Any model file compresses: a PyTorch module module-wise, an ONNX graph or a weights-only file
tensor by tensor (engine.compress). The output is written in the format its extension (or
--format) names, reloaded with its users' runtime and checked against the compressed model
before it is kept. Exit status 1 when that verification fails (the file is then discarded,
unless --keep-unverified). Without -o, only the report is made (--report): what the plan
achieves, measured, with nothing written but the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine import workflows
from engine.commands._common import (
    add_model_arguments,
    guard_outputs,
    human_bytes,
    load_from_args,
    named_shapes,
    print_progress,
    write_json,
)
from engine.compress import CompressionReport
from engine.data import DataSpec
from engine.errors import SlimscopeError
from engine.plan import Plan

if TYPE_CHECKING:
    from engine.export import ExportResult


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compress", help="apply a plan, measure, and write the result")
    add_model_arguments(parser)
    parser.add_argument("--plan", required=True, help="plan file (.yaml/.yml/.json)")
    parser.add_argument("-o", "--output",
                        help="output file: .onnx, .pt/.pth, .pt2, .safetensors or .slim "
                        "(optional with --report: then only the report is written)")
    parser.add_argument("--format", dest="export_format", metavar="NAME",
                        help="output format instead of the extension's default: onnx, "
                        "onnx-int8, onnx-dynamic, onnx-w4, onnx-w8, state-dict, torch-module, "
                        "torchscript, safetensors, pt2, slim")
    parser.add_argument("--keep-unverified", action="store_true",
                        help="keep the output even if reloading it does not reproduce the "
                        "compressed model (exit status is still 1)")
    parser.add_argument("--data", help="evaluation data: demo, synthetic[:N], an image folder, "
                        "or a .npy/.npz file (default: demo for the demo model, else none)")
    parser.add_argument("--calibration", "--calib-data", dest="calibration",
                        help="calibration data: gradient scores, tracing, int8 ranges and the "
                        "layer-input statistics GPTQ, OBS and bias correction use (default: the "
                        "first samples of --data; demo:calibration for the demo)")
    parser.add_argument("--train-data", help="training data for the plan's recovery section "
                        "(default: demo:train for the demo)")
    parser.add_argument("--report", help="write the report as JSON to this file")
    parser.add_argument("--no-measure", action="store_true",
                        help="skip evaluation and latency measurement")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not args.output and not args.report:
        raise SlimscopeError("compress needs an output file (-o) or a report (--report), or both")
    output = Path(args.output) if args.output else None
    chosen = DataSpec(args.data, args.calibration, args.train_data, shapes=named_shapes(args))
    # before the slow part, not after; the demo's own data is never a file to protect
    guard_outputs(args, [output, args.report], ("plan", args.plan), *chosen.read_inputs())
    if output is not None:
        from engine.export import check_destination

        check_destination(output, args.export_format)
    model = load_from_args(args)
    if output is not None:  # this model's kind may not produce that format: say so before work
        from engine.export import check_model_destination

        check_model_destination(output, args.export_format, model)
    plan = Plan.load(args.plan)
    outcome = workflows.compress(model, plan, chosen.effective(workflows.is_demo(model)),
                                 measure=not args.no_measure, progress=print_progress)
    report = outcome.report
    if output is None:
        write_json(report.to_dict(), args.report)
        print(format_summary(report), file=sys.stderr)
        return 0
    result = workflows.export(outcome, output, format=args.export_format,
                              keep_unverified=args.keep_unverified, measure=not args.no_measure,
                              inputs=[("plan", args.plan)], progress=print_progress)
    if args.report:  # first: a failed write must be the only stderr line
        write_json({**report.to_dict(), "export": result.to_dict()}, args.report)
    print(format_summary(report), file=sys.stderr)
    print(format_export(result), file=sys.stderr)
    return 0 if result.verification.passed else 1


def format_export(result: "ExportResult") -> str:
    """What was written, how it compares with the original, and the verification verdict."""
    where = f"wrote {result.path}" if result.kept else "discarded the output"
    lines = [result.headline, f"{where}: {result.format} ({result.reason})",
             f"file: {human_bytes(result.bytes)} = {result.size_ratio:.3f}x {result.baseline} "
             f"({human_bytes(result.baseline_bytes)})",
             result.verification.summary()]
    before = (result.baseline_metrics or {}).get("primary")
    after = (result.verification.metrics or {}).get("accuracy")
    if before is not None and after is not None:
        lines.append(f"accuracy: {before:.4f} (original) -> {after:.4f} (file)")
    if result.latency_ms is not None and result.baseline_latency_ms:
        lines.append(f"latency: {result.baseline_latency_ms:.2f} ms -> {result.latency_ms:.2f} ms "
                     f"({result.latency_ms / result.baseline_latency_ms:.2f}x; "
                     f"{result.latency_method})")
    lines.extend(f"note: {note}" for note in result.notes)
    return "\n".join(lines)


def format_summary(report: CompressionReport) -> str:
    lines = [f"size: {human_bytes(report.bytes_before)} -> {human_bytes(report.bytes_after)} "
             f"({report.size_ratio:.3f}x); params {report.params_before} -> "
             f"{report.params_after}"]
    if report.metrics_before and report.metrics_after:
        for key in ("accuracy", "agreement", "kl_divergence"):
            before, after = report.metrics_before.get(key), report.metrics_after.get(key)
            if after is not None:
                lines.append(f"{key}: {'' if before is None else f'{before:.4f} -> '}{after:.4f}")
    if report.metrics_one_shot and report.metrics_one_shot.get("accuracy") is not None:
        lines.append(f"accuracy right after one-shot compression: "
                     f"{report.metrics_one_shot['accuracy']:.4f}")
    if report.recovery:
        lines.append(f"recovery: {report.recovery['steps']} steps in "
                     f"{report.recovery['seconds']:.1f} s")
    if report.latency_before_ms is not None:
        lines.append(f"latency (1 thread, median): {report.latency_before_ms:.2f} ms -> "
                     f"{report.latency_after_ms:.2f} ms")
    lines.extend(f"note: {note}" for note in report.notes)
    if sys.stderr.isatty():
        lines.insert(0, "")
    return "\n".join(lines)

"""Size and CPU latency of int8 formats on a ResNet-18-like net: fp32 vs dynamic vs static.

Why: ONNX Runtime's dynamic int8 makes conv nets several times slower on CPU (ConvInteger),
and static QDQ is fast only with uint8 activations. This script shows the numbers behind the
choices in engine/methods/static_int8.py. Run from the repository root:

    .venv/bin/python tests/benchmarks/int8_latency.py [--size 64] [--repeats 30]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import onnx_tools, zoo  # noqa: E402
from engine.methods.static_int8 import (  # noqa: E402
    prepare_for_quantization,
    quantize_dynamic_int8,
    quantize_int8_best,
    quantize_static_int8,
)


def build_resnet(seed: int = 0) -> nn.Module:
    """The net in eval mode, with BatchNorm statistics that are not the identity."""
    torch.manual_seed(seed)
    net = zoo.ResNet18(num_classes=100).eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return net


def ort_default_static(fp32: onnx.ModelProto, batches: list[np.ndarray]) -> onnx.ModelProto:
    """Static QDQ as ORT's quantize_static does it by default: int8 activations too."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    prepared = prepare_for_quantization(fp32, per_channel=True)
    feeds = iter([{"input": batch} for batch in batches])
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "s8s8.onnx"
        quantize_static(prepared, output, SimpleNamespace(get_next=lambda: next(feeds, None)),
                        quant_format=QuantFormat.QDQ, per_channel=True)
        return onnx.load(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--calibration-batches", type=int, default=4)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # ORT's quantizer logs advice on the root logger

    net = build_resnet()
    shape = (1, 3, args.size, args.size)
    fp32 = onnx_tools.export_onnx(net, torch.zeros(shape))
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(shape).astype(np.float32)
               for _ in range(args.calibration_batches)]

    started = time.perf_counter()
    models = {
        "fp32": fp32,
        "ORT quantize_dynamic (all ops)": quantize_dynamic_int8(fp32, op_types=None),
        "static QDQ, ORT default (s8 act, s8 w)": ort_default_static(fp32, batches),
        "static QDQ, ours (u8 act, s8 w)": quantize_static_int8(fp32, batches),
    }
    chosen, report = quantize_int8_best(fp32, batches, repeats=args.repeats)
    models[f"chosen: {report.chosen.name}"] = chosen
    build_seconds = time.perf_counter() - started

    fp32_bytes = onnx_tools.serialized_size(fp32)
    latency = {threads: onnx_tools.compare_latency_ms(models, batches[0], repeats=args.repeats,
                                                      threads=threads)
               for threads in (1, 2)}
    print(f"ResNet-18-like, input {shape}, {sum(p.numel() for p in net.parameters()):,} params; "
          f"built all in {build_seconds:.1f} s; median of {args.repeats} runs, interleaved")
    print(f"{'format':42s} {'MB':>7s} {'size':>6s} {'1 thr ms':>9s} {'ratio':>6s} "
          f"{'2 thr ms':>9s} {'ratio':>6s}")
    for name, model in models.items():
        size = onnx_tools.serialized_size(model)
        row = f"{name:42s} {size / 1e6:7.2f} {size / fp32_bytes:6.3f}"
        for threads in (1, 2):
            median = latency[threads][name]["median_ms"]
            row += f" {median:9.2f} {median / latency[threads]['fp32']['median_ms']:6.2f}"
        print(row)
    print("\nquantize_int8_best report (1 thread):")
    for candidate in report.candidates:
        mark = "*" if candidate.chosen else " "
        print(f" {mark} {candidate.name:28s} {candidate.size_ratio:5.3f}x size "
              f"{candidate.latency_ratio:5.2f}x latency cos {candidate.output_cosine:.5f}  "
              f"{candidate.reason}")


if __name__ == "__main__":
    main()

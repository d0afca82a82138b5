"""File size, accuracy and CPU latency of every Slimscope export that promises to be smaller.

Why: "compressed" files from other tools are often not smaller (masks, fake quantization, fp32
plus an encodings file). This writes real files through ``engine.export.export`` — which
reloads each with onnxruntime / torch and checks it against the in-memory model — and prints a
Markdown table ready for the README. Run from the repository root (about 3-4 minutes on 2
cores):

    .venv/bin/python tests/benchmarks/bench_export.py [--models demo,transformer,resnet]

Models: the bundled demo CNN (trained) on its digits test split with real labels; a
transformer-style classifier (4 pre-norm blocks, width 256, 3.2M weights) and a ResNet-ish conv
net (2.8M weights), both with random weights and scored against the original's own predictions
(so "accuracy" is top-1 agreement with the original). Random weights have none of a trained
model's redundancy: their rows show worst-case fidelity, the demo's what training buys.
Size ratios are against the original model written the same way uncompressed: its fp32 ONNX
file for ONNX rows, its fp32 weights for .slim rows. Latency: onnxruntime CPU, 1 thread, batch
32, median of 30 runs interleaved with the original's fp32 ONNX. None for .slim: a bundle is
for storage and loads back into the original's float layers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.compress import compress  # noqa: E402
from engine.data import ArraySource, DataSource, DigitsData  # noqa: E402
from engine.demo import DEMO_MODEL  # noqa: E402
from engine.export import ExportResult, export  # noqa: E402
from engine.formats import LoadOptions, load_model  # noqa: E402
from engine.model import Model  # noqa: E402
from engine.plan import Plan  # noqa: E402

INT8 = {"bits": 8, "granularity": "per-channel"}
INT4_LINEAR = {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 128}
#: (label, plan, output suffix, export format or None for the suffix's default).
ROWS = {
    "fp32": ({}, ".onnx", "onnx"),
    "int8 (static/dynamic, chosen)": (
        {"defaults": {"quantization": INT8}, "activation_quant": {"calibration": "minmax"}},
        ".onnx", None),
    "4-bit weight-only (MatMulNBits)": ({"kinds": {"Linear": {"quantization": INT4_LINEAR}}},
                                       ".onnx", None),
    "50% sparse + int8 bundle": (
        {"defaults": {"pruning": {"method": "magnitude", "amount": 0.5}, "quantization": INT8}},
        ".slim", None),
}
#: Which rows each model gets: 4-bit weight-only is for Linear-heavy models.
MODEL_ROWS = {
    "demo": ("fp32", "int8 (static/dynamic, chosen)", "50% sparse + int8 bundle"),
    "transformer": tuple(ROWS),
    "resnet": ("fp32", "int8 (static/dynamic, chosen)", "50% sparse + int8 bundle"),
}
TOKENS, FEATURES, CLASSES = 32, 128, 10


class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention and a 4x MLP."""

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        attention = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, width))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, width)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))).mean(dim=1))


class ResNetish(nn.Module):
    """Three stages of two residual blocks (64/128/256 channels), 3x32x32 input."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(64), nn.ReLU()]
        channels = 64
        for width, stride in ((64, 1), (128, 2), (256, 2)):
            layers += [Residual(channels, width, stride), Residual(width, width, 1)]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Residual(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs),
            nn.ReLU(), nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False), nn.BatchNorm2d(outputs))
        self.skip = (nn.Sequential() if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def _self_labelled(net: nn.Module, inputs: np.ndarray, folder: Path, name: str,
                   input_shape: tuple[int, ...]) -> tuple[Model, DataSource, DataSource]:
    """Save `net`, load it as Slimscope would, and label 2/3 of `inputs` with its predictions
    (evaluation data); the rest is calibration data."""
    split = len(inputs) * 2 // 3
    with torch.no_grad():
        labels = net(torch.from_numpy(inputs[:split])).argmax(-1).numpy()
    torch.save(net, folder / f"{name}.pt")
    model = load_model(folder / f"{name}.pt", LoadOptions(trust=True, input_shape=input_shape))
    return (model, ArraySource(inputs[:split], labels, f"{name} inputs (original's predictions)"),
            ArraySource(inputs[split:], None, f"{name} inputs (calibration)"))


def transformer(folder: Path) -> tuple[Model, DataSource, DataSource]:
    """Token features with a per-sample offset, so the logits differ from sample to sample."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tokens = (rng.standard_normal((384, 1, FEATURES))
              + rng.standard_normal((384, TOKENS, FEATURES))).astype(np.float32)
    return _self_labelled(Transformer().eval(), tokens, folder, "transformer",
                          (1, TOKENS, FEATURES))


def resnet(folder: Path) -> tuple[Model, DataSource, DataSource]:
    """Images with a per-sample colour offset; BatchNorm statistics made non-trivial."""
    torch.manual_seed(0)
    net = ResNetish().eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):  # folded into the convolutions on export
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    images = (rng.standard_normal((384, 3, 1, 1)) + rng.standard_normal((384, 3, 32, 32))
              ).astype(np.float32)
    return _self_labelled(net, images, folder, "resnet", (1, 3, 32, 32))


def demo(folder: Path) -> tuple[Model, DataSource, DataSource]:
    return load_model(DEMO_MODEL), DigitsData("test"), DigitsData("calibration")


MODELS = {"demo": demo, "transformer": transformer, "resnet": resnet}


def run(name: str, folder: Path) -> list[str]:
    model, data, calibration = MODELS[name](folder)
    params = sum(p.numel() for p in model.module.parameters())
    lines = []
    for label in MODEL_ROWS[name]:
        plan, suffix, fmt = ROWS[label]
        started = time.perf_counter()
        compressed, _ = compress(model, Plan.from_dict(plan), calibration=calibration,
                                 measure=False)
        result = export(compressed, model, folder / f"{name}{suffix}", format=fmt, data=data,
                        calibration=calibration)
        lines.append(_row(f"{name} ({params / 1e6:.2f}M)", label, result))
        print(f"  {name}: {label}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return lines


def _row(model: str, label: str, result: ExportResult) -> str:
    verification = result.verification
    metrics = verification.metrics or {}
    before = (result.baseline_metrics or {}).get("accuracy")
    after = metrics.get("accuracy")
    accuracy = f"{before:.4f} → {after:.4f}" if before is not None else "—"
    if result.format == "slim":  # loads back into the original's float layers: same speed
        latency = "— (storage format)"
    else:
        latency = (f"{result.baseline_latency_ms:.2f} → {result.latency_ms:.2f} ms "
                   f"({result.latency_ms / result.baseline_latency_ms:.2f}×)")
    verdict = ("yes" if verification.passed else "**no**") + \
        f" (max Δ {metrics.get('max_abs_diff', float('nan')):.2g})"
    chosen = [note.split()[1] for note in result.notes  # "int8 NAME chosen: why"
              if note.startswith("int8 ") and note.split()[2] == "chosen:"]
    fmt = f"{result.format} ({chosen[0]})" if chosen else result.format
    return (f"| {model} | {label} | {fmt} | {result.bytes / 1024:,.0f} KiB | "
            f"**{result.size_ratio:.3f}×** | {accuracy} | {latency} | {verdict} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what the latency column measures, and steadier on shared CPUs
    lines = ["| model | plan | format | file | size vs fp32 | accuracy (original → file) | "
             "latency (fp32 → file) | verified |", "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="slimscope-bench-") as folder:
        for name in args.models.split(","):
            lines += run(name.strip(), Path(folder))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

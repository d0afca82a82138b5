"""How much accuracy recovery fine-tuning wins back on the demo model, and how fast.

Why: 90% unstructured sparsity with 4-bit weights costs the demo CNN a lot of accuracy one-shot;
engine.finetune's default config should bring it back to within 1.5 points of the original in
under two minutes on a 2-core laptop. This prints the numbers behind that claim. Run from the
repository root:

    .venv/bin/python tests/benchmarks/recovery_demo.py [--steps N] [--lr LR] [--threads 1]

One thread is the default: this net is so small that a second thread mostly waits, and on a
busy 2-core machine two threads run several times slower than one.

The test split is used only for the printed accuracies, never to choose a checkpoint: recovery
runs without eval_fn, so it keeps its last state.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.data import DigitsData  # noqa: E402
from engine.demo import DEMO_MODEL  # noqa: E402
from engine.finetune import RecoveryConfig, StepReport, recover  # noqa: E402
from engine.methods.apply import apply_plan  # noqa: E402
from engine.plan import Plan  # noqa: E402
from engine.zoo import DigitsCNN  # noqa: E402

PLAN = {
    "version": 1,
    "defaults": {
        "pruning": {"method": "magnitude", "amount": 0.9},
        "quantization": {"bits": 4, "symmetric": True, "granularity": "per-channel"},
    },
}


def load_or_train(train: DigitsData) -> nn.Module:
    """The bundled demo model, or (without it) a quickly trained DigitsCNN on the same split."""
    model = DigitsCNN()
    if DEMO_MODEL.exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(DEMO_MODEL))
        return model.eval()
    torch.manual_seed(0)
    inputs, labels = torch.from_numpy(train.inputs), torch.from_numpy(train.labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    for _ in range(15):
        for index in torch.randperm(len(inputs)).split(32):
            loss = F.cross_entropy(model(inputs[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: DigitsData) -> float:
    model.eval()
    predictions = model(torch.from_numpy(data.inputs)).argmax(1).numpy()
    return float(np.mean(predictions == data.labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="override the default steps")
    parser.add_argument("--lr", type=float, default=None, help="override the default lr")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train, test = DigitsData("train"), DigitsData("test")
    original = load_or_train(train)
    original_acc = accuracy(original, test)

    started = time.perf_counter()
    compressed = apply_plan(original, Plan.from_dict(PLAN))
    one_shot_acc = accuracy(compressed.module, test)
    compress_seconds = time.perf_counter() - started

    overrides = {key: value for key, value in (("steps", args.steps), ("lr", args.lr))
                 if value is not None}
    config = RecoveryConfig.from_dict({**RecoveryConfig().to_dict(), **overrides})

    def show(report: StepReport) -> None:
        if report.step % 100 == 0:
            print(f"  step {report.step:4d}  loss {report.loss:.4f}  lr {report.lr:.2e}",
                  flush=True)

    started = time.perf_counter()
    result = recover(compressed, original, (train.inputs, train.labels), config, on_step=show)
    recover_seconds = time.perf_counter() - started
    recovered_acc = accuracy(compressed.module, test)

    module_params = dict(compressed.module.named_parameters())
    total = sum(mask.numel() for mask in compressed.masks.values())
    masked = sum(int((~mask).sum()) for mask in compressed.masks.values())
    zeros = sum(int((module_params[name] == 0).sum()) for name in compressed.masks)
    codes_match = all(torch.equal(module_params[name].detach(), q.dequantize())
                      for name, q in compressed.quantized.items())
    print(f"config: {config.to_dict()}")
    print(f"original accuracy:   {original_acc:.4f}")
    print(f"one-shot accuracy:   {one_shot_acc:.4f}  (90% sparse, 4-bit per-channel; "
          f"compressed in {compress_seconds:.2f} s)")
    print(f"recovered accuracy:  {recovered_acc:.4f}  after {result.steps} steps in "
          f"{recover_seconds:.1f} s ({args.threads} threads)")
    print(f"gap to original:     {100 * (original_acc - recovered_acc):.2f} points")
    print(f"sparsity kept:       {masked / total:.4f} masked, {zeros / total:.4f} exact zeros; "
          f"module == dequantized codes: {codes_match}")


if __name__ == "__main__":
    main()

"""Train the bundled demo model and write it as safetensors, ONNX and a JSON record.

Run from the repository root: ``python -m resources.make_demo``. The run is deterministic (fixed
seed, one thread, deterministic kernels), so re-running it reproduces the recorded accuracy;
the data split is the one :class:`engine.data.DigitsData` serves, so the app's demo evaluation
measures exactly the held-out samples reported here.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engine import zoo
from engine.data import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, DigitsData
from engine.evaluate import TorchRunner, evaluate

ARCH = "digits_cnn"
SEED = 0
THREADS = 1
EPOCHS = 30
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
#: Random shifts of up to this many pixels: 8x8 digits are small enough that one pixel of
#: translation is most of the variation between writers.
MAX_SHIFT = 1
OUT_DIR = Path(__file__).resolve().parent / "demo"


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)
    return torch.Generator().manual_seed(seed)


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to MAX_SHIFT pixels in x and y, zero-filled at the edges."""
    pad = MAX_SHIFT
    padded = F.pad(images, (pad, pad, pad, pad))
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * pad + 1, (len(images), 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


def train(generator: torch.Generator) -> nn.Module:
    data = DigitsData("train")
    inputs = torch.from_numpy(data.inputs)
    labels = torch.from_numpy(data.labels)
    model = zoo.build(ARCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(inputs) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=EPOCHS * steps_per_epoch)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), BATCH_SIZE):
            index = order[start:start + BATCH_SIZE]
            batch = random_shift(inputs[index], generator)
            loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def reproducible_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the metadata keys sorted: the library writes them in hash order,
    which would make every rebuild of the bundled file differ from the last.
    """
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    return len(text).to_bytes(8, "little") + text + blob[8 + header_len:]


def write_outputs(model: nn.Module, accuracy: float, out_dir: Path) -> None:
    """The three demo files; nothing in them depends on the clock, so rebuilds are identical."""
    from engine.onnx_tools import export_onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    shape = (1, *DigitsData("calibration").input_shape)
    metadata = {
        zoo.ARCH_METADATA_KEY: ARCH,
        zoo.INPUT_SHAPE_METADATA_KEY: ",".join(map(str, shape)),
        "slimscope.test_accuracy": f"{accuracy:.6f}",
        "slimscope.seed": str(SEED),
        "slimscope.dataset": "sklearn.datasets.load_digits, pixels/16",
    }
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    (out_dir / "digits_cnn.safetensors").write_bytes(reproducible_safetensors(state, metadata))
    graph = export_onnx(model, torch.zeros(shape), opset=17, input_names=("input",),
                        output_names=("logits",), dynamic_batch=True)
    (out_dir / "digits_cnn.onnx").write_bytes(graph.SerializeToString())
    record = {
        "arch": ARCH,
        "test_accuracy": accuracy,
        "test_samples": len(DigitsData("test")),
        "split": {"dataset": "sklearn.datasets.load_digits", "test_fraction": DIGITS_TEST_FRACTION,
                  "random_state": DIGITS_SPLIT_SEED, "stratified": True},
        "seed": SEED,
        "threads": THREADS,
        "epochs": EPOCHS,
        "torch_version": torch.__version__,
        "input_shape": list(shape),
    }
    (out_dir / "demo.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args(argv)
    generator = seed_everything(SEED)
    start = time.perf_counter()
    model = train(generator)
    train_seconds = time.perf_counter() - start
    metrics = evaluate(TorchRunner(model), DigitsData("test"))
    assert metrics.accuracy is not None
    print(f"test accuracy {metrics.accuracy:.4f} (loss {metrics.loss:.4f}) "
          f"after {train_seconds:.1f} s of training")
    write_outputs(model, metrics.accuracy, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A small trained ONNX classifier and its labelled data, for the GUI flow on an ONNX file.

The model is Conv → Relu → flatten → Gemm → Relu → MatMul over sklearn's 8×8 digits, trained for
a second with a fixed seed, so the original's accuracy is a real figure (well above chance) and a
compression that hurts it shows. The data is the held-out split as ``x`` float32 ``[N,1,8,8]``
and ``y`` int64, the general ``.npz`` layout the app reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from sklearn.datasets import load_digits

from factories_compress import conv_gemm_matmul_graph

CLASSES = 10
HIDDEN = 32
CHANNELS = 8


def digits_split(test: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, test x, test y); images scaled to [0, 1], shaped [N, 1, 8, 8]."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    return images[test:], labels[test:], images[:test], labels[:test]


def _train(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Weights of the three layers after a few seeded epochs of Adam (about a second on CPU)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, CHANNELS, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(CHANNELS * 64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES, bias=False))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for _epoch in range(15):
        for start in range(0, len(y), 64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(net(x[start:start + 64]), y[start:start + 64]).backward()
            optimiser.step()
    state = {name: value.detach().numpy().copy() for name, value in net.state_dict().items()}
    return {"conv.weight": state["0.weight"], "conv.bias": state["0.bias"],
            "fc.weight": state["3.weight"], "fc.bias": state["3.bias"],
            "head.weight": state["5.weight"].T.copy()}  # MatMul takes [in, out]


def digits_onnx() -> onnx.ModelProto:
    """The trained classifier as an opset-17 graph with a dynamic batch; weights are initializers."""
    train_x, train_y, _test_x, _test_y = digits_split()
    weights = _train(train_x, train_y)
    weights["flat_shape"] = np.array([0, -1], dtype=np.int64)
    return conv_gemm_matmul_graph(weights, (1, 8, 8), "digits_classifier")


def write_digits_onnx(folder: Path, name: str = "digits_classifier.onnx") -> Path:
    path = folder / name
    onnx.save(digits_onnx(), str(path))
    return path


def write_digits_npz(folder: Path, name: str = "digits_test.npz") -> Path:
    """The held-out digits as x [N,1,8,8] float32 and y int64."""
    _train_x, _train_y, test_x, test_y = digits_split()
    path = folder / name
    np.savez(path, x=test_x, y=test_y)
    return path

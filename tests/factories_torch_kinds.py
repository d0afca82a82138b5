"""Small TorchScript and torch.export stand-ins for the torch kinds' sweep and export tests.

* :func:`streaming_script`: a scripted model whose ``forward(x, sr: int)`` takes a sample rate
  as a Python int, like Silero VAD's TorchScript file.
* :func:`plain_script`: a scripted conv net with one input.
* :func:`static_batch_program`: the same conv net exported by torch.export with a static batch
  of 1 (the specialised reshape makes any other batch wrong, as in real exported programs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


class ConvNet(nn.Module):
    """Conv -> ReLU -> Linear over 1x8x8 inputs, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).reshape(x.shape[0], -1))


class Streaming(nn.Module):
    """Two Linear layers over [B, 16] chunks; `sr` chooses a scale, as a sample rate would."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(16, 24)
        self.second = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        scale = 1.0 if sr == 16000 else 2.0
        return self.second(torch.tanh(self.first(x * scale)))


def _seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for parameter in module.parameters():
        nn.init.normal_(parameter, std=0.3)
    return module.eval()


def conv_net() -> ConvNet:
    return _seeded(ConvNet())  # type: ignore[return-value]


def streaming() -> Streaming:
    return _seeded(Streaming())  # type: ignore[return-value]


def plain_script(path: Path) -> Path:
    torch.jit.script(conv_net()).save(str(path))
    return path


def streaming_script(path: Path) -> Path:
    torch.jit.script(streaming()).save(str(path))
    return path


def static_batch_program(path: Path) -> Path:
    program = torch.export.export(conv_net(), (torch.zeros(1, 1, 8, 8),))
    torch.export.save(program, str(path))
    return path


def images(path: Path, count: int = 24) -> Path:
    """`count` random 1x8x8 inputs under x."""
    np.savez(path, x=np.random.default_rng(0).standard_normal((count, 1, 8, 8))
             .astype(np.float32))
    return path


def chunks(path: Path, count: int = 24) -> Path:
    """Named inputs for :class:`Streaming`: x [count, 16] and a scalar int64 sr."""
    np.savez(path, x=np.random.default_rng(1).standard_normal((count, 16)).astype(np.float32),
             sr=np.array(16000, dtype=np.int64))
    return path

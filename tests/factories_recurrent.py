"""Silero-VAD-like stand-ins for the recurrent-layer tests: conv front end, LSTM cell, one
sigmoid probability per chunk. Most of the weight sits in the LSTM, as in Silero, so a size
target of 0.3 is reachable only if the recurrent weights can be compressed.

* :func:`tiny_vad`: the eager module (an ``nn.LSTMCell``, like Silero's decoder).
* :func:`vad_module_file`: the eager module pickled whole (opened with ``trust``).
* :func:`vad_script`: the same, scripted (TorchScript keeps the class name ``LSTMCell``).
* :func:`vad_program`: the same, torch.export with a static batch of 1 (the graph keeps
  ``aten.lstm_cell``, which the TorchScript-based ONNX exporter cannot split by itself).
* :func:`sequence_vad`: an eager variant with a two-layer bidirectional ``nn.GRU``, for the
  ``weight_ih_l0`` / ``weight_hh_l1_reverse`` parameter names.
* :func:`chunks`: unlabelled inputs, half quiet and half loud, so the probability spreads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

#: Samples per chunk, conv channels, LSTM hidden size.
SAMPLES, CHANNELS, HIDDEN = 64, 8, 32


class TinyVAD(nn.Module):
    """[B, 64] -> Conv1d -> ReLU -> three time steps through an LSTMCell -> Linear -> sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, CHANNELS, 8, stride=4)
        self.rnn = nn.LSTMCell(CHANNELS, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x.unsqueeze(1)))  # [B, 8, 15]
        h = torch.zeros(x.shape[0], self.rnn.hidden_size)
        c = torch.zeros(x.shape[0], self.rnn.hidden_size)
        for step in torch.split(features, 5, dim=2):  # three steps: weight_hh matters
            h, c = self.rnn(step.mean(dim=2), (h, c))
        return torch.sigmoid(self.head(h))


class SequenceVAD(nn.Module):
    """[B, 64] as 8 steps of 8 samples -> 2-layer bidirectional GRU -> Linear -> sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 12, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(24, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.reshape(x.shape[0], 8, 8))
        return torch.sigmoid(self.head(out[:, -1]))


def _seeded(module: nn.Module, std: float = 0.4) -> nn.Module:
    torch.manual_seed(0)
    for parameter in module.parameters():
        nn.init.normal_(parameter, std=std)
    return module.eval()


def tiny_vad() -> TinyVAD:
    """Weights chosen so that the probabilities of :func:`chunks` spread over 0.09..0.7 with
    about 60 % above 0.5 (a head that saturates would hide every weight change)."""
    module = _seeded(TinyVAD(), std=0.8)
    with torch.no_grad():
        module.head.weight.mul_(2.0)
        module.head.bias.fill_(-2.0)
    return module  # type: ignore[return-value]


def sequence_vad() -> SequenceVAD:
    return _seeded(SequenceVAD())  # type: ignore[return-value]


def vad_module_file(path: Path) -> Path:
    torch.save(tiny_vad(), str(path))
    return path


def vad_script(path: Path) -> Path:
    torch.jit.script(tiny_vad()).save(str(path))
    return path


def vad_program(path: Path) -> Path:
    program = torch.export.export(tiny_vad(), (torch.zeros(1, SAMPLES),))
    torch.export.save(program, str(path))
    return path


def chunks(path: Path, count: int = 32) -> Path:
    """`count` chunks under x: even ones quiet noise, odd ones loud noise."""
    rng = np.random.default_rng(0)
    loudness = np.where(np.arange(count) % 2 == 0, 0.05, 1.0)[:, None]
    np.savez(path, x=(rng.standard_normal((count, SAMPLES)) * loudness).astype(np.float32))
    return path

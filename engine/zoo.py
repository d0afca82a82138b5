"""Architectures Slimscope can rebuild from weights alone, without running a pickle.

A safetensors or state_dict file whose metadata names one of these (key `slimscope.arch`)
loads as a runnable module. The bundled demo model is the first entry.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ARCH_METADATA_KEY = "slimscope.arch"
INPUT_SHAPE_METADATA_KEY = "slimscope.input_shape"


class DigitsCNN(nn.Module):
    """Small CNN for scikit-learn's 8x8 digits: three conv blocks and a two-layer head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(64, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "digits_cnn": DigitsCNN,
}


def build(arch: str) -> nn.Module:
    """A fresh, untrained instance of a known architecture."""
    try:
        return ARCHITECTURES[arch]()
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise KeyError(f"unknown architecture {arch!r} (known: {known})") from None

"""Slimscope bundles (.slim): packed low-bit and sparse weights plus the architecture recipe.

Recognised by the manifest member in the zip (see :mod:`engine.bundle`). Loading decodes every
tensor and rebuilds the module from a known architecture or the bundle's stripped TorchScript,
neither of which runs pickled Python, so no trust is needed.
"""

from __future__ import annotations

from pathlib import Path

from engine.bundle import is_bundle, read_bundle
from engine.formats import LoadOptions
from engine.formats._torch_common import module_model
from engine.model import Model

NAME = "slimscope-bundle"


def match(path: Path, head: bytes, zip_names: list[str]) -> bool:
    return is_bundle(zip_names)


def load(path: Path, options: LoadOptions) -> Model:
    bundle = read_bundle(path)
    return module_model(path, NAME, bundle.module, inputs=bundle.inputs,
                        input_shape=options.input_shape, notes=bundle.describe())

"""Exporters, one module per output format, chosen by the output file's extension.

Every exporter writes atomically (temporary file in the target folder, then rename) and never
over the input model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from engine.compressed import CompressedModel
from engine.errors import SlimscopeError
from engine.model import Model
from engine.safe_write import refuse_input_overwrite

Exporter = Callable[[CompressedModel, Model, Path], None]


def _exporters() -> dict[str, Exporter]:
    from engine.export import torch_files

    return {
        ".pt": torch_files.write_torch,
        ".pth": torch_files.write_torch,
        ".safetensors": torch_files.write_safetensors,
    }


def write_output(compressed: CompressedModel, model: Model, destination: Path,
                 inputs: Sequence[Path] = ()) -> Path:
    """Write `compressed` to `destination` in the format its extension names."""
    exporters = _exporters()
    suffix = destination.suffix.lower()
    if suffix not in exporters:
        known = ", ".join(sorted(exporters))
        raise SlimscopeError(f"{destination.name}: unknown output format {suffix or '(none)'} "
                             f"(known: {known})")
    refuse_input_overwrite(destination, model.path, *inputs)
    exporters[suffix](compressed, model, destination)
    return destination

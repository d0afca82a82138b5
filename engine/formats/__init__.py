"""Format adapters, chosen by a file's content (magic bytes, zip layout), never its extension.

Each adapter module exposes ``NAME``, ``match(path, head, zip_names) -> bool`` and
``load(path, options) -> Model``. :func:`load_model` reads the head once, asks each adapter
in registry order, and turns every failure into a one-line :class:`ModelLoadError`.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from engine.errors import ModelLoadError, SlimscopeError
from engine.jobs import Progress, no_progress
from engine.model import Model

HEAD_BYTES = 64


@dataclass(frozen=True)
class LoadOptions:
    """What the caller allows and knows: trust for pickles, input shapes for MACs."""

    trust: bool = False
    input_shape: tuple[int, ...] | None = None
    progress: Progress = no_progress


def _adapters() -> list[ModuleType]:
    # Imported lazily: each adapter pulls in torch or onnx, which the GUI loads off-thread.
    from engine.formats import (
        onnx_format,
        safetensors_format,
        slim_bundle,
        torch_export,
        torch_pickle,
        torchscript,
    )

    # Order matters: specific zip layouts before the generic torch.save zip.
    return [safetensors_format, slim_bundle, torch_export, torchscript, torch_pickle, onnx_format]


def zip_member_names(path: Path) -> list[str]:
    """Member names of a zip archive, or an empty list for anything that is not one."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def detect(path: Path) -> ModuleType:
    """The adapter for `path`, decided from its bytes."""
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    if not head:
        raise ModelLoadError(f"{path.name}: the file is empty")
    names = zip_member_names(path) if head.startswith(b"PK") else []
    for adapter in _adapters():
        if adapter.match(path, head, names):
            return adapter
    raise ModelLoadError(
        f"{path.name}: not a model format Slimscope reads (PyTorch, TorchScript, torch.export, "
        "ONNX, safetensors, Slimscope .slim)"
    )


def load_model(path: str | Path, options: LoadOptions | None = None) -> Model:
    """Load any supported model file into the neutral :class:`Model`."""
    options = options or LoadOptions()
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not a model file")
    adapter = detect(path)
    options.progress(0.05, f"reading {path.name} as {adapter.NAME}")
    try:
        model = adapter.load(path, options)
    except SlimscopeError:
        raise
    except MemoryError:
        raise ModelLoadError(f"{path.name}: not enough memory to load this model") from None
    except Exception as exc:  # noqa: BLE001 - every library error becomes one clear line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path.name}: cannot read as {adapter.NAME}: {detail}") from exc
    if not model.layers:
        raise ModelLoadError(f"{path.name}: the model has no weight layers to inspect")
    options.progress(1.0, f"loaded {len(model.layers)} layers")
    return model

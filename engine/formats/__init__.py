"""Format adapters, chosen by a file's content (magic bytes, zip layout), never its extension.

Each adapter module exposes ``NAME``, ``match(path, head, zip_names) -> bool`` and
``load(path, options) -> Model``. :func:`load_model` is the one door every model comes in by:
it checks the path is an ordinary readable file before opening anything (a FIFO would block
forever, ``/proc`` files have no honest size), reads the head once, asks each adapter in
registry order, and turns every failure into one :class:`ModelLoadError` line with control
characters escaped, so a crafted file name cannot split the line or recolour a terminal.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from engine.errors import ModelLoadError, SlimscopeError, one_line
from engine.formats.guard import quote, regular_file
from engine.jobs import Progress, no_progress
from engine.model import Model

HEAD_BYTES = 64
#: What a damaged or crafted zip makes :mod:`zipfile` raise while listing its members.
_ZIP_LISTING_ERRORS = (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error,
                       NotImplementedError)


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
    """Member names of a zip archive, or an empty list for anything that is not one.

    Only the central directory is read (names and sizes, never member data): about half a
    kilobyte of memory per member listed, ~160 MB for 300k members, which real checkpoints
    with one member per tensor can have.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except _ZIP_LISTING_ERRORS:
        return []


def _read_head(path: Path) -> bytes:
    """The first HEAD_BYTES of `path`, opened without blocking and re-checked once open.

    :func:`regular_file` already refused FIFOs by their stat; opening non-blocking and checking
    the open handle too closes the gap where the path is swapped for a FIFO in between.
    """
    name = quote(path.name or str(path))
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ModelLoadError(f"{name}: cannot open ({exc.strerror or type(exc).__name__})") from None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ModelLoadError(f"{name}: not a regular file, not a model file")
        try:
            return handle.read(HEAD_BYTES)
        except OSError as exc:
            raise ModelLoadError(f"{name}: cannot read ({exc.strerror or type(exc).__name__})") from None


def detect(path: Path) -> ModuleType:
    """The adapter for `path`, decided from its bytes."""
    head = _read_head(path)
    if not head:
        raise ModelLoadError(f"{quote(path.name)}: the file is empty")
    names = zip_member_names(path) if head.startswith(b"PK") else []
    for adapter in _adapters():
        if adapter.match(path, head, names):
            return adapter
    raise ModelLoadError(
        f"{quote(path.name)}: not a model format Slimscope reads (PyTorch, TorchScript, "
        "torch.export, ONNX, safetensors, Slimscope .slim)"
    )


def load_model(path: str | Path, options: LoadOptions | None = None) -> Model:
    """Load any supported model file into the neutral :class:`Model`.

    Library warnings are silenced for the whole load: each would be a second stderr line (and
    torch's pickle-protocol warning is two), while every real problem is raised as an error.
    """
    options = options or LoadOptions()
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _load(path, options)
    except SlimscopeError as exc:
        _make_printable(exc)
        raise


def _load(path: Path, options: LoadOptions) -> Model:
    check_model_path(path)
    name = quote(path.name)
    adapter: ModuleType | None = None
    try:
        adapter = _folder_adapter(path) or detect(path)
        options.progress(0.05, f"reading {path.name} as {adapter.NAME}")
        model = adapter.load(path, options)
    except SlimscopeError:
        raise
    except MemoryError:
        raise ModelLoadError(f"{name}: not enough memory to load this model") from None
    except RecursionError:
        raise ModelLoadError(f"{name}: its structure nests too deeply to read") from None
    except OSError as exc:
        raise ModelLoadError(f"{name}: cannot read ({exc.strerror or one_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - every library error becomes one clear line
        reading = f"cannot read as {adapter.NAME}" if adapter is not None else "cannot read"
        raise ModelLoadError(f"{name}: {reading}: {one_line(exc)}") from exc
    if not model.layers:
        raise ModelLoadError(f"{name}: the model has no weight layers to inspect")
    options.progress(1.0, f"loaded {len(model.layers)} layers")
    return model


def _folder_adapter(path: Path) -> ModuleType | None:
    """The Hugging Face folder adapter for a folder holding a config.json; None otherwise.

    Decided by stat alone, and the adapter (which imports torch) only for such a folder: the
    GUI asks this on its own thread before every load.
    """
    try:
        is_model_folder = (stat.S_ISDIR(os.stat(path).st_mode)
                           and os.path.lexists(path / "config.json"))
    except (OSError, ValueError):  # missing, name too long, NUL byte: check_model_path says so
        return None
    if not is_model_folder:
        return None
    from engine.formats import hf_folder

    return hf_folder


def check_model_path(path: Path) -> None:
    """One line unless `path` is an ordinary readable file or a model folder; stats it, never
    opens it.

    :func:`regular_file`, plus the two path problems it has no words for. The GUI calls this
    before a loader runs, so no loader ever blocks on a FIFO. A folder passes only when it holds
    a ``config.json`` (a Hugging Face checkpoint); the adapter checks every file it then reads.
    """
    if len(os.fsencode(path.name)) > _name_max(path):
        raise ModelLoadError(f"{quote(path.name)}: file name too long "
                             f"({len(os.fsencode(path.name))} bytes)")
    if _folder_adapter(path) is not None:
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelLoadError(f"{quote(path.name)}: permission denied")
        return
    try:
        regular_file(path)
    except ValueError:  # os.stat refuses a NUL byte before asking the system
        raise ModelLoadError(f"{quote(str(path))}: the file name contains a NUL byte") from None


def _name_max(path: Path) -> int:
    """The longest file name the folder of `path` allows (255 on every common file system)."""
    try:
        return os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder, or no pathconf (Windows)
        return 255


def _make_printable(error: SlimscopeError) -> None:
    """Escape newlines, ANSI escapes and other control characters in `error`'s message.

    Adapters name the file in their messages; a name is user-controlled and may hold any of
    these. The exception keeps its type (the GUI asks for trust on UntrustedPickleError).
    """
    message = str(error)
    printable = "".join(char if char.isprintable() else ascii(char)[1:-1] for char in message)
    if printable != message:
        error.args = (printable,)

"""Atomic writes: a temporary file in the target folder, then a rename.

An interrupted or failed write leaves no partial file and any previous file of the same name
intact. Refuses to write over the model the user opened.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from engine.errors import SlimscopeError


def refuse_input_overwrite(destination: Path, *inputs: Path) -> None:
    """Raise if `destination` is one of the input model files (or the same file by inode)."""
    for source in inputs:
        if destination.resolve() == Path(source).resolve() or (
            destination.exists() and Path(source).exists()
            and os.path.samefile(destination, source)
        ):
            raise SlimscopeError(f"refusing to overwrite the input model {source}; choose "
                                 "another output name")


@contextlib.contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; on success it replaces `destination`."""
    destination = Path(destination)
    folder = destination.parent if str(destination.parent) else Path(".")
    if not folder.is_dir():
        raise SlimscopeError(f"{folder}: no such folder")
    handle, temp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part",
                                         dir=folder)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        os.replace(temp, destination)
    finally:
        if temp.exists():
            temp.unlink()


def atomic_write_bytes(destination: Path, data: bytes) -> None:
    with atomic_path(destination) as temp:
        temp.write_bytes(data)


def atomic_write_text(destination: Path, text: str) -> None:
    atomic_write_bytes(destination, text.encode("utf-8"))

"""One validation layer between bytes on disk and tensors in memory, shared by every format.

A file can claim anything: a shape whose product overflows, an offset past its end, a string
dtype, an external weight file at ``/etc/passwd``, a zip member that inflates a thousandfold, two
zip members of the same name. Every adapter asks this module before it trusts such a claim, and
each refusal is a :class:`FormatError` naming the file, the tensor and the rule it broke, so the
user gets one line and nothing is read that should not be.
"""

from __future__ import annotations

import math
import os
import reprlib
import stat
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from engine.errors import FormatError, SlimscopeError

#: Largest element count a tensor may claim (2**40, 4 TiB of bytes at fp32): a guard against
#: overflowing products, not a size policy; the file-size checks below are the real bound.
MAX_ELEMENTS = 1 << 40
#: A zip member may inflate to at most this many times its compressed size (deflate's best on
#: all-zero data is about 1000×; real weights compress 1.1-3×, JSON and pickles up to ~20×).
MAX_ZIP_RATIO = 200
#: Members smaller than this inflated are never refused for their ratio (headers, tiny JSON).
ZIP_RATIO_FLOOR = 1 << 20
#: All members of one archive together may inflate to at most this much beyond the file size.
MAX_ZIP_EXPANSION = 16 << 30
#: Longest quoted value in an error message.
QUOTE_LIMIT = 80

_NUMERIC_KINDS = frozenset("biuf")


class _BoundedRepr(reprlib.Repr):
    """reprlib's bounded repr, made safe for integers too long for ``repr()`` to print."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxstring = 60
        self.maxlong = 30
        self.maxother = 40
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = 5

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:  # repr() refuses past 4,300 digits; this stays cheap
            return f"<an integer of about {int(x.bit_length() * 0.30103)} digits>"
        return super().repr_int(x, level)


_BOUNDED_REPR = _BoundedRepr()


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` cut to about `limit` characters, for any value a parser can produce.

    It never builds the full repr first, so a 100 MB string, a list
    nested 50,000 deep or a 5,000-digit integer cost nothing and raise nothing.
    """
    try:
        text = _BOUNDED_REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value's own __repr__ may raise anything
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def regular_file(path: Path, what: str = "model",
                 error: type[SlimscopeError] = FormatError) -> os.stat_result:
    """The file's stat, or one `error` line saying why it is not an ordinary readable file.

    FIFOs would block forever, devices and `/proc` files have no honest size; none of them is
    a model (or plan, or project). Asked without opening the file, so nothing blocks.
    """
    label = quote(path.name or str(path))
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{label}: no such file") from None
    except PermissionError:
        raise error(f"{label}: permission denied") from None
    except OSError as exc:
        raise error(f"{label}: cannot open ({exc.strerror or type(exc).__name__})") from None
    refuse_special(info, path, label, what, error)
    if not os.access(path, os.R_OK):
        raise error(f"{label}: permission denied")
    return info


def refuse_special(info: os.stat_result, path: Path, label: str, what: str,
                   error: type[SlimscopeError] = FormatError) -> None:
    """Only regular files: a FIFO blocks, a device or /proc file has no honest size."""
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        raise error(f"{label}: is a folder, not a {what} file")
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise error(f"{label}: is {kind}, not a {what} file")
    if _in_proc(path):
        raise error(f"{label}: is a /proc or /sys file, not a {what} file")


def _in_proc(path: Path) -> bool:
    try:
        resolved = Path(os.path.realpath(path))
    except (OSError, ValueError):
        return False
    return resolved.parts[:2] in (("/", "proc"), ("/", "sys"))


def element_count(where: str, shape: Sequence[object]) -> int:
    """The product of `shape`, after checking every dimension is a non-negative integer."""
    dims: list[int] = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise FormatError(f"{where}: dimension {quote(dim)} is not an integer")
        if dim < 0:
            raise FormatError(f"{where}: shape {quote(list(shape))} has a negative dimension")
        dims.append(int(dim))
    count = math.prod(dims)
    if count > MAX_ELEMENTS:
        raise FormatError(f"{where}: shape {quote(list(shape))} claims {count:.3g} elements, "
                          "more than any real tensor")
    return count


def numeric_dtype(where: str, dtype: object) -> np.dtype:
    """`dtype` as numpy's, refusing strings, objects and anything else that is not a number."""
    try:
        resolved = np.dtype(dtype)  # type: ignore[arg-type]
    except TypeError:
        raise FormatError(f"{where}: dtype {quote(dtype)} is not a numeric type") from None
    # ml_dtypes' bfloat16 / float8 / int4 report kind 'V' but are numbers.
    if resolved.kind not in _NUMERIC_KINDS and not _is_ml_dtype(resolved):
        raise FormatError(f"{where}: dtype {resolved.name} is not a numeric type")
    return resolved


def _is_ml_dtype(dtype: np.dtype) -> bool:
    return dtype.kind == "V" and dtype.names is None and dtype.itemsize in (1, 2)


def span_inside(where: str, offset: int, length: int, file_size: int) -> None:
    """Check that bytes [offset, offset + length) lie inside a file of `file_size` bytes."""
    if offset < 0 or length < 0:
        raise FormatError(f"{where}: negative offset or length ({offset}, {length})")
    if offset + length > file_size:
        raise FormatError(f"{where}: its data (bytes {offset}..{offset + length}) lies past the "
                          f"end of the file ({file_size} bytes)")


def tensor_bytes(where: str, shape: Sequence[object], itemsize: int, available: int) -> int:
    """Bytes a tensor of `shape` needs; refused when more than the `available` bytes."""
    needed = element_count(where, shape) * itemsize
    if needed > available:
        raise FormatError(f"{where}: shape {quote(list(shape))} needs {needed} bytes but only "
                          f"{available} are stored")
    return needed


def inside_folder(folder: Path, location: str, where: str) -> Path:
    """`location` resolved under `folder`, symlinks followed; refused when it leads outside.

    Model files name their companions (ONNX external data, a project's model): a crafted name
    such as ``/etc/passwd`` or ``../../x``, or a symlink pointing out, must not be read.
    """
    if not location or "\x00" in location:
        raise FormatError(f"{where}: empty or invalid file location {quote(location)}")
    if os.path.isabs(location):
        raise FormatError(f"{where}: file location {quote(location)} is absolute; only files in "
                          "the model's own folder are read")
    base = Path(os.path.realpath(folder))
    target = Path(os.path.realpath(base / location))
    if target != base and base not in target.parents:
        raise FormatError(f"{where}: file location {quote(location)} leads outside the model's "
                          "folder; only files in that folder are read")
    return target


def check_zip(archive: zipfile.ZipFile, file_size: int, name: str,
              members: Iterable[str] | None = None) -> None:
    """Refuse duplicate member names and members or totals that inflate beyond reason.

    Python's zipfile reads the last of two same-named members and torch's reader the first, so
    a checker and a loader could see different bytes: such archives are refused outright.
    """
    infos = archive.infolist()
    seen: set[str] = set()
    total = 0
    wanted = set(members) if members is not None else None
    for info in infos:
        if info.filename in seen:
            raise FormatError(f"{quote(name)}: the archive holds two members named "
                              f"{quote(info.filename)}; refusing an ambiguous archive")
        seen.add(info.filename)
        if wanted is not None and info.filename not in wanted:
            continue
        total += info.file_size
        limit = max(info.compress_size * MAX_ZIP_RATIO, ZIP_RATIO_FLOOR)
        if info.file_size > limit:
            raise FormatError(f"{quote(name)}: member {quote(info.filename)} claims to inflate "
                              f"to {info.file_size} bytes from {info.compress_size} (a zip bomb?)")
    if total > file_size + MAX_ZIP_EXPANSION:
        raise FormatError(f"{quote(name)}: its members claim {total} bytes in all, far more "
                          "than the archive holds")


def read_member(archive: zipfile.ZipFile, member: str, name: str,
                limit: int | None = None) -> bytes:
    """A member's bytes, reading at most its declared size (or `limit`) and no further.

    The declared size is checked by :func:`check_zip`; this also stops a member whose stream
    inflates past what its header declared.
    """
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise FormatError(f"{quote(name)}: the archive has no member {quote(member)}") from None
    cap = info.file_size if limit is None else min(limit, info.file_size)
    with archive.open(info) as stream:
        data = stream.read(cap + 1)
    if len(data) > cap:
        raise FormatError(f"{quote(name)}: member {quote(member)} is larger than allowed "
                          f"({cap} bytes)")
    return data

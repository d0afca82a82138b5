"""Every file the tool writes: checked before any work, written to a temp file, renamed last.

:func:`check_outputs` refuses, before a command starts its slow part, any output that is one of
the command's inputs (model, plan, data, sensitivity results; by resolved path and by inode), an
existing folder or special file, in a missing or unwritable folder, or a name too long for it.
:func:`atomic_path` then writes beside the destination under a name that says whose it is
(``.NAME.slimscope-PID-XXXXXXXX.part``) and renames it into place only when the caller's block
ends without error: an error, a cancel or an interrupt leaves any previous file untouched. Temp
files get the permissions an ordinary ``open()`` would give (``0666 & ~umask``),
are listed in a registry the CLI's SIGTERM/SIGHUP handler empties, and any such file left by a
process that no longer runs (a ``kill -9``, a power cut) is removed by the next write into that
folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import threading
from pathlib import Path
from typing import Iterable, Iterator, Union

from engine.errors import SlimscopeError
from engine.formats.guard import QUOTE_LIMIT, quote

#: Marks a temp file as ours; the pid after it says which process is writing it.
TEMP_TAG = "slimscope"
PART_SUFFIX = ".part"
_PART_NAME = re.compile(rf"^\..*\.{TEMP_TAG}-(\d+)-[a-z0-9_]+{re.escape(PART_SUFFIX)}$",
                        re.DOTALL)
#: Bytes of the destination's name kept in the temp name: the temp name must stay under the
#: folder's name limit (255 bytes) even when the destination's own name is close to it.
_NAME_KEPT = 100
_FALLBACK_NAME_MAX = 255
_CREATE_TRIES = 100

#: Why a write failed, in words, by errno (strerror is often absent or locale-dependent).
_WRITE_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large",
    errno.EXDEV: "temp file and destination are on different file systems",
    errno.EIO: "input/output error",
}

#: An input: a path, or (what it is, path) so that a refusal can say "the input plan".
Input = Union[str, Path, None, tuple[str, Union[str, Path, None]]]

_live_temps: set[Path] = set()
_live_lock = threading.Lock()


class OutputError(SlimscopeError):
    """An output cannot be written where the user asked (it is an input, a folder, unwritable)."""


# -- checking outputs before any work ------------------------------------------------------------
def check_outputs(outputs: Iterable[str | Path | None], inputs: Iterable[Input]) -> None:
    """Raise one line if any output would overwrite an input or cannot be written at all.

    Call it before the slow part of a command: finding out after an hour of compression that
    ``--report`` points at a folder, or worse, at the model, is what this prevents. ``None`` and
    ``"-"`` (stdout) entries are skipped. An output inside an input *folder* (image data) is
    refused too: it would change the data set.
    """
    wanted = [Path(o) for o in outputs if o is not None and str(o) != "-"]
    seen: list[Path] = []
    inputs = list(inputs)
    for output in wanted:
        refuse_input_overwrite(output, *inputs)
        for earlier in seen:
            if _same_file(output, earlier):
                raise OutputError(f"{quote_path(output)} is given as two different outputs; "
                                  "choose another name for one of them")
        seen.append(output)
        check_writable(output)


def refuse_input_overwrite(destination: Path, *inputs: Input) -> None:
    """Raise if `destination` is one of `inputs` (by resolved path or inode), or inside an
    input folder. A bare path is taken to be the model."""
    destination = Path(destination)
    for item in inputs:
        role, source = item if isinstance(item, tuple) else ("model", item)
        if source is None or str(source) == "-":
            continue
        source = Path(source)
        if _same_file(destination, source):
            raise OutputError(f"refusing to overwrite the input {role} {quote_path(source)}; "
                              "choose another output name")
        if source.is_dir() and _inside(destination, source):
            raise OutputError(f"refusing to write {quote(destination.name)} inside the input "
                              f"{role} folder {quote_path(source)}; choose another folder")


def check_writable(destination: Path) -> None:
    """Raise one line unless a file can be created beside `destination` and renamed onto it.

    Permission bits do not stop root, and a read-only mount or ``/proc`` is only found out by
    trying, so this creates (and at once removes) a real temp file in the folder.
    """
    destination = Path(destination)
    shown = quote_path(destination)
    try:
        info = os.stat(destination)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise write_error(exc, destination) from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise OutputError(f"cannot write {shown}: it is an existing folder; give a file name")
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise OutputError(f"cannot write {shown}: it exists and is not a regular file "
                          "(a device, pipe or socket)")
    folder = _folder(destination)
    if not folder.exists():
        raise OutputError(f"cannot write {shown}: no such folder")
    if not folder.is_dir():
        raise OutputError(f"cannot write {shown}: {quote_path(folder)} is not a folder")
    if _in_proc(folder):
        raise OutputError(f"cannot write {shown}: /proc and /sys hold no ordinary files")
    if len(os.fsencode(destination.name)) > _name_max(folder):
        raise OutputError(f"cannot write {shown}: file name too long "
                          f"({len(os.fsencode(destination.name))} bytes, at most "
                          f"{_name_max(folder)})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {shown}: permission denied")
    remove_stale_temps(folder)
    with _temp_file(destination):
        pass


def data_input(role: str, spec: str | None) -> tuple[str, Path | None]:
    """A data spec (as :func:`engine.data.open_data` reads it) as an input never to overwrite:
    its file or folder, or None for the built-in sources ('demo', 'demo:train',
    'synthetic[:N]'), which are not files."""
    if not spec or spec.partition(":")[0] in ("demo", "synthetic"):
        return role, None
    return role, Path(spec).expanduser()


# -- writing -----------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; it replaces `destination` only when the
    block ends without an exception, so whatever the block does last is the last cancellable
    step before the rename."""
    destination = Path(destination)
    folder = _folder(destination)
    if not folder.is_dir():
        raise OutputError(f"cannot write {quote_path(destination)}: no such folder")
    remove_stale_temps(folder)
    with _temp_file(destination) as temp:
        umask_mode = stat.S_IMODE(os.stat(temp).st_mode)
        yield temp
        try:
            _restore_mode(temp, umask_mode)
            os.replace(temp, destination)
        except OSError as exc:
            raise write_error(exc, destination) from None


def _restore_mode(temp: Path, mode: int) -> None:
    """Give `temp` the umask's mode again where its writer replaced the file: safetensors
    writes 0600 through its own temp file, which left exported models unreadable to the group."""
    if stat.S_IMODE(os.stat(temp).st_mode) != mode:
        os.chmod(temp, mode)


def atomic_write_bytes(destination: Path, data: bytes) -> None:
    with atomic_path(destination) as temp:
        try:
            temp.write_bytes(data)
        except OSError as exc:
            raise write_error(exc, destination) from None


def atomic_write_text(destination: Path, text: str) -> None:
    atomic_write_bytes(destination, text.encode("utf-8"))


def write_error(exc: OSError, destination: Path) -> OutputError:
    """One line naming the (quoted) file and the reason, for an OSError met while writing it."""
    reason = _WRITE_REASONS.get(exc.errno or -1) or (exc.strerror or type(exc).__name__).lower()
    return OutputError(f"cannot write {quote_path(destination)}: {reason}")


# -- temp files: named as ours, registered while alive, removed when their writer is gone -------
@contextlib.contextmanager
def _temp_file(destination: Path) -> Iterator[Path]:
    """A new empty temp file beside `destination`, registered as live until the block ends and
    removed then unless the block renamed it away.

    Created with mode 0666 like any ``open()``, so the umask applies (``mkstemp``'s 0600 is for
    secrets, and would leave exported models unreadable to the user's group). The name is
    registered *before* the file exists, so a signal at any moment finds it.
    """
    folder = _folder(destination)
    prefix = f".{_shortened(destination.name)}.{TEMP_TAG}-{os.getpid()}-"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(_CREATE_TRIES):
        temp = folder / f"{prefix}{secrets.token_hex(4)}{PART_SUFFIX}"
        with _live_lock:
            _live_temps.add(temp)
        try:
            os.close(os.open(temp, flags, 0o666))
            break
        except FileExistsError:
            _forget(temp)
        except OSError as exc:
            _forget(temp)
            raise write_error(exc, destination) from None
    else:
        raise OutputError(f"cannot write {quote_path(destination)}: no free temp file name")
    try:
        yield temp
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        _forget(temp)


def _forget(temp: Path) -> None:
    with _live_lock:
        _live_temps.discard(temp)


def live_temps() -> list[Path]:
    """The temp files this process is writing now."""
    with _live_lock:
        return sorted(_live_temps)


def remove_live_temps() -> None:
    """Remove every temp file this process is writing (the CLI's SIGTERM/SIGHUP handler).

    Takes no lock: a signal handler runs in the main thread and may have interrupted a holder.
    """
    for temp in list(_live_temps):
        with contextlib.suppress(OSError):
            temp.unlink()


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temp files of ours in `folder` whose writing process no longer runs; return them.

    A file named for this very process but not in its registry was left by an earlier process
    that had the same pid (pids are reused, quickly so in containers).
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    own = set(live_temps())
    for entry in entries:
        match = _PART_NAME.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        pid, path = int(match.group(1)), Path(entry.path)
        alive = path in own if pid == os.getpid() else _process_alive(pid)
        if not alive:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


# -- helpers ------------------------------------------------------------------------------------
def quote_path(path: str | Path, limit: int = QUOTE_LIMIT) -> str:
    """Like :func:`engine.formats.guard.quote` (repr, so control characters are escaped) but
    cut at the front: of a long path, the file name at its end is the part worth seeing."""
    text = repr(str(path))
    return text if len(text) <= limit else "'..." + text[len(text) - limit + 4:]


def _shortened(name: str) -> str:
    """`name` cut to at most `_NAME_KEPT` bytes on disk, at a character boundary."""
    name = name[:_NAME_KEPT]  # a character is at least one byte
    while len(os.fsencode(name)) > _NAME_KEPT:
        name = name[:-1]
    return name


def _folder(destination: Path) -> Path:
    return destination.parent if str(destination.parent) else Path(".")


def _same_file(first: Path, second: Path) -> bool:
    try:
        if Path(os.path.realpath(first)) == Path(os.path.realpath(second)):
            return True
        return first.exists() and second.exists() and os.path.samefile(first, second)
    except (OSError, ValueError):
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return False


def _in_proc(path: Path) -> bool:
    try:
        parts = Path(os.path.realpath(path)).parts
    except (OSError, ValueError):
        return False
    return parts[:2] in (("/", "proc"), ("/", "sys"))


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return _FALLBACK_NAME_MAX


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return True  # cannot tell: keep the file
    return True

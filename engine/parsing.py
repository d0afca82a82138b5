"""Reading the text files users hand us (plans, sensitivity results, projects), bounded.

A file of a few hundred bytes must not be able to take minutes or gigabytes to read: YAML
aliases can expand exponentially ("billion laughs"), deep nesting can exhaust the stack, a FIFO
blocks whoever opens it, and a 5,000-digit number makes ``int()`` raise. Everything here turns
such input into one :class:`SlimscopeError` line (the caller picks the subclass, e.g.
``PlanError``) that quotes at most a few dozen characters of the bad value.

Limits, measured on this project's CI machine:

* JSON text: :data:`MAX_JSON_BYTES` (16 MiB). The C parser reads that in under a second; the
  worst case (``[{}, {}, ...]``) peaks near 450 MB. A sensitivity file with 20 sparsity and 8
  bit levels takes about 5 KB per layer, so this fits some 3,000 swept layers.
* YAML text: :data:`MAX_YAML_BYTES` (1 MiB). PyYAML composes in pure Python at about 3 s per
  MiB of a real plan (some 6,000 layer entries per MiB) and up to 8 s and 300 MB per MiB of
  hostile text. Bigger plans can be saved as JSON, which reads 16 MiB in about a second.
* Nesting: :data:`MAX_DEPTH` (64) levels of mappings and lists; a plan needs five.
* YAML anchors and aliases are refused outright: a plan never needs them, and refusing is
  simpler to trust than an expansion budget.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from engine.errors import SlimscopeError, one_line
from engine.formats.guard import quote, refuse_special

#: Largest JSON text read (sensitivity results, projects, JSON plans).
MAX_JSON_BYTES = 16 << 20
#: Largest YAML text read (plans); see the module docstring for why it is smaller.
MAX_YAML_BYTES = 1 << 20
#: Deepest nesting of mappings and lists accepted in any file read here.
MAX_DEPTH = 64

ErrorClass = type[SlimscopeError]


# -- reading a file's text ---------------------------------------------------------------------
def read_text(path: str | Path, *, what: str, limit: int,
              error: ErrorClass = SlimscopeError) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes, or one `error` line.

    The file is stat'ed before it is opened (so a FIFO or a device is never opened at all) and
    fstat'ed after (so one swapped in meanwhile is still refused); the open itself does not
    block, and no more than `limit` + 1 bytes are ever read.
    """
    path = Path(path)
    label = f"{what} {quote(path.name or str(path))}"
    try:
        refuse_special(os.stat(path), path, label, what, error)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise error(f"{label}: cannot read it ({_os_reason(exc)})") from None
    try:
        with os.fdopen(fd, "rb") as stream:
            info = os.fstat(stream.fileno())
            refuse_special(info, path, label, what, error)
            if info.st_size > limit:
                raise error(f"{label}: {_size(info.st_size)} is more than the {_size(limit)} "
                            f"a {what} file may hold")
            data = stream.read(limit + 1)
    except OSError as exc:
        raise error(f"{label}: cannot read it ({_os_reason(exc)})") from None
    if len(data) > limit:
        raise error(f"{label}: more than the {_size(limit)} a {what} file may hold")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{label}: cannot read it (not UTF-8 text at byte {exc.start})") from None


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or type(exc).__name__


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count} bytes"


# -- parsing --------------------------------------------------------------------------------------
def read_json(path: str | Path, *, what: str = "JSON", limit: int = MAX_JSON_BYTES,
              error: ErrorClass = SlimscopeError) -> Any:
    """A JSON file's content, bounded in size and nesting, or one clear `error` line."""
    path = Path(path)
    text = read_text(path, what=what, limit=limit, error=error)
    return load_json(text, f"{what} {quote(path.name or str(path))}", error=error)


def load_json(text: str | bytes, where: str, *, error: ErrorClass = SlimscopeError) -> Any:
    """Parsed JSON `text`, nested at most :data:`MAX_DEPTH` deep, or one `error` line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON: {exc.msg} (line {exc.lineno}, column "
                    f"{exc.colno})") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise error(f"{where}: not valid JSON: {_cut(one_line(exc))}") from None
    check_depth(data, where, error=error)
    return data


class _Refused(Exception):
    """Raised inside the YAML composer; turned into the caller's error class outside it."""


class _BoundedYamlLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses anchors, aliases and deep nesting while composing.

    The check runs on each event before the node is built, so an alias bomb is refused at its
    first anchor and a 50,000-deep document at level :data:`MAX_DEPTH`, long before the
    composer's recursion could reach Python's limit.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(f"YAML anchors and aliases (& and *) are not accepted (line {line})")
        nests = isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
        if nests:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep (line {line})")
        try:
            return super().compose_node(parent, index)
        finally:
            if nests:
                self._depth -= 1


def load_yaml(text: str, where: str, *, error: ErrorClass = SlimscopeError) -> Any:
    """Parsed YAML `text` (safe tags only, no aliases, bounded nesting), or one `error` line."""
    loader = _BoundedYamlLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as exc:
        raise error(f"{where}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = exc.problem or exc.context or "malformed"
        raise error(f"{where}: not valid YAML: {_cut(one_line(problem))}{at}") from None
    except RecursionError:
        raise error(f"{where}: not valid YAML: nested more than {MAX_DEPTH} levels deep") from None
    except (yaml.YAMLError, ValueError, OverflowError, TypeError) as exc:
        # ValueError: a 5,000-digit integer or a timestamp such as 2024-13-45.
        raise error(f"{where}: not valid YAML: {_cut(one_line(exc))}") from None
    finally:
        loader.dispose()


def _cut(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_depth(value: Any, where: str, *, limit: int = MAX_DEPTH,
                error: ErrorClass = SlimscopeError) -> None:
    """Refuse mappings and lists nested more than `limit` deep, walking without recursion.

    For data built in memory (the GUI, tests) as well as parsed: code that later prints,
    copies or saves the value recurses, and must not hit Python's recursion limit.
    """
    containers = (Mapping, list, tuple, set, frozenset)
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, containers) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise error(f"{where}: nested more than {limit} levels deep")
        children = node.values() if isinstance(node, Mapping) else node
        for child in children:
            if isinstance(child, containers):
                stack.append((child, depth + 1))


# -- typed fields of a parsed mapping --------------------------------------------------------------
REQUIRED: Any = object()

_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (numbers.Integral,), "number": (numbers.Real,), "bool": (bool, np.bool_),
    "list": (list, tuple), "mapping": (Mapping,),
}
#: Exact types that need no further check (parsed JSON holds only these, mostly).
_FAST: dict[str, tuple[type, ...]] = {"str": (str,), "number": (float,), "list": (list,),
                                      "mapping": (dict,), "bool": (bool,)}
#: Integers beyond 64 bits are no real count, and JSON writers choke past 4,300 digits.
_INT_BOUND = 1 << 63
_KIND_NAMES = {"str": "a string", "int": "an integer", "number": "a number",
               "bool": "true or false", "list": "a list", "mapping": "a mapping"}


def expect(value: Any, kind: str, where: str, *, error: ErrorClass = SlimscopeError) -> Any:
    """`value` when it is of `kind` (see :data:`_KINDS`; booleans are not numbers here),
    else one `error` line naming `where`, what was expected and (quoted) what was found.

    Numbers come back as Python's own int or float (numpy scalars from data built in memory
    included), so what is read can be saved as JSON again.
    """
    if type(value) in _FAST.get(kind, ()):  # the common case, without the ABC checks below
        return value
    wrong_bool = isinstance(value, (bool, np.bool_)) and kind in ("int", "number")
    if wrong_bool or not isinstance(value, _KINDS[kind]):
        raise error(f"{where}: expected {_KIND_NAMES[kind]}, got {quote(value, 48)}")
    if kind == "int":
        if not -_INT_BOUND < value < _INT_BOUND:
            raise error(f"{where}: {quote(value, 48)} is out of range")
        return int(value)
    if kind == "bool":
        return bool(value)
    if kind == "number":
        try:
            as_float = float(value)
        except OverflowError:
            raise error(f"{where}: {quote(value, 48)} is out of range") from None
        return value if isinstance(value, (int, float)) else as_float
    return value


def typed_field(data: Mapping[str, Any], key: str, kind: str, where: str, *,
          default: Any = REQUIRED, error: ErrorClass = SlimscopeError) -> Any:
    """``data[key]`` checked by :func:`expect`; a missing key is an error unless a `default`
    is given, and with ``default=None`` an explicit null is accepted too."""
    if key not in data:
        if default is REQUIRED:
            raise error(f"{where}: missing field {key!r}")
        return default
    value = data[key]
    if value is None and default is None:
        return None
    return expect(value, kind, f"{where}.{key}", error=error)


def list_of(value: Any, kind: str, where: str, *, optional_items: bool = False,
            error: ErrorClass = SlimscopeError) -> list[Any]:
    """`value` as a list whose every item is of `kind` (or None, with `optional_items`)."""
    return [None if optional_items and item is None
            else expect(item, kind, f"{where}[{index}]", error=error)
            for index, item in enumerate(expect(value, "list", where, error=error))]

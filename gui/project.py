"""A project file: everything needed to pick the work up again, as one JSON document.

It holds the model's path, the data source spec and sensitivity method last used, the plan as
plain data (exactly what a plan file holds) and the sensitivity results (exactly what the
engine's sensitivity JSON holds). Paths are stored relative to the project file when they lie
beside or below it, so a project folder can be moved or shared as a whole; an absolute copy is
kept as a fallback. Nothing here needs Qt: the window reads and writes :class:`Project` values.

A project file may come from anyone, so :meth:`Project.load` checks every field's type before
anything it names is opened (one line naming the field otherwise), and lists the files it names
outside the project's folder in :attr:`Project.outside_paths`: the window opens those only after
the user agrees, so a shared project cannot quietly point the app at ``~/.ssh`` or ``/etc``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.data import DataSpec
from engine.errors import SlimscopeError, one_line
from engine.formats.guard import quote
from engine.parsing import read_json
from engine.plan import Plan
from engine.safe_write import atomic_write_text
from engine.sensitivity import METHODS, Sensitivity

PROJECT_VERSION = 1
PROJECT_SUFFIX = ".slimproj"
PROJECT_FILTER = f"Slimscope projects (*{PROJECT_SUFFIX});;JSON files (*.json);;All files (*)"
#: Data specs that name no file: the bundled demo split and synthetic inputs (see engine.data).
_NAMED_SPECS = ("demo", "synthetic")


@dataclass
class DataChoice:
    """Where sensitivity data comes from and how it is measured; `spec` as engine.data.open_data
    reads it (None for the data-free method), `limit` samples at most (0 = all)."""

    spec: str | None = "demo"
    method: str = "exact"
    limit: int = 512
    #: Also measure truncated-SVD ranks (engine.sensitivity.DEFAULT_RANKS), so allocation may
    #: factorize layers too.
    ranks: bool = False

    def data_spec(self) -> DataSpec:
        """The engine's one data-spec type for this choice (what engine.workflows takes)."""
        return DataSpec(self.spec, limit=self.limit)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "method": self.method, "limit": self.limit, "ranks": self.ranks}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataChoice:
        return cls(spec=data.get("spec"), method=str(data.get("method", "exact")),
                   limit=int(data.get("limit", 512)), ranks=bool(data.get("ranks", False)))


@dataclass
class Project:
    model_path: Path | None = None
    data: DataChoice = field(default_factory=DataChoice)
    #: The plan in its plain-data form (Plan.to_dict()).
    plan: dict[str, Any] = field(default_factory=dict)
    sensitivity: Sensitivity | None = None
    #: The target the user last asked the allocator for, as the target panel stores it.
    target: dict[str, Any] = field(default_factory=dict)
    #: Files the project names (model, data) that resolve outside its folder, symlinks
    #: followed; set by :meth:`from_dict`/:meth:`load`, never saved. Open them only after the
    #: user agrees.
    outside_paths: list[Path] = field(default_factory=list, compare=False)

    def to_dict(self, folder: Path | None = None) -> dict[str, Any]:
        return {
            "version": PROJECT_VERSION,
            "model": _path_entry(self.model_path, folder),
            "data": {**self.data.to_dict(), "spec": _spec_entry(self.data.spec, folder)},
            "plan": self.plan,
            "sensitivity": self.sensitivity.to_dict() if self.sensitivity else None,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, data: Any, folder: Path | None = None) -> Project:
        """A project from its JSON data, every field's type checked first (see :func:`validate`)."""
        validate(data)
        plan = dict(data.get("plan") or {})
        try:
            Plan.from_dict(plan)
        except Exception as exc:  # noqa: BLE001 - PlanError, or a type the plan code did not expect
            raise SlimscopeError(f"the project's plan is invalid: {_describe(exc)}") from None
        raw_data = dict(data.get("data") or {})
        choice = DataChoice.from_dict({**raw_data, "spec": _spec_from(raw_data.get("spec"), folder)})
        sensitivity = data.get("sensitivity")
        try:
            results = Sensitivity.from_dict(sensitivity) if sensitivity else None
        except Exception as exc:  # noqa: BLE001 - every malformed result is one line
            raise SlimscopeError(f"the project's sensitivity results are invalid: "
                                 f"{_describe(exc)}") from None
        model_path = _path_from(data.get("model"), folder)
        named = [model_path] + ([Path(choice.spec)] if choice.spec and not _is_named_spec(choice.spec)
                                else [])
        outside = [path for path in named
                   if path is not None and folder is not None and not _inside(folder, path)]
        return cls(
            model_path=model_path,
            data=choice,
            plan=plan,
            sensitivity=results,
            target=dict(data.get("target") or {}),
            outside_paths=outside,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        text = json.dumps(self.to_dict(path.resolve().parent), indent=1) + "\n"
        atomic_write_text(path, text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Project:
        """Read and validate a project file; every failure is one SlimscopeError line.

        read_json reads only a regular file (a FIFO would block the window forever), bounded in
        size and nesting.
        """
        path = Path(path)
        try:
            data = read_json(path, what="project")
            return cls.from_dict(data, path.resolve().parent)
        except SlimscopeError:
            raise
        except RecursionError:
            raise SlimscopeError(f"{quote(path.name)}: the project nests too deeply to read") from None
        except Exception as exc:  # noqa: BLE001 - a project file must never crash the window
            raise SlimscopeError(f"cannot open project {quote(path.name)}: {_describe(exc)}") from None


# -- the schema: every field's type, checked before anything is opened -----------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_path_entry(value: Any) -> bool:
    """A path string, or ``{"path": str, "relative"?: str}`` as :func:`_path_entry` writes."""
    if isinstance(value, str):
        return "\x00" not in value
    return (isinstance(value, dict) and isinstance(value.get("path"), str)
            and "\x00" not in value["path"]
            and set(value) <= {"path", "relative"}
            and isinstance(value.get("relative", ""), str) and "\x00" not in value.get("relative", ""))


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


_PATH_ENTRY = "a path or {\"path\": ..., \"relative\": ...}"
#: field -> (check, what it should be); a missing optional field takes its default.
_TOP_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "version": (_is_int, "a whole number"),
    "model": (_optional(_is_path_entry), f"{_PATH_ENTRY} or null"),
    "data": (_optional(_is_dict), "an object or null"),
    "plan": (_optional(_is_dict), "an object or null"),
    "sensitivity": (_optional(_is_dict), "an object or null"),
    "target": (_optional(_is_dict), "an object or null"),
}
_DATA_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "spec": (_optional(_is_path_entry), f"'demo', 'synthetic', {_PATH_ENTRY} or null"),
    "method": (lambda value: isinstance(value, str) and value in METHODS,
               f"one of {', '.join(METHODS)}"),
    "limit": (lambda value: _is_int(value) and value >= 0, "a whole number ≥ 0"),
    "ranks": (lambda value: isinstance(value, bool), "true or false"),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: What the target panel stores (gui/panels/pareto.py target_settings).
_TARGET_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "mode": (lambda value: isinstance(value, str), "a text"),
    "size": (lambda value: isinstance(value, str) and len(value) <= 64, "a short text such as '1/4'"),
    "drop": (lambda value: _is_number(value) and value >= 0, "a number ≥ 0"),
    "check": (lambda value: isinstance(value, bool), "true or false"),
}


def validate(data: Any) -> None:
    """Refuse, with one line naming the field and quoting its value, any field of the wrong type.

    Runs before any of the project's files is looked at; unknown fields are ignored (a newer
    version of the app may add some), missing ones take their defaults.
    """
    if not isinstance(data, dict) or "version" not in data:
        raise SlimscopeError("not a Slimscope project: no version field")
    if not _is_int(data["version"]) or data["version"] != PROJECT_VERSION:
        raise SlimscopeError(f"project version {quote(data['version'])} is not supported "
                             f"(expected {PROJECT_VERSION})")
    _check_fields("", data, _TOP_FIELDS)
    if data.get("data") is not None:
        _check_fields("data.", data["data"], _DATA_FIELDS)
    if data.get("target") is not None:
        _check_fields("target.", data["target"], _TARGET_FIELDS)


def _check_fields(prefix: str, data: dict[str, Any],
                  fields: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    for name, (check, expected) in fields.items():
        if name in data and not check(data[name]):
            raise SlimscopeError(f"project field {prefix}{name} should be {expected}, "
                                 f"not {quote(data[name])}")


def _describe(exc: BaseException) -> str:
    """One line for `exc`: ours as written, anyone else's prefixed with its type."""
    if isinstance(exc, SlimscopeError):
        return one_line(exc)
    return f"{type(exc).__name__}: {one_line(exc)}"


# -- paths: relative when beside the project, absolute as a fallback -----------------------------
def _path_entry(path: Path | None, folder: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    absolute = Path(path).expanduser().resolve()
    entry = {"path": str(absolute)}
    if folder is not None:
        try:
            entry["relative"] = Path(os.path.relpath(absolute, folder)).as_posix()
        except ValueError:  # another drive on Windows: no relative path exists
            pass
        if entry.get("relative", "").startswith("../../"):
            entry.pop("relative")  # far away: the absolute path is the meaningful one
    return entry


def _path_from(entry: Any, folder: Path | None) -> Path | None:
    """The path an entry names; relative paths are read against the project's folder."""
    if not entry:
        return None
    if isinstance(entry, str):
        entry = {"path": entry}
    relative = entry.get("relative")
    if relative and folder is not None and (folder / relative).exists():
        return (folder / relative).resolve()
    path = Path(entry["path"]).expanduser()
    return (folder / path).resolve() if folder is not None and not path.is_absolute() else path


def _inside(folder: Path, path: Path) -> bool:
    """True when `path`, symlinks followed, lies in `folder` or below it."""
    base = Path(os.path.realpath(folder))
    target = Path(os.path.realpath(path))
    return target == base or base in target.parents


def _is_named_spec(spec: str) -> bool:
    return spec.partition(":")[0] in _NAMED_SPECS


def _spec_entry(spec: str | None, folder: Path | None) -> str | dict[str, str] | None:
    if spec is None or _is_named_spec(spec):
        return spec
    return _path_entry(Path(spec), folder)


def _spec_from(entry: Any, folder: Path | None) -> str | None:
    if entry is None or (isinstance(entry, str) and _is_named_spec(entry)):
        return entry
    path = _path_from(entry, folder)
    return str(path) if path is not None else None

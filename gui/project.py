"""A project file: everything needed to pick the work up again, as one JSON document.

It holds the model's path, the data source spec and sensitivity method last used, the plan as
plain data (exactly what a plan file holds) and the sensitivity results (exactly what the
engine's sensitivity JSON holds). Paths are stored relative to the project file when they lie
beside or below it, so a project folder can be moved or shared as a whole; an absolute copy is
kept as a fallback. Nothing here needs Qt: the window reads and writes :class:`Project` values.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import PlanError, SlimscopeError
from engine.plan import Plan
from engine.parsing import read_json
from engine.safe_write import atomic_write_text
from engine.sensitivity import Sensitivity

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
    def from_dict(cls, data: dict[str, Any], folder: Path | None = None) -> Project:
        if not isinstance(data, dict) or "version" not in data:
            raise SlimscopeError("not a Slimscope project: no version field")
        if data["version"] != PROJECT_VERSION:
            raise SlimscopeError(f"project version {data['version']!r} is not supported "
                                 f"(expected {PROJECT_VERSION})")
        plan = dict(data.get("plan") or {})
        try:
            Plan.from_dict(plan)
        except PlanError as exc:
            raise SlimscopeError(f"the project's plan is invalid: {exc}") from None
        raw_data = dict(data.get("data") or {})
        choice = DataChoice.from_dict({**raw_data, "spec": _spec_from(raw_data.get("spec"), folder)})
        sensitivity = data.get("sensitivity")
        return cls(
            model_path=_path_from(data.get("model"), folder),
            data=choice,
            plan=plan,
            sensitivity=Sensitivity.from_dict(sensitivity) if sensitivity else None,
            target=dict(data.get("target") or {}),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        text = json.dumps(self.to_dict(path.resolve().parent), indent=1) + "\n"
        atomic_write_text(path, text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Project:
        path = Path(path)
        data = read_json(path)
        return cls.from_dict(data, path.resolve().parent)


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
    if not entry:
        return None
    if isinstance(entry, str):
        entry = {"path": entry}
    relative = entry.get("relative")
    if relative and folder is not None and (folder / relative).exists():
        return (folder / relative).resolve()
    return Path(entry["path"])


def _is_named_spec(spec: str) -> bool:
    return spec.partition(":")[0] in _NAMED_SPECS


def _spec_entry(spec: str | None, folder: Path | None) -> str | dict[str, str] | None:
    if spec is None or _is_named_spec(spec):
        return spec
    return _path_entry(Path(spec), folder)


def _spec_from(entry: Any, folder: Path | None) -> str | None:
    if entry is None or isinstance(entry, str):
        return entry
    path = _path_from(entry, folder)
    return str(path) if path is not None else None

"""The engine stays importable without a display: no Qt, no pyqtgraph, no gui imports."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine"
FORBIDDEN = ("PySide6", "PySide2", "PyQt5", "PyQt6", "pyqtgraph", "qtpy", "shiboken6", "gui")


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_engine_imports_no_qt() -> None:
    files = sorted(ENGINE.rglob("*.py"))
    assert files, f"no engine sources found under {ENGINE}"
    offences = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, module in _imported_modules(tree):
            if module.split(".")[0] in FORBIDDEN:
                offences.append(f"{path.relative_to(ENGINE.parent)}:{line} imports {module}")
    # engine/cli.py starts the app with a lazy `from gui.app import main`, the one sanctioned door.
    offences = [o for o in offences if not o.startswith("engine/cli.py") or "gui.app" not in o]
    assert not offences, "engine must stay Qt-free:\n" + "\n".join(offences)

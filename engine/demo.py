"""The bundled demo model: where its files are, whether Slimscope runs from source or installed.

`resources` is a package with ``demo/*`` as package data, so importlib.resources finds it in a
source checkout, a wheel install and a PyInstaller bundle alike. The files are made by
``python -m resources.make_demo``; ``demo.json`` records the accuracy they reach on
:class:`engine.data.DigitsData` ("test").
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from engine.errors import SlimscopeError


def demo_dir() -> Path:
    """The folder holding the demo files."""
    return Path(str(files("resources") / "demo"))


DEMO_DIR = demo_dir()
DEMO_MODEL = DEMO_DIR / "digits_cnn.safetensors"
DEMO_ONNX = DEMO_DIR / "digits_cnn.onnx"
DEMO_INFO = DEMO_DIR / "demo.json"


def demo_info() -> dict[str, Any]:
    """What make_demo recorded: test accuracy, data split, seed, torch version."""
    try:
        return json.loads(DEMO_INFO.read_text())
    except (OSError, ValueError) as exc:
        raise SlimscopeError(f"the bundled demo record {DEMO_INFO} is missing or broken: "
                             f"{exc}") from None

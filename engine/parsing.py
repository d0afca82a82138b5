"""Reading the text files users hand us (plans, sensitivity results, projects), bounded.

A file of a few hundred bytes must not be able to take minutes or gigabytes to read: YAML
aliases can expand exponentially and deep nesting can exhaust the stack. Everything here turns
such input into one :class:`SlimscopeError` line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.errors import SlimscopeError


def read_json(path: Path) -> Any:
    """A JSON file's content, or one clear SlimscopeError for a missing or malformed file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SlimscopeError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlimscopeError(f"{Path(path).name}: not valid JSON: {exc}") from None

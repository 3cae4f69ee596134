"""Reading a JSON file a user named (class names, templates): errors name the file and its role."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path, what: str) -> Any:
    """The parsed contents of ``path``.

    Args:
        path: the file.
        what: its role, for the message (``"class-name"``, ``"template"``).

    Raises:
        FileNotFoundError: ``{what} file {path} does not exist``.
        ValueError: the file is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc

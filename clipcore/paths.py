"""Output paths checked before the work (in the core, so that the torch-free exports can use it too)."""

from __future__ import annotations

import os
from pathlib import Path


def output_path_problem(path: str | os.PathLike, kind: str) -> str | None:
    """Why ``path`` cannot be written as a ``kind`` ("dir" or "file"), or None; checked before the
    work, so that a wrong ``--out`` fails in a second, not after every model and image has run.

    A path that exists must be of that kind; one that does not must have an existing directory
    (writable) as its nearest existing parent.
    """
    p = Path(path).expanduser()
    if p.exists():
        if kind == "dir" and not p.is_dir():
            return "is a file; expected a directory (new or existing)"
        if kind == "file" and p.is_dir():
            return "is a directory; expected a file name"
        return None if os.access(p, os.W_OK) else "is not writable"
    parent = next((q for q in p.parents if q.exists()), Path("."))
    if not parent.is_dir():
        return f"{parent} is a file, so nothing can be created under it"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    return None

"""Files that name classes: a classes JSON, ``{"classes": [...], "templates": [...]?}`` or a plain list of names."""

from __future__ import annotations

import json
from pathlib import Path


def read_classes(path: str) -> tuple[list[str] | None, list[str] | None]:
    """Class names and templates from a classes JSON (``{"classes", "templates"?}`` or a plain list of names)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return [str(c) for c in data], None
    if not isinstance(data, dict) or "classes" not in data:
        raise ValueError(f"{path}: expected {{'classes': [...], 'templates': [...]}} or a list of class names")
    templates = data.get("templates")
    return [str(c) for c in data["classes"]], [str(t) for t in templates] if templates else None

"""The formats of ``xmodal data convert``: every module of this package that defines ``CONVERTERS``.

A format is added by adding a module here with a module-level ``CONVERTERS: list[Converter]``; nothing else
names it. Modules import optional dependencies (e.g. ``nuscenes-devkit``) inside their functions, so that
listing the formats needs none of them.
"""

from __future__ import annotations

import importlib
import pkgutil

import xmodal.data.convert as package
from xmodal.data.convert.base import Converter


def converters() -> dict[str, Converter]:
    """Every format by name, in name order.

    Raises:
        ValueError: if two modules define a format of the same name.
    """
    found: dict[str, Converter] = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        for converter in getattr(module, "CONVERTERS", ()):
            if converter.name in found:
                raise ValueError(f"two formats are named {converter.name!r} (the second in {module.__name__})")
            found[converter.name] = converter
    return dict(sorted(found.items()))

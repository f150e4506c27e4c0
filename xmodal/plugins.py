"""Plug-in registration: import every module that defines classes a config may name by short class name.

jsonargparse resolves a short ``class_path`` (``KLDivLoss``, ``CLIPStudent``) among the imported subclasses of
the parameter's type, so a class is known by its short name once its module is imported. :func:`load_plugins`
imports every module of xmodal's plug-in packages (found with :mod:`pkgutil`, so a new file needs no edit here),
then the modules named by the ``xmodal.plugins`` entry-point group, which is how an installed third-party package
makes its teachers, students and losses known::

    # the third-party package's pyproject.toml
    [project.entry-points."xmodal.plugins"]
    my_teachers = "my_package.teachers"

A third-party module that fails to import is reported with a warning naming it, and the others still load.
The same group is the zoo's allow-list of model classes (:mod:`xmodal.zoo.registry`).
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from importlib.metadata import entry_points
from types import ModuleType

from xmodal.zoo.registry import PLUGIN_GROUP

PACKAGES = ("xmodal.modalities", "xmodal.teachers", "xmodal.students", "xmodal.losses", "xmodal.callbacks")


class PluginWarning(UserWarning):
    """A third-party plug-in module named by an ``xmodal.plugins`` entry point failed to import."""


def import_with_submodules(name: str) -> list[ModuleType]:
    """``name`` and, when it is a package, every module in it (recursively)."""
    module = importlib.import_module(name)
    modules = [module]
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{name}."):
        modules.append(importlib.import_module(info.name))
    return modules


def load_entry_point_plugins() -> list[str]:
    """Import the module of every ``xmodal.plugins`` entry point; returns the modules imported.

    A module that raises while importing gives a :class:`PluginWarning` naming the entry point and its
    distribution, and is skipped.
    """
    loaded = []
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            importlib.import_module(point.module)
        except Exception as error:  # a broken third-party plug-in must not stop xmodal
            source = point.dist.name if point.dist is not None else "an unknown distribution"
            warnings.warn(f"xmodal plug-in {point.name!r} ({point.value}, from {source}) failed to import and is "
                          f"skipped: {type(error).__name__}: {error}", PluginWarning, stacklevel=2)
        else:
            loaded.append(point.module)
    return loaded


def load_plugins() -> list[str]:
    """Import xmodal's plug-in modules and the third-party ones; returns the names of the modules imported."""
    names = [module.__name__ for package in PACKAGES for module in import_with_submodules(package)]
    return names + load_entry_point_plugins()

"""Docstrings and literal constants of heavy modules, read from their source files without importing them.

A command's ``--help`` quotes them (a module's summary, a format example, default class names, a corpus's frame
size); importing the module would import torch, which costs seconds before the help is printed.
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import importlib.util
from pathlib import Path
from typing import Any


@functools.cache
def _syntax_tree(module: str) -> ast.Module:
    # find_spec(module) would run the __init__ of module's package, which may itself import torch
    package, _, name = module.rpartition(".")
    package_spec = importlib.util.find_spec(package) if package else None
    locations = package_spec.submodule_search_locations if package_spec else None
    spec = importlib.machinery.PathFinder.find_spec(name, locations) if locations else importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no source file for module {module}")
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))


def module_docstring(module: str) -> str | None:
    """``module.__doc__``, unimported."""
    return ast.get_docstring(_syntax_tree(module), clean=False)


def module_constant(module: str, name: str) -> Any:
    """The value of ``module``'s top-level ``name = <literal>``, unimported.

    Raises:
        LookupError: if ``module`` has no such assignment.
    """
    for node in _syntax_tree(module).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name and node.value is not None:
            return ast.literal_eval(node.value)
    raise LookupError(f"{module} has no top-level literal {name}")


def module_dict_keys(module: str, name: str) -> list[str]:
    """The string keys of ``module``'s top-level ``name = {"key": value, ...}`` (values need not be literals).

    Raises:
        LookupError: if ``module`` has no such assignment.
    """
    for node in _syntax_tree(module).body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(value, ast.Dict) and [getattr(t, "id", None) for t in targets] == [name]:
            return [ast.literal_eval(key) for key in value.keys if key is not None]
    raise LookupError(f"{module} has no top-level dict {name}")

"""Hyperparameter search over recipe configs: search spaces, values set by config path, and the study's outputs.

A search space is a YAML mapping from a config path to a distribution::

    model.losses[1].init_args.weight: {log_float: [0.01, 10]}
    model.optimizer.init_args.lr: {log_float: [1.0e-4, 1.0e-2]}
    model.losses[2].init_args.normalize: {categorical: [none, standardize]}
    model.student.init_args.depth: {int: [1, 4]}

A path is dotted keys with ``[i]`` for list items, addressed in the recipe's config as Lightning's CLI resolves it
(``xmodal fit --config recipe.yaml --print_config`` shows every addressable value, defaults included).
:mod:`xmodal.commands.tune` runs the trials; this module holds what needs no trainer.
"""

from __future__ import annotations

import copy
import csv
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KINDS = ("float", "log_float", "int", "log_int", "categorical")
PathKey = str | int
OUTPUT_ARGS = ("save_dir", "dirpath", "out_dir")  # where Lightning loggers and xmodal/Lightning callbacks write
_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class SearchSpaceError(ValueError):
    """A search space entry is malformed or names a path the config does not have."""


@dataclass(frozen=True)
class Param:
    """One searched value: ``path`` in the config, ``kind`` (one of :data:`KINDS`) and its bounds or choices."""

    path: str
    kind: str
    values: tuple[Any, ...]

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna ``trial`` samples for this parameter (named by its path)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, list(self.values))
        low, high = self.values
        if self.kind in ("int", "log_int"):
            return trial.suggest_int(self.path, low, high, log=self.kind == "log_int")
        return trial.suggest_float(self.path, low, high, log=self.kind == "log_float")

    def example(self) -> Any:
        """A value of the space (the first choice or the low bound), to type-check the config before any trial."""
        return self.values[0]

    def grid(self) -> list[Any]:
        """Every value, for a grid search; only categorical and integer parameters have a finite grid."""
        if self.kind == "categorical":
            return list(self.values)
        if self.kind in ("int", "log_int"):
            return list(range(self.values[0], self.values[1] + 1))
        raise SearchSpaceError(f"{self.path}: a grid needs categorical or int parameters, not {self.kind}")


def parse_path(path: str) -> tuple[PathKey, ...]:
    """``"model.losses[1].init_args.weight"`` -> ``("model", "losses", 1, "init_args", "weight")``."""
    tokens = tuple(int(index) if index else key for key, index in _TOKEN.findall(path))
    if not tokens or format_path(tokens) != path:
        raise SearchSpaceError(f"malformed config path {path!r}: use dotted keys and [i] for list items")
    return tokens


def _bounds(path: str, kind: str, values: Any) -> tuple[Any, ...]:
    if not (isinstance(values, Sequence) and not isinstance(values, str) and len(values) == 2):
        raise SearchSpaceError(f"{path}: {kind} takes [low, high], got {values!r}")
    number = int if kind in ("int", "log_int") else float
    if number is int and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SearchSpaceError(f"{path}: {kind} bounds must be integers, got {values!r}")
    low, high = (number(v) for v in values)
    if not low <= high or (kind.startswith("log") and low <= 0):
        raise SearchSpaceError(f"{path}: {kind} needs low <= high{' and low > 0' if kind.startswith('log') else ''}")
    return low, high


def parse_param(path: str, spec: Any) -> Param:
    """One space entry: ``path`` and ``{kind: [low, high]}`` or ``{categorical: [choices...]}``."""
    parse_path(path)
    if not (isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in KINDS):
        raise SearchSpaceError(f"{path}: expected one of {{{': ..., '.join(KINDS)}: ...}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind == "categorical":
        if not (isinstance(values, Sequence) and not isinstance(values, str) and values):
            raise SearchSpaceError(f"{path}: categorical takes a non-empty list of choices, got {values!r}")
        if not all(v is None or isinstance(v, bool | int | float | str) for v in values):
            raise SearchSpaceError(f"{path}: categorical choices are None, bool, int, float or str: {values!r}")
        return Param(path, kind, tuple(values))
    return Param(path, kind, _bounds(path, kind, values))


def load_space(source: str | Path | Mapping[str, Any]) -> list[Param]:
    """The parameters of a search space, given as a YAML file or an already loaded mapping."""
    space = yaml.safe_load(Path(source).read_text()) if isinstance(source, str | Path) else source
    if not isinstance(space, Mapping) or not space:
        raise SearchSpaceError(f"a search space is a non-empty mapping of config path -> distribution: {source}")
    return [parse_param(str(path), spec) for path, spec in space.items()]


def _step(node: Any, key: PathKey, path: str, done: Sequence[PathKey]) -> Any:
    where = format_path(done) or "the config"
    if isinstance(key, int):
        if not isinstance(node, list):
            raise SearchSpaceError(f"unknown config path {path}: {where} is not a list")
        if key >= len(node):
            raise SearchSpaceError(f"unknown config path {path}: {where} has {len(node)} items")
        return node[key]
    if not isinstance(node, dict):
        raise SearchSpaceError(f"unknown config path {path}: {where} is not a mapping")
    if key not in node:
        known = ", ".join(map(str, node)) or "nothing"
        raise SearchSpaceError(f"unknown config path {path}: {where} has no {key!r} (it has {known})")
    return node[key]


def _parent(config: Any, path: str) -> tuple[Any, PathKey]:
    """The container holding ``path``'s value and its key there; the error names the whole path."""
    tokens = parse_path(path)
    node = config
    for depth, key in enumerate(tokens[:-1]):
        node = _step(node, key, path, tokens[:depth])
    _step(node, tokens[-1], path, tokens[:-1])
    return node, tokens[-1]


def get_value(config: Any, path: str) -> Any:
    """The value at ``path``; :class:`SearchSpaceError` naming the path when the config has none there."""
    node, key = _parent(config, path)
    return node[key]


def set_value(config: Any, path: str, value: Any) -> None:
    """Replace the value at an existing ``path`` of ``config`` in place."""
    node, key = _parent(config, path)
    node[key] = value


def format_path(tokens: Sequence[PathKey]) -> str:
    return "".join(f"[{t}]" if isinstance(t, int) else f"{'.' if i else ''}{t}" for i, t in enumerate(tokens))


def check_paths(config: Mapping[str, Any], params: Sequence[Param]) -> None:
    """Every parameter's path exists in ``config``; else one error that names each unknown path."""
    errors = []
    for param in params:
        try:
            get_value(config, param.path)
        except SearchSpaceError as error:
            errors.append(str(error))
    if errors:
        raise SearchSpaceError("; ".join(errors))


def apply_values(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with each ``path -> value`` of ``values`` set."""
    applied = copy.deepcopy(dict(config))
    for path, value in values.items():
        set_value(applied, path, value)
    return applied


def redirect_outputs(config: Mapping[str, Any], folder: str | Path) -> dict[str, Any]:
    """A copy of ``config`` whose run writes under ``folder``: the trainer's ``default_root_dir``, and each folder a
    logger or callback writes to (its ``save_dir``, ``dirpath`` or ``out_dir``) moved there, keeping its last name."""
    redirected = copy.deepcopy(dict(config))
    trainer = redirected.setdefault("trainer", {})
    trainer["default_root_dir"] = str(folder)
    for key in ("logger", "callbacks"):
        entries = trainer.get(key)
        for entry in entries if isinstance(entries, list) else [entries]:
            init_args = entry.get("init_args") if isinstance(entry, dict) else None
            for name in OUTPUT_ARGS:
                if isinstance(init_args, dict) and init_args.get(name):
                    init_args[name] = str(Path(folder) / Path(init_args[name]).name)
    return redirected


def overlay(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The tuned values as a config to give after the recipe (``--config recipe.yaml --config best.yaml``).

    Only the tuned values are written, with the ``class_path`` of each class they configure; a list on a path is
    written whole (tuned values applied), because a list in a later config replaces the earlier one.
    """
    tuned = apply_values(config, values)
    result: dict[Any, Any] = {}
    for path in values:
        tokens = parse_path(path)
        node: Any = tuned
        target = result
        for depth, key in enumerate(tokens):
            last = depth == len(tokens) - 1
            if last or isinstance(tokens[depth + 1], int):
                target[key] = copy.deepcopy(node[key])
                break
            node = node[key]
            target = target.setdefault(key, {})
            if isinstance(node, dict) and "class_path" in node:
                target["class_path"] = node["class_path"]
    return result


def write_overlay(path: str | Path, config: Mapping[str, Any], values: Mapping[str, Any], header: str = "") -> Path:
    """Write :func:`overlay` as YAML (``header`` lines as comments)."""
    path = Path(path)
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comments + yaml.safe_dump(overlay(config, values), sort_keys=False))
    return path


def trial_rows(trials: Sequence[Any], params: Sequence[str]) -> list[dict[str, Any]]:
    """One row per Optuna ``FrozenTrial``: number, state, value, duration in seconds and each parameter."""
    rows = []
    for trial in trials:
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        row = {"number": trial.number, "state": trial.state.name, "value": trial.value, "seconds": duration}
        row.update({name: trial.params.get(name) for name in params})
        rows.append(row)
    return rows


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    path = Path(path)
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]) if rows else ["number", "state", "value"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as an aligned text table."""
    if not rows:
        return "(no trials)"
    columns = list(rows[0])
    cells = [columns] + [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in cells)


def save_plots(study: Any, out: str | Path) -> list[str]:
    """``history.png`` and ``importance.png`` (which needs two complete trials) in ``out``; notes on what was
    skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    out, notes = Path(out), []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return ["no complete trial: no plots"]
    optuna_plots.plot_optimization_history(study)
    plt.savefig(out / "history.png", bbox_inches="tight")
    plt.close("all")
    if len(complete) < 2:
        notes.append("importance.png skipped: parameter importances need at least 2 complete trials")
    else:
        try:
            optuna_plots.plot_param_importances(study)
            plt.savefig(out / "importance.png", bbox_inches="tight")
        except (ValueError, RuntimeError) as error:  # e.g. every complete trial sampled the same values
            notes.append(f"importance.png skipped: {error}")
        plt.close("all")
    return notes

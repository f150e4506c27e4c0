"""The statistics every benchmark reports: mean ± sample std over seeds, and the paired difference of two methods
over their shared seeds with its 95 % t interval and a one-line verdict.

Runs are keyed ``"<method>/seed<k>"`` in every benchmark's results JSON; :func:`seed_values` reads one number per
seed out of them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# two-sided 95 % quantiles of Student's t, t(0.975, df), df = 1..30; above 30 the normal quantile is close enough
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z_975 = 1.960


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Raises:
        ValueError: for no values.
    """
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_key(method: str, seed: int) -> str:
    """The results JSON's key of one run: ``"kd/seed3"``."""
    return f"{method}/seed{seed}"


def split_key(key: str) -> tuple[str, int]:
    """``"kd/seed3"`` -> ``("kd", 3)``."""
    method, _, seed = key.partition("/seed")
    return method, int(seed)


def seed_values(runs: Mapping[str, Any], method: str, *path: str) -> dict[int, float]:
    """``{seed: run[path[0]][path[1]]...}`` over the finished runs of ``method`` that have that number."""
    values = {}
    for key, run in runs.items():
        name, seed = split_key(key)
        value: Any = run
        for step in path:
            value = value.get(step) if isinstance(value, Mapping) else None
        if name == method and value is not None:
            values[seed] = float(value)
    return values


def t_quantile(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom (``df >= 1``)."""
    return T_975[df - 1] if df <= len(T_975) else Z_975


@dataclass(frozen=True)
class Paired:
    """``a - b`` over the seeds both have: per-seed differences, their mean, sample std and 95 % t interval."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    std: float
    low: float | None  # None with a single seed: no interval
    high: float | None

    @property
    def n(self) -> int:
        return len(self.seeds)


def paired(a: Mapping[int, float], b: Mapping[int, float], scale: float = 1.0) -> Paired | None:
    """The paired difference ``scale * (a - b)`` over the shared seeds (``None`` when they share none); ``scale``
    turns fractions into points (100) before the mean, as the reports print them."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    differences = tuple(scale * (a[s] - b[s]) for s in seeds)
    mean, std = mean_std(differences)
    if len(seeds) < 2:
        return Paired(seeds, differences, mean, std, None, None)
    half = t_quantile(len(seeds) - 1) * std / math.sqrt(len(seeds))
    return Paired(seeds, differences, mean, std, mean - half, mean + half)


def reading(diff: Paired, digits: int = 2) -> str:
    """Whether the 95 % interval of a paired difference excludes zero: ``"95% CI [+0.81, +14.19] over 4 seeds: a
    clear gain"``, ``"... within seed noise"``, ``"... a clear loss"``, or that one seed gives no interval."""
    if diff.low is None or diff.high is None:
        return "from a single seed: no estimate of seed noise, not conclusive"
    interval = f"95% CI [{diff.low:+.{digits}f}, {diff.high:+.{digits}f}] over {diff.n} seeds"
    if diff.low > 0:
        return f"{interval}: a clear gain"
    if diff.high < 0:
        return f"{interval}: a clear loss"
    return f"{interval}: within seed noise"


def verdict(diff: Paired, unit: str = "points", digits: int = 2) -> str:
    """One line: the mean difference and :func:`reading` of its interval."""
    separator = " " if diff.low is None else ", "
    return f"{diff.mean:+.{digits}f} {unit}{separator}{reading(diff, digits)}"

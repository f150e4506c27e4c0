"""The tables and plots every benchmark report shares: ``mean ± std`` cells, Markdown tables, the paired-difference
line, and learning-curve panels with one colour per method across panels."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.stats import Paired, verdict

SMOKE_BANNER = ["> **SMOKE RUN: not a measurement.** A few steps on a tiny corpus, to check the pipeline end to end. "
                "The numbers below mean nothing about the methods.", ""]


def format_pm(stats: tuple[float, float] | None, scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
    """``(0.253, 0.012)`` -> ``"25.3 ± 1.2"`` (``sign``: ``"+25.3 ± 1.2"``); ``None`` -> ``"–"``."""
    if stats is None:
        return "–"
    mean = f"{stats[0] * scale:+.{digits}f}" if sign else f"{stats[0] * scale:.{digits}f}"
    return f"{mean} ± {stats[1] * scale:.{digits}f}"


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, ``None``/``nan`` as ``-``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table from a header and rows of cells (formatted with :func:`fmt`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def paired_line(label: str, diff: Paired | None, unit: str = "points", digits: int = 2) -> str:
    """``label: +1.20 points, 95% CI [...] over 3 seeds: within seed noise (per seed: +1.0, ...)``."""
    if diff is None:
        return f"{label}: not measured (no seed has both runs)"
    per_seed = ", ".join(f"{d:+.{digits}f}" for d in diff.differences)
    return f"{label}: {verdict(diff, unit, digits)} (paired std {diff.std:.{digits}f}; per seed: {per_seed})"


def method_colours(methods: Sequence[str]) -> dict[str, Any]:
    """One fixed colour per method (matplotlib's default cycle, ``C0``..``C9``, in the benchmark's method order), the
    same in every panel of a figure."""
    return {method: f"C{i % 10}" for i, method in enumerate(methods)}


def curve_means(curves: Sequence[Sequence[Mapping[str, float]]], key: str) -> tuple[list[int], list[float]]:
    """The seed-mean curve: the steps of the first curve and the mean of ``key`` over every curve at each."""
    steps = sorted({int(p["step"]) for p in curves[0]})
    means = [statistics.fmean(p[key] for c in curves for p in c if int(p["step"]) == s) for s in steps]
    return steps, means


def plot_curves(panels: Mapping[str, Mapping[str, Sequence[Sequence[Mapping[str, float]]]]], methods: Sequence[str],
                key: str, path: Path, ylabel: str, scale: float = 100.0,
                references: Mapping[str, float] | None = None, reference_label: str = "teacher") -> None:
    """Seed-mean curves of ``key`` per method, one panel per entry of ``panels`` (``{panel: {method: curves}}``),
    each method in its own colour in every panel, one legend for the whole figure; ``references``: a dashed line
    per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = method_colours(methods)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (name, groups) in zip(axes[0], panels.items(), strict=True):
        for method in methods:
            if method in groups:
                steps, means = curve_means(groups[method], key)
                (handles[method],) = ax.plot(steps, [scale * m for m in means], marker=".", color=colours[method],
                                             label=method)
        if references and name in references:
            handles[reference_label] = ax.axhline(scale * references[name], color="k", ls="--", lw=1,
                                                  label=reference_label)
        ax.set(title=name, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
    order = [m for m in methods if m in handles] + ([reference_label] if reference_label in handles else [])
    axes[0][-1].legend([handles[m] for m in order], order, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_panel(ax: Any, groups: Sequence[str], series: Mapping[str, Sequence[tuple[float, float]]],
              ylabel: str, title: str) -> None:
    """Grouped bars on ``ax``: one group per entry of ``groups``, one bar per ``series`` entry (``{name: [(mean,
    std), ...]}`` aligned with ``groups``; a std of 0 draws no error bar), each series in its own colour."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        means, stds = [v[0] for v in values], [v[1] for v in values]
        ax.bar(xs, means, width, yerr=[s if s > 0 else math.nan for s in stds], capsize=3, label=name,
               color=f"C{i % 10}")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def new_figure(panels: int, width: float = 5.5, height: float = 4.0) -> tuple[Any, list[Any]]:
    """A matplotlib figure (Agg, no display) with ``panels`` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return fig, list(axes[0])


def plot_main(argv: Sequence[str] | None, plot: Callable[[Mapping[str, Any], Path], Path], stem: str) -> Path:
    """``python -m bench.<name>_report``: draw ``plot`` of the committed ``bench/results/<stem>.json`` into
    ``bench/results/<stem>.png`` (``--results`` and ``--png`` choose others)."""
    parser = argparse.ArgumentParser(description=f"Plot the committed {stem} benchmark results.")
    parser.add_argument("--results", type=Path, default=Path(f"bench/results/{stem}.json"))
    parser.add_argument("--png", type=Path, default=Path(f"bench/results/{stem}.png"))
    args = parser.parse_args(argv)
    return plot(json.loads(args.results.read_text()), args.png)

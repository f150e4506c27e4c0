"""The PromptKD benchmark's plot from its committed results: base, novel and harmonic-mean accuracy of every method,
one panel per corpus (``python -m bench.prompt_distill_report`` writes ``bench/results/prompt_distill.png``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.report import bar_panel, new_figure, plot_main, save_figure

SPLITS = {"base": "base classes", "novel": "novel classes", "hm": "harmonic mean"}


def plot(results: Mapping[str, Any], path: Path) -> Path:
    """Top-1 accuracy (%, mean ± std over seeds) per method and split, one panel per corpus."""
    corpora = results["corpora"]
    fig, axes = new_figure(len(corpora), width=6.5)
    fig.suptitle(f"PromptKD base-to-novel, {results['shots']} shots, seeds {results['seeds']}", fontsize=10)
    for ax, (corpus, res) in zip(axes, corpora.items(), strict=True):
        methods = list(res["summary"])
        series = {label: [(res["summary"][m][key], res["summary"][m].get(f"{key}_std", 0.0)) for m in methods]
                  for key, label in SPLITS.items()}
        bar_panel(ax, methods, series, "top-1 accuracy (%)", corpus)
        ax.set_ylim(0, 118)  # room for the legend above 100 %
        ax.legend(fontsize=8, ncol=3, loc="upper left")
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> Path:
    return plot_main(argv, plot, "prompt_distill")


if __name__ == "__main__":
    print(main())

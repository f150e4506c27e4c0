"""The performance benchmark's plot from its committed results (``python -m bench.perf_report`` writes
``bench/results/perf.png``): the framework's step time against a hand-written loop, an epoch with the live teacher
against its cached outputs, teacher and student inference latency, and peak memory per recipe."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.report import bar_panel, new_figure, plot_main, save_figure


def spread(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(results: Mapping[str, Any], path: Path) -> Path:
    fig, (step_ax, cache_ax, latency_ax, memory_ax) = new_figure(4, width=4.2, height=4.2)
    machine = results["machine"]
    fig.suptitle(f"xmodal performance on {machine['device']} ({machine['cpu_count']} CPUs, torch "
                 f"{machine['torch']}), {results['date'][:10]}", fontsize=10)
    overhead = results["overhead"]
    bar_panel(step_ax, ["xmodal (Lightning)", "hand-written loop"],
              {"ms/step": [spread(overhead["xmodal_ms_all"]), spread(overhead["plain_ms_all"])]},
              "ms per training step", f"step time, {Path(overhead['recipe']).stem} (b{overhead['batch_size']})")
    cache = results["cache"]
    bar_panel(cache_ax, ["live teacher", "cached outputs"],
              {"epoch": [(cache["live_epoch_s"], 0.0), (cache["cached_epoch_s"], 0.0)]},
              "seconds per epoch", f"teacher cache (build {cache['build_s']:.0f} s)")
    latency = results["latency"]
    groups = [f"{recipe} b{batch}" for recipe in latency for batch in latency[recipe]["ms"][machine["device"]]]
    series: dict[str, list[tuple[float, float]]] = {"teacher": [], "student": []}
    for entry in latency.values():
        for times in entry["ms"][machine["device"]].values():
            for model in series:
                series[model].append((times[model], 0.0))
    bar_panel(latency_ax, groups, series, "ms per batch (log)", "inference latency")
    latency_ax.set_yscale("log")
    latency_ax.legend(fontsize=8)
    memory = results["memory"]
    bar_panel(memory_ax, list(memory), {"peak RSS": [(m["max_rss_mb"], 0.0) for m in memory.values()]},
              "peak resident memory (MB)", "peak memory")
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> Path:
    return plot_main(argv, plot, "perf")


if __name__ == "__main__":
    print(main())

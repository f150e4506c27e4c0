"""Summary statistics, the Markdown table, the JSON file and the accuracy-vs-throughput plot of :mod:`bench.losses`."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import paired_line
from bench.stats import mean_std, paired

BASELINE = "kd"  # throughput is reported relative to vanilla KD
SCRATCH = "scratch"


def summarize(rows: Sequence[dict[str, Any]], students: Sequence[str], losses: Sequence[str]) -> dict[str, Any]:
    """Per student and recipe: accuracy mean / sample std / min / max over seeds, median throughput, the
    throughput relative to vanilla KD (``None`` where KD was not run), and the accuracy difference to scratch paired
    by seed (points, with its 95 % t interval; :func:`bench.stats.paired`).

    Throughput is measured in samples per CPU-second of the process (one torch thread), which stays stable when
    other jobs share the machine; wall-clock samples/s is kept beside it."""
    summary: dict[str, Any] = {}
    for student in students:
        per_loss = {loss: _cell([r for r in rows if r["student"] == student and r["loss"] == loss]) for loss in losses}
        base = per_loss.get(BASELINE, {}).get("samples_per_cpu_second")
        scratch = per_loss.get(SCRATCH, {}).get("acc_mean")
        scratch_accs = seed_accuracies(rows, student, SCRATCH)
        for loss, cell in per_loss.items():
            diff = paired(seed_accuracies(rows, student, loss), scratch_accs, scale=100.0)
            cell["paired_vs_scratch"] = None if diff is None or loss == SCRATCH else {
                "seeds": list(diff.seeds), "mean": diff.mean, "std": diff.std, "ci95": [diff.low, diff.high]}
            speed = cell["samples_per_cpu_second"]
            cell["relative_throughput"] = speed / base if speed and base else None
            known = cell["acc_mean"] is not None and scratch is not None
            cell["acc_delta_vs_scratch"] = cell["acc_mean"] - scratch if known else None
        summary[student] = per_loss
    return summary


def seed_accuracies(rows: Sequence[dict[str, Any]], student: str, loss: str) -> dict[int, float]:
    """``{seed: test accuracy}`` of one student and recipe over the runs that finished."""
    return {r["seed"]: r["test_acc"] for r in rows
            if r["student"] == student and r["loss"] == loss and r["status"] == "ok"}


def paired_lines(results: dict[str, Any]) -> list[str]:
    """Each recipe's accuracy against scratch, paired by seed, per student (the harness's verdict)."""
    lines = ["", "Test accuracy against `scratch`, paired by seed (points):", ""]
    for student in results["config"]["students"]:
        for loss in results["config"]["losses"]:
            if loss != SCRATCH:
                diff = paired(seed_accuracies(results["runs"], student, loss),
                              seed_accuracies(results["runs"], student, SCRATCH), scale=100.0)
                lines.append(f"- {paired_line(f'{student.upper()} `{loss}`', diff, digits=1)}")
    return lines


def _cell(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["status"] == "ok"]
    accs = [r["test_acc"] for r in ok]
    speeds = [r["samples_per_cpu_second"] for r in ok]
    wall = [r["samples_per_second"] for r in ok]
    acc_mean, acc_std = mean_std(accs) if accs else (None, None)
    return {
        "n_ok": len(ok), "n_failed": len(runs) - len(ok), "acc_mean": acc_mean, "acc_std": acc_std,
        "acc_min": min(accs) if accs else None, "acc_max": max(accs) if accs else None,
        "samples_per_cpu_second": statistics.median(speeds) if speeds else None,
        "samples_per_second": statistics.median(wall) if wall else None,
        "errors": sorted({r["error"] for r in runs if r["status"] != "ok"}),
    }


def _fmt_acc(cell: dict[str, Any]) -> str:
    if cell["acc_mean"] is None:
        return f"failed ({cell['n_failed']})"
    text = f"{100 * cell['acc_mean']:.1f} ± {100 * cell['acc_std']:.1f}"
    return text + (f" ({cell['n_failed']} failed)" if cell["n_failed"] else "")


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(scale * value, spec)


def _load(machine: dict[str, Any]) -> str:
    load = machine.get("load_average")
    return "n/a" if not load else " / ".join(f"{x:.1f}" for x in load)


def preamble(results: dict[str, Any]) -> list[str]:
    """Title and settings: data, teacher, students, budget, throughput definition, machine."""
    cfg, data, teacher, machine = results["config"], results["data"], results["teacher"], results["machine"]
    students = cfg["students"]
    params = {s: next((r["student_params"] for r in results["runs"] if r["student"] == s), "?") for s in students}
    return [
        f"# Distillation losses on {data['name']}",
        "",
        f"{data['source']}; fixed stratified split {data['train']} train / {data['test']} test. Teacher CNN "
        f"({teacher['params']:,} params, {teacher['epochs']} epochs, seed {teacher['seed']}, {teacher['trained']}): "
        f"**{100 * teacher['test_acc']:.1f} %** test accuracy. Students: "
        + ", ".join(f"{s.upper()} {params[s]:,} params" for s in students) + ".",
        "",
        f"Budget per run: {cfg['epochs']} epochs, batch {cfg['batch_size']}, AdamW lr {cfg['lr']} "
        f"wd {cfg['weight_decay']}, {cfg['warmup_steps']}-step warm-up then cosine; {len(cfg['seeds'])} seeds "
        f"({', '.join(map(str, cfg['seeds']))}); mean ± sample std over seeds. Throughput: training samples per "
        f"CPU-second of the process (median over seeds; teacher forward, loss cost and callbacks included) relative "
        f"to vanilla KD on the same student (CPU time, not wall time, so that other jobs on the machine do not skew "
        f"it; wall-clock samples/s are in the JSON).",
        f"Machine: {machine.get('cpu_model') or 'CPU'}, torch {machine['torch']}, {machine['threads']} torch "
        f"thread(s), {machine['cpu_count']} CPUs, load average at start {_load(machine)}, {machine['date']}. "
        f"Benchmark wall time {results['wall_seconds']:.0f} s.",
        "",
    ]


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown page: settings, then one row per recipe ranked by mean accuracy over students."""
    cfg, summary, students = results["config"], results["summary"], results["config"]["students"]

    def score(loss: str) -> float:
        means = [summary[s][loss]["acc_mean"] for s in students]
        return statistics.fmean(m if m is not None else -1.0 for m in means)

    header = ["rank", "loss"]
    for s in students:
        header += [f"{s.upper()} acc % (mean ± std)", f"{s.upper()} Δ scratch (pp)", f"{s.upper()} rel. throughput"]
    header.append("recipe")
    lines = preamble(results) + ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for rank, loss in enumerate(sorted(cfg["losses"], key=score, reverse=True), start=1):
        cells = [str(rank), f"`{loss}`"]
        for s in students:
            c = summary[s][loss]
            cells += [_fmt_acc(c), _fmt(c["acc_delta_vs_scratch"], "+.1f", 100), _fmt(c["relative_throughput"], ".2f")]
        cells.append(results["recipes"][loss])
        lines.append("| " + " | ".join(cells) + " |")
    if SCRATCH in cfg["losses"] and len(cfg["losses"]) > 1:
        lines += paired_lines(results)
    errors = [(s, loss, e) for s in students for loss in cfg["losses"] for e in summary[s][loss]["errors"]]
    if errors:
        lines += ["", "Failures:", ""] + [f"- {s} / `{loss}`: {e}" for s, loss, e in errors]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy (mean ± std) against relative throughput, one panel per student, one labelled point per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    labels: list[tuple[Any, list[tuple[str, float, float]]]] = []
    students = results["config"]["students"]
    fig, axes = plt.subplots(1, len(students), figsize=(6.5 * len(students), 6), squeeze=False)
    teacher = 100 * results["teacher"]["test_acc"]
    for ax, student, colour in zip(axes[0], students, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        cells = [(loss, c) for loss, c in results["summary"][student].items()
                 if c["acc_mean"] is not None and c["relative_throughput"] is not None]
        points = [(loss, c["relative_throughput"], 100 * c["acc_mean"]) for loss, c in cells]
        lo, hi = min(x for _, x, _ in points), max(x for _, x, _ in points)
        ax.errorbar([x for _, x, _ in points], [y for _, _, y in points], yerr=[100 * c["acc_std"] for _, c in cells],
                    fmt="o", color=colour, capsize=2, label=f"{student.upper()} student, mean ± std")
        ax.axhline(teacher, color="grey", linestyle="--", linewidth=0.8, label=f"teacher {teacher:.1f} %")
        ax.set_xscale("log")
        ax.margins(x=0.12)  # room for the labels of the outermost points
        ax.set_xlabel("training throughput relative to vanilla KD (log; right = faster)")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{student.upper()} student")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        ticks = [t for t in (0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10) if lo / 1.1 <= t <= hi * 1.1]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        labels.append((ax, points))
    fig.suptitle(f"Distillation losses on {results['data']['name']}: accuracy vs training cost")
    fig.tight_layout()
    for ax, points in labels:  # after the layout, so that label spacing is measured on the final axes
        _label(ax, points)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label(ax: Any, points: Sequence[tuple[str, float, float]], step: float = 11.0) -> None:
    """Name every point; labels that would overlap are stacked upwards (in pixels) with a thin leader line."""
    ax.autoscale_view()
    placed: list[tuple[float, float]] = []
    for name, x, y in sorted(points, key=lambda p: p[2]):
        px, py = ax.transData.transform((x, y))
        lx, ly = px + 6, py - 3
        while any(abs(ly - qy) < step and abs(lx - qx) < 70 for qx, qy in placed):
            ly += step
        placed.append((lx, ly))
        scale = 72.0 / ax.figure.dpi  # pixels -> points
        moved = ly - (py - 3) > 1
        ax.annotate(name, (x, y), textcoords="offset points", xytext=((lx - px) * scale, (ly - py) * scale),
                    fontsize=7, arrowprops={"arrowstyle": "-", "linewidth": 0.4, "color": "grey"} if moved else None)


def _json_safe(value: Any) -> Any:
    """NaN / inf become ``None`` so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(results: dict[str, Any], out: Path, stem: str = "losses") -> str:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out``; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (out / f"{stem}.json").write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False) + "\n")
    (out / f"{stem}.md").write_text(table)
    plot(results, out / f"{stem}.png")
    return table

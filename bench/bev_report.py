"""The BEV UniDistill benchmark's report: mean ± std over seeds and paired gains over each row's baseline
(:mod:`bench.stats`), model costs, and the comparison with UniDistill's reported gains (``bench/results/bev.md``).

mAP and NDS are stored as fractions (0.253) and shown in points (25.3), as the papers do.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.report import SMOKE_BANNER, bar_panel, format_pm, new_figure, plot_main, save_figure
from bench.stats import Paired, mean_std, paired, reading, seed_values

PAPER_GAIN = (2.0, 3.2)  # UniDistill (CVPR 2023): mAP and NDS gains of its students on nuScenes, points
LABELS: dict[str, str] = {
    "lidar_teacher": "LiDAR teacher (LiDAR alone)",
    "camera_alone": "camera alone",
    "unidistill_feature": "camera + feature",
    "unidistill_relation": "camera + relation",
    "unidistill_response": "camera + response",
    "unidistill_all": "camera + all three",
    "fusion_teacher": "fusion teacher",
    "fusion_to_lidar": "fusion -> LiDAR (all three)",
}
MODEL: dict[str, str] = {"lidar_teacher": "lidar", "fusion_teacher": "fusion", "fusion_to_lidar": "lidar"}
CAMERA_ROWS = ("unidistill_feature", "unidistill_relation", "unidistill_response", "unidistill_all")
ERRORS = ("mATE", "mASE", "mAOE")
NDS_NOTE = ("NDS here is nuScenes' formula over the three TP errors that exist (no velocity, no attributes): "
            "NDS = (5 mAP + Σ over ATE, ASE, AOE of (1 − min(1, mE))) / 8. The official NDS divides by 10 over five "
            "errors (AVE and AAE as well), so the two are not comparable number for number "
            "(`xmodal/eval/bev.py`).")


def over_seeds(runs: Mapping[str, Any], row: str, metric: str) -> tuple[float, float] | None:
    """Mean ± std of a metric over a row's seeds (``None`` when no run has it)."""
    values = list(seed_values(runs, row, "eval", metric).values())
    return mean_std(values) if values else None


def baseline_of(row: str, config: Mapping[str, Any]) -> str | None:
    """The row a row's gain is measured against: the camera alone for the camera rows; the LiDAR teacher (the
    LiDAR detector alone) for fusion -> LiDAR, only when teachers and students had the same step budget."""
    if row in CAMERA_ROWS:
        return "camera_alone"
    if row == "fusion_to_lidar" and config.get("teacher_steps") == config.get("steps"):
        return "lidar_teacher"
    return None


def paired_gain(runs: Mapping[str, Any], row: str, base: str, metric: str, scale: float = 1.0) -> Paired | None:
    """``scale * (metric(row) - metric(base))`` paired by seed (:func:`bench.stats.paired`)."""
    return paired(seed_values(runs, row, "eval", metric), seed_values(runs, base, "eval", metric), scale)


def gain_verdict(metric: str, diff: Paired) -> str:
    """A one-line reading of a paired gain (points) against UniDistill's +2.0 to 3.2 points, with the harness's
    verdict on seed noise (:func:`bench.stats.verdict`)."""
    low, high = PAPER_GAIN
    gain = diff.mean
    if round(gain, 2) == 0:
        where = "no change (0.00 points)"
    elif gain < 0:
        where = f"a loss of {-gain:.2f} points, the opposite direction to the paper's gain"
    elif gain < low:
        where = f"a gain of {gain:.2f} points, the paper's direction but below its {low}-{high}"
    elif gain <= high:
        where = f"a gain of {gain:.2f} points, within the paper's {low}-{high}"
    else:
        where = f"a gain of {gain:.2f} points, above the paper's {low}-{high}"
    return f"{metric}: {where}; {reading(diff)}"


def main_table(results: Mapping[str, Any], rows: Sequence[str]) -> list[str]:
    """Markdown rows: row, model, seeds, mAP, NDS, mATE, mASE, mAOE (mean ± std), gains over the baseline."""
    runs, config = results.get("runs", {}), results.get("config", {})
    lines = ["| row | model | seeds | mAP | NDS | mATE (m) | mASE | mAOE (rad) | vs | Δ mAP | Δ NDS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        maps = seed_values(runs, row, "eval", "mAP")
        if not maps:
            continue
        cells = [format_pm(over_seeds(runs, row, m)) for m in ("mAP", "NDS")]
        cells += [format_pm(over_seeds(runs, row, m), 1.0, 2) for m in ERRORS]
        base = baseline_of(row, config)
        gains = [paired_gain(runs, row, base, m) if base else None for m in ("mAP", "NDS")]
        vs = LABELS[base] if base and gains[0] else "–"
        cells += [vs] + [format_pm((g.mean, g.std), sign=True) if g else "–" for g in gains]
        lines.append(f"| {LABELS.get(row, row)} | {MODEL.get(row, 'camera')} | {len(maps)} | {' | '.join(cells)} |")
    return lines


def class_table(results: Mapping[str, Any], rows: Sequence[str]) -> list[str]:
    """Markdown rows of the per-class AP (points, mean over seeds; ``–`` where a class had no ground truth)."""
    runs = results.get("runs", {})
    classes: list[str] = []
    for run in runs.values():
        classes += [c for c in run["eval"].get("per_class_AP", {}) if c not in classes]
    lines = ["| row | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for row in rows:
        mine = [run["eval"]["per_class_AP"] for run in runs.values() if run["row"] == row]
        if not mine:
            continue
        cells = []
        for name in classes:
            values = [ap[name] for ap in mine if ap.get(name) is not None]
            cells.append(f"{100 * statistics.fmean(values):.1f}" if values else "–")
        lines.append(f"| {LABELS.get(row, row)} | {' | '.join(cells)} |")
    return lines


def cost_table(results: Mapping[str, Any]) -> list[str]:
    """Markdown rows of each model type's parameters, CPU latency and median training step time."""
    runs = results.get("runs", {})
    lines = ["| model | params | CPU ms/sample (1 thread, batch 1) | median train step s (rows) |", "|---|---|---|---|"]
    for kind, cost in results.get("models", {}).items():
        steps = sorted({f"{run['train']['step_s']:.2f} ({run['row']})" for run in runs.values()
                        if MODEL.get(run["row"], "camera") == kind and run["train"].get("step_s") is not None})
        lines.append(f"| {kind} | {cost['params'] / 1e6:.2f} M | {cost['cpu_ms_per_sample']:.1f} | "
                     f"{', '.join(steps) or '–'} |")
    return lines


def comparison_lines(results: Mapping[str, Any]) -> list[str]:
    """The paragraph comparing camera + all three against the camera alone with UniDistill's reported gains."""
    runs = results.get("runs", {})
    lines = [f"UniDistill (Zhou et al., CVPR 2023) reports that its three losses raise its students' mAP and NDS by "
             f"{PAPER_GAIN[0]} to {PAPER_GAIN[1]} points on nuScenes (real data, full-size detectors, long training "
             "schedules). Ours: camera + all three against the camera alone, paired by seed, on a small synthetic "
             "corpus with small detectors and a short budget, so only the direction and rough size can be compared."]
    readings = []
    for metric in ("mAP", "NDS"):
        gain = paired_gain(runs, "unidistill_all", "camera_alone", metric, scale=100.0)
        if gain is None:
            readings.append(f"{metric}: not measured (no seed has both rows)")
        else:
            readings.append(gain_verdict(metric, gain))
    return lines + [""] + [f"- {r}." for r in readings]


def markdown(results: Mapping[str, Any]) -> str:
    """The whole report."""
    config, machine = results["config"], results.get("machine", {})
    rows = list(LABELS)  # the benchmark's rows, in order
    corpus = config.get("corpus", {})
    seeds = sorted({run["seed"] for run in results.get("runs", {}).values()})
    out = ["# BEV UniDistill benchmark", ""]
    if config.get("smoke"):
        out += SMOKE_BANNER
    out += [f"Corpus `{config['data']}` (bev-scenes {corpus.get('size')}, synthetic: {corpus.get('counts')} scenes, "
            f"images {corpus.get('image_size')}), test split. Budget: {config['steps']} optimizer steps per student, "
            f"{config['teacher_steps']} per teacher (LiDAR and fusion, one per seed; each distilled student of seed s "
            f"distils from the teacher of seed s), seeds {seeds}, device `{config['device']}`. "
            "Validation off; every model is its state at the last step. mAP and NDS in points, mean ± sample std "
            "over seeds; Δ is the paired (same seed) gain over the row named in *vs*: the camera alone for the "
            "camera rows and, for fusion -> LiDAR, the LiDAR teacher row, which is the same LiDAR detector trained "
            "alone (compared only when teachers and students had the same step budget).", "",
            f"Date {machine.get('date', '–')}; machine: {machine.get('cpu_model') or 'CPU'}, "
            f"{machine.get('cpu_count')} CPUs, torch {machine.get('torch')}, {machine.get('threads')} torch threads, "
            f"load average at start {machine.get('load_average')}.", "",
            "## Detection (test split)", ""]
    out += main_table(results, rows) + ["", NDS_NOTE, "", "## AP per class (points, mean over seeds)", ""]
    out += class_table(results, rows) + ["", "## Models", ""] + cost_table(results)
    out += ["", "CPU latency: `predict` (forward + box decoding) on one test sample, one torch thread, median of "
            "repeated calls while other jobs may share the machine. Train step times are medians of wall seconds per "
            "step on the benchmark's device (distilled rows include the frozen teacher's forward).", ""]
    out += ["## Against UniDistill's reported gains", ""] + comparison_lines(results) + [""]
    return "\n".join(out)


def write_report(results: Mapping[str, Any], out: Path) -> Path:
    """Write ``out.md`` and return its path."""
    path = out.with_suffix(".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(results))
    return path


# --- gradient diagnostics (bench/bev_diagnostics.py) --------------------------------------------------------------

DIAG_TERMS = ("unidistill_feature", "unidistill_relation", "unidistill_response")
DIAG_RECIPES = ("earlier", "reference")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def diagnostics_table(results: Mapping[str, Any], step: str) -> list[str]:
    """One row per distillation term: its weight, and its ratio to the detection gradient and cosine with it at
    ``step``, earlier recipe vs the reference one."""
    recipes = results["recipes"]
    lines = [f"Step {step}: |g| of weight × term on the whole student, over the detection loss's |g|; cos: with "
             "the detection loss's gradient.", "",
             "| term | weight (earlier) | × detection (earlier) | cos (earlier) | weight (reference) "
             "| × detection (reference) | cos (reference) |", "|---|---|---|---|---|---|---|"]
    for term in ("detection", *DIAG_TERMS):
        cells = []
        for recipe in DIAG_RECIPES:
            stats = recipes.get(recipe, {}).get("diagnostics", {}).get(step, {}).get(term, {})
            weight = recipes.get(recipe, {}).get("weights", {}).get(term)
            ratio = stats.get("ratio") if term != "detection" else stats.get("grad_all")
            cells += [_fmt(weight), _fmt(ratio), _fmt(stats.get("cos_task"), 2) if term != "detection" else "–"]
        label = "detection (its own \\|g\\|)" if term == "detection" else term
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def diagnostics_markdown(results: Mapping[str, Any]) -> str:
    config, recipes = results["config"], results["recipes"]
    steps = sorted({s for r in recipes.values() for s in r.get("diagnostics", {})}, key=int)
    lines = ["# BEV UniDistill: gradient diagnostics, earlier recipe vs the reference one", "",
             f"LiDAR -> camera (`configs/bev/camera_unidistill.yaml`). Corpus: bev-scenes, {config['scenes']} training "
             f"scenes (`{config['data']}`); LiDAR teacher trained {config['teacher_steps']} steps; each student "
             f"{config['steps']} steps from the same seed, measured every {config['every']} steps on the training "
             "batch. *earlier*: the losses before issue 23 (MSE features on the neck, relation on the neck, response "
             "at the 9 keypoints, all ×1); *reference*: UniDistill's `camera_exp_distill_lidar` (L1 features on the "
             "pre-backbone map ×100, relation on the neck ×40, Gaussian-masked response ×10).", ""]
    lines += ["Each measurement is one training batch (batch size of the recipe) of one run, so it shows the scale of "
              "each term's gradient, not its trend; the students start from the same initialisation, hence the same "
              "detection gradient at step 0.", ""]
    for step in steps:
        lines += [*diagnostics_table(results, step), ""]
    lines += ["## Seconds per training step (CPU)", "", "| recipe | median s/step | steps | command |",
              "|---|---|---|---|"]
    lines += [f"| {name} | {_fmt(r.get('median_step_s'))} | {r.get('steps')} | `{r.get('command')}` |"
              for name, r in recipes.items()]
    if results.get("teacher_median_step_s") is not None:
        lines.append(f"| LiDAR teacher (training) | {_fmt(results['teacher_median_step_s'])} | "
                     f"{config['teacher_steps']} | `xmodal fit` of `lidar_teacher.yaml` |")
    machine = results.get("machine", {})
    load = machine.get("load_average")
    lines += ["", f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cpu_count', '?')} CPUs shared with other "
              f"jobs (load average {_fmt(load[0] if load else None)} at the start), so the step times are an upper "
              "bound for an idle machine; the diagnosed steps are left out of the median.", "",
              "Produced by `python -m bench.bev_diagnostics` "
              f"(`--teacher-steps {config['teacher_steps']} --steps {config['steps']} --every {config['every']}`)."]
    return "\n".join(lines) + "\n"


def write_diagnostics_report(results: Mapping[str, Any], out: Path) -> Path:
    path = out.with_suffix(".md")
    path.write_text(diagnostics_markdown(results))
    return path


# --- plot --------------------------------------------------------------------------------------------------------


def plot(results: Mapping[str, Any], path: Path) -> Path:
    """mAP and NDS (points, mean ± std over seeds) of every row, one panel each (``bench/results/bev.png``)."""
    rows = [row for row in LABELS if over_seeds(results["runs"], row, "mAP") is not None]
    seeds = len({run["seed"] for run in results["runs"].values()})
    fig, axes = new_figure(2, width=6.0)
    fig.suptitle(f"BEV UniDistill benchmark, test split: mean ± std over {seeds} seeds", fontsize=10)
    for ax, metric in zip(axes, ("mAP", "NDS"), strict=True):
        values = [over_seeds(results["runs"], row, metric) or (math.nan, 0.0) for row in rows]
        bar_panel(ax, [LABELS[row] for row in rows], {metric: [(100 * m, 100 * s) for m, s in values]},
                  f"{metric} (points)", metric)
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> Path:
    return plot_main(argv, plot, "bev")


if __name__ == "__main__":
    print(main())

"""Evaluation, latency and the Markdown/JSON/PNG report of ``bench/clip_compression.py``."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.report import format_pm, paired_line, plot_curves
from bench.stats import mean_std, paired, seed_values, split_key

METRICS = ("zeroshot_top1", "i2t_R@1", "t2i_R@1")
TEACHER_MIN_ZEROSHOT = 0.2  # well above chance on both corpora (shapes and digits have 10 classes each at most)


def check_teacher(name: str, teacher: Path, data: Path) -> None:
    """Refuse to distil from a teacher that did not learn: its students' rows would measure nothing."""
    from xmodal.commands.demo import evaluate
    from xmodal.zoo import create_model

    top1 = evaluate(create_model(str(teacher)), data, 32)["zeroshot_top1"]
    print(f"[bench] {name} teacher zero-shot top-1: {100 * top1:.1f}%")
    if top1 < TEACHER_MIN_ZEROSHOT:
        raise SystemExit(f"the {name} teacher reached only {100 * top1:.1f}% zero-shot top-1 "
                         f"(< {100 * TEACHER_MIN_ZEROSHOT:.0f}%): fix its recipe before benchmarking students")


def steps_to_reach(curves: list[list[dict[str, float]]], target: float) -> int | None:
    """First probed step at which the seed-mean zero-shot curve reaches ``target`` (None if never)."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for point in curve:
            by_step.setdefault(int(point["step"]), []).append(point["zeroshot_top1"])
    for step in sorted(by_step):
        if len(by_step[step]) == len(curves) and statistics.fmean(by_step[step]) >= target:
            return step
    return None


def evaluate_run(run: dict[str, Any], data: Path) -> None:
    """Fill ``run`` with final zero-shot/R@1 on the test split and parameter counts (once)."""
    from xmodal.commands.demo import evaluate
    from xmodal.contracts import count_params
    from xmodal.zoo import create_model

    if "zeroshot_top1" in run:
        return
    model = create_model(run["export"])
    run.update(evaluate(model, data, 32))
    run["params"] = count_params(model.model)
    run["image_params"] = count_params(model.model.visual)


def measure_latency(results: dict[str, Any]) -> None:
    """CPU ms per image (one thread) of each corpus' teacher and every exported student."""
    from xmodal.commands.demo import ms_per_image
    from xmodal.zoo import create_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for entry in results["corpora"].values():
            entry["teacher_cpu_ms_per_image"] = ms_per_image(create_model(entry["teacher"]), 32, repeats=20)
            for run in entry["runs"].values():
                run["cpu_ms_per_image"] = ms_per_image(create_model(run["export"]), 32, repeats=20)
    finally:
        torch.set_num_threads(threads)
    results["latency_threads"] = 1


def summarize(entry: dict[str, Any], data: Path, methods: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method: mean/std over seeds, params, latency, steps to reach the scratch accuracy."""
    from xmodal.commands.demo import evaluate
    from xmodal.contracts import count_params
    from xmodal.zoo import create_model

    if "teacher_metrics" not in entry:
        teacher = create_model(entry["teacher"])
        entry["teacher_metrics"] = evaluate(teacher, data, 32)
        entry["teacher_params"] = count_params(teacher.model)
    groups: dict[str, list[dict[str, Any]]] = {}
    for key, run in entry["runs"].items():
        evaluate_run(run, data)
        groups.setdefault(split_key(key)[0], []).append(run)
    scratch_final = statistics.fmean(r["zeroshot_top1"] for r in groups.get("scratch", [{"zeroshot_top1": 1.0}]))
    scratch_steps = steps_to_reach([r["probe"] for r in groups.get("scratch", [])], scratch_final)
    rows = []
    for method in methods:
        if method not in groups:
            continue
        runs = groups[method]
        row: dict[str, Any] = {"method": method, "n_seeds": len(runs)}
        for metric in METRICS:
            row[metric] = mean_std([r[metric] for r in runs])
        row["params"] = statistics.fmean(r["params"] for r in runs)
        row["params_rel"] = row["params"] / entry["teacher_params"]
        if all("cpu_ms_per_image" in r for r in runs) and "teacher_cpu_ms_per_image" in entry:
            row["latency_rel"] = statistics.fmean(r["cpu_ms_per_image"] for r in runs) / entry[
                "teacher_cpu_ms_per_image"]
        row["train_seconds"] = statistics.fmean(r["train_seconds"] for r in runs)
        reach = steps_to_reach([r["probe"] for r in runs], scratch_final)
        row["steps_to_scratch_final"] = reach
        row["speedup_vs_scratch"] = (scratch_steps / reach) if reach and scratch_steps else None
        rows.append(row)
    entry["scratch_final_zeroshot_top1"] = scratch_final
    entry["scratch_steps_to_final"] = scratch_steps
    return rows


def markdown(name: str, entry: dict[str, Any], rows: list[dict[str, Any]], steps: int) -> str:
    t = entry["teacher_metrics"]
    lines = [
        f"### {name}",
        "",
        f"Teacher: {entry['teacher_params'] / 1e6:.2f} M params, zero-shot top-1 {100 * t['zeroshot_top1']:.1f}%, "
        f"I→T R@1 {100 * t['i2t_R@1']:.1f}%, T→I R@1 {100 * t['t2i_R@1']:.1f}%. "
        f"Scratch students' mean final zero-shot: {100 * entry['scratch_final_zeroshot_top1']:.1f}%.",
        "",
        "| method | seeds | zero-shot top-1 % | I→T R@1 % | T→I R@1 % | params (× teacher) | CPU latency × teacher "
        f"| steps to scratch's final (of {steps}) | speed-up | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        latency = f"{r['latency_rel']:.2f}" if "latency_rel" in r else "not measured"
        reach = "never" if r["steps_to_scratch_final"] is None else str(r["steps_to_scratch_final"])
        speed = "—" if r["speedup_vs_scratch"] is None else f"{r['speedup_vs_scratch']:.1f}×"
        lines.append(
            f"| {r['method']} | {r['n_seeds']} | {format_pm(r['zeroshot_top1'])} | {format_pm(r['i2t_R@1'])} | "
            f"{format_pm(r['t2i_R@1'])} | {r['params'] / 1e6:.3f} M ({r['params_rel']:.2f}) | {latency} | {reach} | "
            f"{speed} | {r['train_seconds']:.0f} |"
        )
    scratch = seed_values(entry["runs"], "scratch", "zeroshot_top1")
    others = [r["method"] for r in rows if r["method"] != "scratch"]
    if scratch and others:
        lines += ["", "Zero-shot top-1 against scratch, paired by seed (points):", ""]
        for method in others:
            diff = paired(seed_values(entry["runs"], method, "zeroshot_top1"), scratch, scale=100.0)
            lines.append(f"- {paired_line(method, diff, digits=1)}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path, methods: Sequence[str]) -> None:
    """Seed-mean zero-shot learning curves per method, one panel per corpus, one colour per method in every panel."""
    panels: dict[str, dict[str, list[list[dict[str, float]]]]] = {}
    for name, entry in results["corpora"].items():
        groups = panels.setdefault(name, {})
        for key, run in entry["runs"].items():
            groups.setdefault(split_key(key)[0], []).append(run["probe"])
    teachers = {name: entry["teacher_metrics"]["zeroshot_top1"] for name, entry in results["corpora"].items()}
    plot_curves(panels, methods, "zeroshot_top1", path, "zero-shot top-1 % (test, seed mean)", references=teachers)


def report(results: dict[str, Any], out: Path, methods: Sequence[str]) -> None:
    """Evaluate what is missing, then write ``out``.json/.md/.png and print the tables."""
    sections = []
    for name, entry in results["corpora"].items():
        rows = summarize(entry, Path(results.get("data_root", "runs/data")) / name, methods)
        entry["summary"] = rows
        sections.append(markdown(name, entry, rows, results["steps"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    header = (f"# CLIP compression benchmark\n\n`python -m bench.clip_compression` — {results['steps']} optimizer "
              f"steps per student, seeds {results['seeds']}, mean ± std over seeds. Plot: "
              f"[clip_compression.png](clip_compression.png).\n")
    notes = ("Columns: zero-shot top-1 and R@1 on the test split (R@1 counts a caption identical to the image's own "
             "as a match); params of the whole CLIP; CPU latency = ms/image of the image tower at batch 64, one "
             "thread, relative to the teacher; steps = first probe (every "
             f"{results['probe_every']} steps) where the seed-mean zero-shot curve reaches the scratch students' mean "
             "final accuracy; train s = wall seconds, measured while other jobs loaded this 2-core machine, so not "
             "comparable between rows.")
    text = header + "\n" + notes + "\n\n" + "\n\n".join(sections) + "\n"
    throughput = out.parent / "clip_compression_throughput.md"
    if throughput.is_file():
        text += ("\n### Throughput against open_clip_train --distill-model (shapes, live teacher, batch 128, CPU)\n\n"
                 "`python -m bench.openclip_throughput` (see its docstring for the method)\n\n"
                 + throughput.read_text())
    out.with_suffix(".md").write_text(text)
    plot(results, out.with_suffix(".png"), methods)
    print(text)

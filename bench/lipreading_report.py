"""Pure helpers of the lip-reading benchmark: its tables of mean ± std over seeds (:mod:`bench.stats`), the
comparison with LIBS's reported gains, the cost estimate from smoke timings, and the Markdown report
(``bench/results/lipreading.md``).

Error rates are stored as fractions (0.25) and shown in points (25.0), as the papers do.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.report import SMOKE_BANNER, format_pm
from bench.stats import mean_std, paired, seed_values, verdict

PAPER_CER_GAINS: dict[str, float] = {"CMLR": 7.66, "LRS2": 2.75}  # LIBS (AAAI 2020): CER points, alone - LIBS
LABELS: dict[str, str] = {
    "student_alone": "1. lip reader alone",
    "libs_frame": "2. + frame level",
    "libs_context": "3. + context level",
    "libs_sequence": "4. + sequence level",
    "libs_full": "5. full LIBS",
    "libs_no_filter": "6. LIBS without filtering",
    "mixspeech": "7. MixSpeech",
    "libs_interpolate": "(extra) full LIBS, interpolated frame alignment",
}
TEACHER_LABELS: dict[str, str] = {
    "whisper_zero_shot": "Whisper tiny.en, zero-shot",
    "whisper_adapted": "Whisper tiny.en, adapted",
    "conformer": "conformer from scratch (CTC greedy)",
}
SUBSETS = ("all", "seen", "unseen")
METRICS = ("greedy_cer", "greedy_wer", "beam_cer", "beam_wer")


def aggregate(runs: Mapping[str, Any], methods: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{method: {subset: {metric: (mean, std), "n": seeds}}}`` over the runs present."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for method in methods:
        for subset in SUBSETS:
            for metric in METRICS:
                values = seed_values(runs, method, "eval", subset, metric)
                if values:
                    cell = table.setdefault(method, {}).setdefault(subset, {"n": len(values)})
                    cell[metric] = mean_std(list(values.values()))
    return table


def compare_with_paper(runs: Mapping[str, Any], metric: str = "greedy_cer", subset: str = "all") -> dict[str, Any]:
    """Our CER gain (student alone - full LIBS, in points, paired by seed) against LIBS's reported gains.

    Returns:
        ``{"seeds", "gain_points": (mean, std) or None, "ci95": (low, high) or None,
        "paper": {name: {"gain_points", "ratio"}}, "verdict"}``.
    """
    alone = seed_values(runs, "student_alone", "eval", subset, metric)
    full = seed_values(runs, "libs_full", "eval", subset, metric)
    gain = paired(alone, full, scale=100.0)
    out: dict[str, Any] = {"metric": metric, "subset": subset, "seeds": list(gain.seeds) if gain else [],
                           "gain_points": None, "ci95": None, "paper": {}}
    if gain is None:
        out["verdict"] = "not measured: no seed has both the student-alone and the full-LIBS run"
        return out
    out["gain_points"] = (gain.mean, gain.std)
    out["ci95"] = None if gain.low is None else (gain.low, gain.high)
    for name, paper in PAPER_CER_GAINS.items():
        out["paper"][name] = {"gain_points": paper, "ratio": gain.mean / paper}
    out["verdict"] = verdict(gain, "CER points")
    return out


def estimate_stage(seconds: float, steps: int, step_s: float | None, full_steps: int, batch_ratio: float) -> float:
    """Seconds of a training stage at ``full_steps``: its fixed overhead (load, validation) plus the median step
    time scaled by the batch-size ratio (linear in the batch, a rough assumption). Without a step time, linear."""
    if step_s is None or steps <= 0:
        return seconds * full_steps / max(steps, 1)
    overhead = max(0.0, seconds - steps * step_s)
    return overhead + full_steps * step_s * batch_ratio


def estimate_full_cost(timings: Mapping[str, Any], plan: Mapping[str, Any]) -> dict[str, float]:
    """Estimated seconds per stage of the full run, from smoke timings (see :func:`estimate_stage`).

    ``timings``: ``{"adapt"|"conformer"|<method>: {"seconds", "steps", "step_s"}, "eval_s_per_utt",
    "teacher_eval_s_per_utt"}``. ``plan``: ``steps``, ``adapt_steps``, ``conformer_steps``, ``seeds`` (count),
    ``batch_ratio`` (full / smoke batch; ``stage_batch_ratio`` per teacher stage), ``test_utterances``,
    ``evals_per_run`` (passes over the test set per student).
    """
    ratio = float(plan["batch_ratio"])
    cost: dict[str, float] = {}
    for stage, steps_key in (("adapt", "adapt_steps"), ("conformer", "conformer_steps")):
        if stage in timings:
            t = timings[stage]
            stage_ratio = float(plan.get("stage_batch_ratio", {}).get(stage, ratio))
            cost[stage] = estimate_stage(t["seconds"], t["steps"], t.get("step_s"), int(plan[steps_key]), stage_ratio)
    for method in plan["methods"]:
        t = timings.get(method)
        if t is not None:
            one = estimate_stage(t["seconds"], t["steps"], t.get("step_s"), int(plan["steps"]), ratio)
            cost[method] = one * int(plan["seeds"])
    per_utt = float(timings.get("eval_s_per_utt", 0.0))
    cost["student_eval"] = per_utt * plan["test_utterances"] * plan["evals_per_run"] * plan["seeds"] * len(
        plan["methods"])
    cost["teacher_eval"] = float(timings.get("teacher_eval_s_per_utt", 0.0)) * plan["test_utterances"] * 3
    cost["total"] = sum(cost.values())
    return cost


def student_table(table: Mapping[str, Any], methods: Sequence[str], subset: str) -> list[str]:
    """Markdown rows: method, seeds, greedy CER/WER, beam CER/WER (mean ± std, points)."""
    lines = ["| method | seeds | greedy CER | greedy WER | beam CER | beam WER |", "|---|---|---|---|---|---|"]
    for method in methods:
        cell = table.get(method, {}).get(subset)
        if cell is None:
            lines.append(f"| {LABELS.get(method, method)} | 0 | – | – | – | – |")
            continue
        values = " | ".join(format_pm(cell.get(m)) for m in METRICS)
        lines.append(f"| {LABELS.get(method, method)} | {cell['n']} | {values} |")
    return lines


def utterance_stats(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """The median per-utterance CER and the share of "runaway" hypotheses, over twice their reference's length.

    Corpus CER sums edits over all utterances, so a few decoding loops (Whisper repeating a phrase until its token
    limit) can outweigh many good transcripts; these two numbers tell that apart from uniformly poor recognition.
    """
    from xmodal.eval.metrics import error_rates

    if not references:
        raise ValueError("utterance_stats of no utterances")
    cers = [error_rates([r], [h])["cer"] for r, h in zip(references, hypotheses, strict=True)]
    runaway = sum(len(h) > 2 * len(r) for r, h in zip(references, hypotheses, strict=True))
    return {"median_utterance_cer": statistics.median(cers), "runaway_fraction": runaway / len(references)}


def summarize_log(rows: Sequence[Mapping[str, str]], last: int = 5) -> dict[str, float]:
    """From a run's CSVLogger rows: the mean ``train/*/kept_fraction`` (the share of the batch the LIBS CER filter let
    through; the granularities share one filter, so their mean is theirs) and the mean of the ``last`` logged
    ``train/char_ce`` values (the end of training, less noisy than one batch)."""
    kept = [float(v) for row in rows for k, v in row.items()
            if k.startswith("train/") and k.endswith("/kept_fraction") and v not in ("", None)]
    char_ce = [float(row["train/char_ce"]) for row in rows if row.get("train/char_ce") not in ("", None)]
    summary: dict[str, float] = {}
    if kept:
        summary["kept_fraction"] = statistics.fmean(kept)
    if char_ce:
        summary["final_train_char_ce"] = statistics.fmean(char_ce[-last:])
    return summary


def run_stats(found: Sequence[Mapping[str, Any]], section: str, name: str) -> tuple[float, float] | None:
    """Mean and std of ``run[section][name]`` over the runs that have it (``None`` if none has)."""
    values = [float(run[section][name]) for run in found if run.get(section, {}).get(name) is not None]
    return mean_std(values) if values else None


def training_table(runs: Mapping[str, Any], methods: Sequence[str]) -> list[str]:
    """Markdown rows per method: median step seconds, the LIBS filter's kept fraction and the final training
    character cross-entropy (label-smoothed; mean ± std over seeds)."""
    lines = ["| method | s / step (median) | kept by the CER filter | final train char CE |", "|---|---|---|---|"]
    for method in methods:
        found = [run for key, run in runs.items() if key.partition("/seed")[0] == method]
        if not found:
            continue
        kept = run_stats(found, "log", "kept_fraction")
        kept_cell = f"{format_pm(kept, 100.0)} %" if kept else "–"
        lines.append(f"| {LABELS.get(method, method)} | {format_pm(run_stats(found, 'train', 'step_s'), 1.0, 2)} | "
                     f"{kept_cell} | {format_pm(run_stats(found, 'log', 'final_train_char_ce'), 1.0, 3)} |")
    return lines


def teacher_table(teachers: Mapping[str, Any]) -> list[str]:
    """Markdown rows of the teachers' audio CER/WER (greedy), all / seen / unseen sentences, and on all sentences the
    median per-utterance CER and the share of runaway hypotheses (:func:`utterance_stats`)."""
    lines = ["| teacher (audio) | CER all | WER all | CER seen | WER seen | CER unseen | WER unseen | utt | "
             "median utt CER | runaway |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in teachers.items():
        cells = []
        for subset in SUBSETS:
            rates = entry.get(subset, {})
            cells += [f"{100 * rates[m]:.1f}" if m in rates else "–" for m in ("cer", "wer")]
        everything = entry.get("all", {})
        cells.append(str(everything.get("utterances", "–")))
        cells += [f"{100 * everything[m]:.1f}" if m in everything else "–"
                  for m in ("median_utterance_cer", "runaway_fraction")]
        lines.append(f"| {TEACHER_LABELS.get(name, name)} | {' | '.join(cells)} |")
    return lines


def comparison_lines(comparison: Mapping[str, Any]) -> list[str]:
    """The paragraph comparing our gain with LIBS's −7.66 (CMLR) / −2.75 (LRS2) CER points."""
    lines = [f"Gain = CER(lip reader alone) − CER(full LIBS), {comparison['metric']} on the {comparison['subset']} "
             f"test set, paired by seed ({len(comparison['seeds'])} seed(s)). LIBS reports "
             + ", ".join(f"−{v} points on {k}" for k, v in PAPER_CER_GAINS.items()) + "."]
    if comparison["gain_points"] is None:
        return lines + ["", f"**{comparison['verdict']}**"]
    gain, spread = comparison["gain_points"]
    lines += ["", "| | CER gain (points) | ours / paper |", "|---|---|---|", f"| ours | {gain:.2f} ± {spread:.2f} | |"]
    for name, paper in comparison["paper"].items():
        lines.append(f"| LIBS, {name} | {paper['gain_points']:.2f} | {paper['ratio']:.2f} |")
    return lines + ["", f"**Reading:** {comparison['verdict']}."]


def markdown(results: Mapping[str, Any], methods: Sequence[str]) -> str:
    """The whole report."""
    cfg, runs = results["config"], results.get("runs", {})
    table = aggregate(runs, methods)
    out = ["# Lip-reading benchmark (LIBS, MixSpeech)", ""]
    if cfg.get("smoke"):
        out += SMOKE_BANNER
    batch = cfg["batch_size"] or "of the recipes (16)"
    out += [f"Corpus `{cfg['data']}` (AVSpeech-GRID, synthetic), {cfg['steps']} optimizer steps per student, seeds "
            f"{cfg['seeds']}, batch {batch}, mouth crops {cfg.get('video_size', 64)} px, Whisper adapted "
            f"for {cfg['adapt_steps']} steps, conformer teacher {cfg['conformer_steps']} steps, beam "
            f"{cfg['beam_size']}, device `{cfg['device']}`. Error rates in points (mean ± sample std over seeds), "
            "corpus CER/WER after transcript normalisation.", ""]
    for subset, title in (("all", "Test set"), ("seen", "Seen sentences (test speakers, training sentences)"),
                          ("unseen", "Unseen sentences (held-out sentences)")):
        if any(subset in table.get(m, {}) for m in methods):
            out += [f"## {title}", ""] + student_table(table, methods, subset) + [""]
    out += ["## Teachers (audio)", ""] + teacher_table(results.get("teachers", {})) + [""]
    out += ["## Training", "", "Step time: median seconds from a batch's arrival to the end of its optimizer step "
            "(the loader's workers run beside it on the same cores; CPU unless the header says otherwise); the kept "
            "fraction is the share of training utterances whose cached teacher transcript passed the CER filter "
            "(100 % without one).", ""] + training_table(runs, methods) + [""]
    out += ["## Against LIBS's reported gains", ""] + comparison_lines(compare_with_paper(runs)) + [""]
    cache = results.get("cache", {})
    out += ["## Teacher outputs: cache or live", "", cache.get("note", "–"), ""]
    if results.get("alignment_png"):
        out += [f"## Learned alignment (full LIBS, seed {results.get('alignment_seed', 0)})", "",
                f"![alignment]({results['alignment_png']})", ""]
    if results.get("estimate"):
        out += ["## Estimated cost of the full run (ESTIMATE from smoke timings, not a measurement)", "",
                "| stage | estimated hours |", "|---|---|"]
        out += [f"| {k} | {v / 3600:.2f} |" for k, v in results["estimate"].items()] + [""]
    return "\n".join(out)


def write_report(results: Mapping[str, Any], methods: Sequence[str], out: Path) -> Path:
    """Write ``out.md`` and return its path."""
    path = out.with_suffix(".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(results, methods))
    return path

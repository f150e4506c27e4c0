"""The worked example of "Making distillation pay off" on the lip-reading recipe: teacher-target statistics, the
gradient diagnostics of full LIBS with raw and with standardised Whisper targets, a short ``xmodal tune`` of the
LIBS weights on the validation split, and the lip reader alone against LIBS with the tuned weights over paired
seeds on the test split.

    nice -n 5 python -m bench.payoff                  # every piece; finished pieces are kept in the results JSON
    python -m bench.payoff --report-only              # rewrite bench/results/payoff_lipreading.md from the JSON

The corpus, Whisper tiny.en, its adaptation on the corpus and the teacher cache are made as ``bench.lipreading``
makes them (its functions), in a work folder of their own (``--adapt-steps`` may be below that benchmark's 600).
Each piece is stored in ``bench/results/payoff_lipreading.json`` as it finishes, so that a later session continues
where this one stopped: ``stats`` (``xmodal stats`` of the cached Whisper targets), ``diagnostics`` (``xmodal fit
--diagnose`` of ``libs_full.yaml`` for ``--diagnose-steps`` steps, raw and standardised), ``tune`` (``xmodal tune``
on ``val/cer``) and ``runs`` (``<method>/seed<k>``: student alone and tuned LIBS, scored with ``xmodal eval asr``
on the test split; compared with :func:`bench.stats.paired`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml

from bench import harness
from bench.lipreading import Bench, ensure_adapted, ensure_cache, ensure_whisper, split_test
from bench.stats import mean_std, paired, seed_values, verdict

OUT = harness.RESULTS / "payoff_lipreading"
DISTILL_TERMS = (1, 2, 3)  # libs_full.yaml's frame, context and sequence losses (0 is the character CE)
TUNED_METHOD, ALONE_METHOD = "libs_tuned", "student_alone"
RECIPES = {ALONE_METHOD: "student_alone.yaml", TUNED_METHOD: "libs_full.yaml"}
WEIGHT_RANGE = (0.03, 3.0)
TEACHER = ("adapt_steps",)
TUNING = (*TEACHER, "video_size", "tune_trials", "tune_steps", "val_batches")
PIECES = {"adapt": TEACHER, "cache": TEACHER, "stats": (*TEACHER, "video_size", "stats_batches"),
          "diagnostics": (*TEACHER, "video_size", "diagnose_steps"), "tune": TUNING,
          "runs": (*TUNING, "steps", "beam_size")}  # the settings each piece of the results depends on
TABLE_START, TABLE_END = "xmodal gradient diagnostics at step", "flags:"


def standardize(config: dict[str, Any], stats: Path) -> dict[str, Any]:
    """``config`` with ``normalize: standardize`` (stored statistics ``stats``) on its distillation terms."""
    for index in DISTILL_TERMS:
        config["model"]["losses"][index]["init_args"]["normalize"] = {
            "class_path": "xmodal.losses.normalize.TargetNorm",
            "init_args": {"mode": "standardize", "stats": str(stats)}}
    return config


def edit_config(path: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    """Apply ``edit`` to the YAML config at ``path`` in place; returns ``path``."""
    config = yaml.safe_load(path.read_text())
    edit(config)
    return harness.write_config(config, path)


def validate_at_end(config: dict[str, Any], batches: int) -> None:
    """One validation of ``batches`` batches after the last step (what ``xmodal tune`` reads ``val/cer`` from)."""
    trainer = config["trainer"]
    trainer.update(limit_val_batches=batches, val_check_interval=trainer["max_steps"], check_val_every_n_epoch=None,
                   num_sanity_val_steps=0)


class Tee(io.TextIOBase):
    """Write to ``stream`` and keep a copy (the diagnostics table ``xmodal fit --diagnose`` prints)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def printed_table(text: str) -> str | None:
    """The first diagnostics table in captured output (from its heading to its legend's last line)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(TABLE_START)), None)
    if start is None:
        return None
    end = next((i for i in range(start, len(lines)) if lines[i].startswith(TABLE_END)), len(lines) - 1)
    return "\n".join(lines[start:end + 1])


def diag_rows(rows: list[dict[str, str]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{step: {term: {metric: value}}}`` from a CSV log's ``diag/<term>/<metric>`` columns."""
    found: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("diag/") and value not in ("", None):
                term, metric = key[len("diag/"):].rsplit("/", 1)
                found.setdefault(row["step"], {}).setdefault(term, {})[metric] = float(value)
    return found


def read_csv_log(log_dir: Path) -> list[dict[str, str]]:
    logs = sorted(log_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return []
    with logs[-1].open(newline="") as handle:
        return list(csv.DictReader(handle))


class Payoff:
    """The pieces of the worked example on one :class:`bench.lipreading.Bench` work folder."""

    def __init__(self, bench: Bench, args: argparse.Namespace) -> None:
        self.bench, self.args, self.work = bench, args, bench.work
        self.manifest = bench.work / "cache" / "train" / "manifest.json"

    def recipe(self, name: str, run: str, seed: int, steps: int, normalized: bool) -> Path:
        path = self.bench.config(name, run, seed, steps)
        return edit_config(path, lambda config: standardize(config, self.manifest)) if normalized else path

    def stats(self) -> dict[str, Any]:
        """``xmodal stats`` of the cached Whisper targets over ``--stats-batches`` train batches."""
        config = self.recipe("libs_full.yaml", "stats", 0, 1, normalized=False)
        out = self.work / "stats.json"
        harness.xmodal(["stats", "--config", str(config), "--batches", str(self.args.stats_batches),
                        "--out", str(out), "--device", "cpu"])
        report = json.loads(out.read_text())
        keys = {key: {"dims": s["dims"], "count": s["count"], "mean_square": s["mean_square"],
                      "energy_in_mean": s["energy_in_mean"], "max_abs": max(s["max_abs"]),
                      "std_min": min(s["std"]), "std_max": max(s["std"])} for key, s in report["stats"].items()}
        return {"batches": report["batches"], "split": report["split"], "keys": keys}

    def diagnose(self, normalized: bool) -> dict[str, Any]:
        """``xmodal fit --diagnose=K`` of full LIBS for K + 1 steps: the printed step-0 table and the logged values
        at steps 0 and K."""
        steps = self.args.diagnose_steps
        run = f"diagnose_{'standardized' if normalized else 'raw'}"
        config = self.recipe("libs_full.yaml", run, 0, steps + 1, normalized)
        edit_config(config, lambda c: c["trainer"].update(log_every_n_steps=1))
        tee = Tee(sys.stdout)
        with contextlib.redirect_stdout(tee):
            harness.xmodal(["fit", "--config", str(config), f"--diagnose={steps}"])
        return {"table": printed_table(tee.copy.getvalue()), "steps": diag_rows(read_csv_log(self.work / "logs" / run))}

    def tune(self) -> dict[str, Any]:
        """``xmodal tune`` of the three LIBS weights (log-uniform) and the frame term's normalisation on ``val/cer``."""
        args, out = self.args, self.work / "tune"
        config = self.recipe("libs_full.yaml", "tune", 0, args.tune_steps, normalized=True)
        edit_config(config, lambda c: validate_at_end(c, args.val_batches))
        space: dict[str, dict[str, list[Any]]] = {
            f"model.losses[{i}].init_args.weight": {"log_float": list(WEIGHT_RANGE)} for i in DISTILL_TERMS}
        space["model.losses[1].init_args.normalize.init_args.mode"] = {"categorical": ["standardize", "none"]}
        space_path = out / "space.yaml"
        out.mkdir(parents=True, exist_ok=True)
        space_path.write_text(yaml.safe_dump(space, sort_keys=False))
        harness.xmodal(["tune", "--config", str(config), "--space", str(space_path), "--metric", "val/cer",
                        "--direction", "minimize", "--n-trials", str(args.tune_trials), "--out", str(out),
                        "--pruner", "none", "--study-name", "payoff_libs"])
        return {"steps": args.tune_steps, "trials": args.tune_trials, "val_batches": args.val_batches,
                "space": space, **study_summary(out / "study.db", "payoff_libs")}

    def run_student(self, run: harness.Run, best: Mapping[str, Any], test: str) -> dict[str, Any]:
        """Fit one paired run (full LIBS: standardised, the tuned values applied) and score it on the test split."""
        from xmodal.tune import apply_values

        def tuned(config: dict[str, Any]) -> None:
            config.update(apply_values(standardize(config, self.manifest), best))

        train = self.bench.fit(run.recipe, run.name, run.seed, run.steps, tuned if run.method == TUNED_METHOD else None)
        return {"train": train, "eval": self.bench.eval_student(run.name, {"all": test})}


def study_summary(storage: Path, name: str) -> dict[str, Any]:
    """Every trial (number, state, value, seconds, parameters) and the best one's number, value and parameters."""
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage.resolve()}")
    trials: list[dict[str, Any]] = [{"number": t.number, "state": t.state.name, "value": t.value,
               "seconds": t.duration.total_seconds() if t.duration else None, "params": t.params}
              for t in study.get_trials(deepcopy=False)]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = min(complete, key=lambda t: t["value"]) if complete else None
    return {"trial_table": trials, "best": best}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in ("adapt_steps", "video_size", "diagnose_steps", "stats_batches",
                                                 "tune_trials", "tune_steps", "val_batches", "steps", "beam_size")}


def kept_pieces(previous: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The pieces of an earlier results JSON whose settings (:data:`PIECES`) are the same as ``config``'s."""
    return {piece: previous[piece] for piece, keys in PIECES.items()
            if previous.get(piece) and all(previous["config"].get(key) == config[key] for key in keys)}


def run_pieces(payoff: Payoff, results: dict[str, Any], save: Callable[[], None], test: str) -> None:
    """Every piece not in ``results`` yet, in order, saving after each."""
    args = payoff.args
    if "stats" not in results:
        results["stats"] = payoff.stats()
        save()
    diagnostics = results.setdefault("diagnostics", {})
    for name, normalized in (("raw", False), ("standardized", True)):
        if name not in diagnostics:
            diagnostics[name] = payoff.diagnose(normalized)
            save()
    if not results.get("tune", {}).get("best"):
        results["tune"] = payoff.tune()
        save()
    if not results["tune"].get("best"):
        print("[payoff] no tuning trial completed: the paired runs need its weights")
        return
    best = results["tune"]["best"]["params"]
    runs = harness.plan(RECIPES, args.seeds, args.steps, seed_major=True)
    harness.run_pending(runs, results["runs"], lambda run: payoff.run_student(run, best, test), save)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapt-steps", type=int, default=100, help="Whisper adaptation steps (the benchmark: 600)")
    parser.add_argument("--video-size", type=int, default=32)
    parser.add_argument("--diagnose-steps", type=int, default=20, help="K: diagnostics at steps 0 and K")
    parser.add_argument("--stats-batches", type=int, default=10)
    parser.add_argument("--tune-trials", type=int, default=3)
    parser.add_argument("--tune-steps", type=int, default=60)
    parser.add_argument("--val-batches", type=int, default=4, help="validation batches of each trial")
    parser.add_argument("--steps", type=int, default=60, help="steps of each paired run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--beam-size", type=int, default=1, help="test decoding (1: greedy)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--work", type=Path, default=Path("runs/bench/payoff"))
    parser.add_argument("--data", type=Path, default=Path("runs/data/avspeech-small"))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the results JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    json_path = args.out.with_suffix(".json")
    results: dict[str, Any] = {"config": settings(args), "runs": {}}
    if json_path.is_file():
        previous = json.loads(json_path.read_text())
        results.update(previous if args.report_only else kept_pieces(previous, results["config"]))

    def save() -> None:
        harness.save_json(results, json_path)
        args.out.with_suffix(".md").write_text(render(results))

    if not args.report_only:
        harness.ensure_corpus("avspeech-grid", args.data, seed=0, size="small")
        ensure_whisper()
        bench = Bench(argparse.Namespace(work=args.work, data=args.data, device="cpu", video_size=args.video_size,
                                         batch_size=None, num_workers=None, smoke=False, eval_batch_size=16,
                                         beam_size=args.beam_size))
        adapt = ensure_adapted(bench, args.adapt_steps)
        if adapt is not None:
            results["adapt"] = adapt
        results["cache"] = ensure_cache(bench)
        save()
        test = split_test(args.data, args.work / "test_subsets")["all"]
        run_pieces(Payoff(bench, args), results, save, test)
    save()
    print(f"[payoff] wrote {json_path} and {args.out.with_suffix('.md')}")


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def stats_section(stats: Mapping[str, Any] | None) -> list[str]:
    if not stats:
        return ["Not run yet."]
    lines = [f"`xmodal stats` over {stats['batches']} {stats['split']} batches of the cached Whisper targets:", "",
             "| key | dims | mean square per dim | energy in the mean | std per dim (min-max) | max abs |",
             "|---|---|---|---|---|---|"]
    for key, s in stats["keys"].items():
        lines.append(f"| {key} | {s['dims']} | {_num(s['mean_square'])} | {s['energy_in_mean']:.1%} | "
                     f"{_num(s['std_min'])}-{_num(s['std_max'])} | {_num(s['max_abs'])} |")
    return lines


def diagnostics_table(step: Mapping[str, Mapping[str, float]]) -> list[str]:
    """One row per term: value, weighted gradient norm per part, ratio to the task's, cosine with the task's."""
    parts = sorted({m[len("grad_"):] for term in step.values() for m in term if m.startswith("grad_")},
                   key=lambda part: (part == "all", part))
    lines = ["| term | value | " + " | ".join(f"\|g\| {p}" for p in parts) + " | x task | cos task |",
             "|---|---|" + "---|" * len(parts) + "---|---|"]
    for name, term in step.items():
        grads = " | ".join(_num(term.get(f"grad_{p}")) for p in parts)
        lines.append(f"| {name} | {_num(term.get('value'))} | {grads} | {_num(term.get('ratio'))} | "
                     f"{_num(term.get('cos_task'))} |")
    return lines


def diagnostics_section(diagnostics: Mapping[str, Any] | None, every: int) -> list[str]:
    """The tables of the measured steps, 0 and ``every`` (the CSV log repeats the last values at the steps between)."""
    if not diagnostics:
        return ["Not run yet."]
    lines: list[str] = []
    for step in ("0", str(every)):
        for name, found in diagnostics.items():
            if step in found["steps"]:
                lines += ["", f"**{name} targets, step {step}**", "", *diagnostics_table(found["steps"][step])]
    return lines


def tune_section(tune: Mapping[str, Any] | None) -> list[str]:
    if not tune or not tune.get("trial_table"):
        return ["Not run yet."]
    names = sorted({p for t in tune["trial_table"] for p in t["params"]})
    short = [n.replace(".init_args", "").replace("model.", "") for n in names]
    lines = [f"`xmodal tune`: {tune['trials']} trials x {tune['steps']} steps, `val/cer` on {tune['val_batches']} "
             "validation batches (never the test split), TPE sampler (its first trials are random), no pruning.", "",
             "| trial | state | val/cer | s | " + " | ".join(short) + " |", "|---|---|---|---|" + "---|" * len(names)]
    for t in tune["trial_table"]:
        values = " | ".join(str(v) if isinstance(v, str) else _num(v) for v in (t["params"].get(n) for n in names))
        lines.append(f"| {t['number']} | {t['state']} | {_num(t['value'], 4)} | {_num(t['seconds'])} | {values} |")
    best = tune.get("best")
    if best:
        lines += ["", f"Best: trial {best['number']}, val/cer {best['value']:.4f}."]
    return lines


def result_section(runs: Mapping[str, Any], steps: int) -> list[str]:
    cers = {method: seed_values(runs, method, "eval", "all", "greedy_cer") for method in RECIPES}
    if not any(cers.values()):
        return ["Not run yet."]
    lines = [f"Test CER (%) after {steps} steps, greedy decoding:", "",
             "| method | seeds | CER per seed | mean ± std |", "|---|---|---|---|"]
    for method, values in cers.items():
        if values:
            mean, std = mean_std([100 * v for v in values.values()])
            per_seed = ", ".join(f"{seed}: {100 * v:.1f}" for seed, v in sorted(values.items()))
            lines.append(f"| {method} | {len(values)} | {per_seed} | {mean:.1f} ± {std:.1f} |")
    diff = paired(cers[ALONE_METHOD], cers[TUNED_METHOD], scale=100)
    reading = "no seed has both runs yet" if diff is None else verdict(diff, "CER points")
    lines += ["", f"Gain of tuned LIBS (student alone - tuned LIBS, paired over seeds): {reading}."]
    return lines


def render(results: Mapping[str, Any]) -> str:
    """The Markdown report of a results JSON (every piece that finished; "Not run yet." for the others)."""
    config = results["config"]
    lines = ["# Making distillation pay off: the lip-reading example", "",
             f"Whisper tiny.en adapted for {config['adapt_steps']} steps (the lip-reading benchmark: 600), its "
             f"outputs cached; students at {config['video_size']} px mouth crops, batch 16, CPU.", "",
             "## Teacher-target statistics", "", *stats_section(results.get("stats")), "",
             f"## Gradient diagnostics of full LIBS (steps 0 and {config['diagnose_steps']})", "",
             "Values are unweighted; |g| is the norm of the gradient of weight x term per part of the student; x task "
             "is |g| all over the character loss's; cos task is the cosine with the character loss's gradient.",
             *diagnostics_section(results.get("diagnostics"), config["diagnose_steps"]), "",
             "## Tuning the LIBS weights on the validation split", "", *tune_section(results.get("tune")), "",
             "## Student alone vs tuned LIBS", "", *result_section(results.get("runs", {}), config["steps"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

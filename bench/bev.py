"""BEV UniDistill benchmark: LiDAR -> camera distillation, loss by loss, and fusion -> LiDAR, at one step budget.

    python -m bench.bev                                  # 3 seeds, 2000 steps each (the recipes' budget)
    python -m bench.bev --rows camera_alone unidistill_all --seeds 0 --steps 300 --teacher-steps 300
    python -m bench.bev --smoke                          # tiny corpus in a temp dir, 3 steps: a pipeline check
    python -m bench.bev --rows camera_alone unidistill_feature unidistill_relation unidistill_response unidistill_all
                                                         # LiDAR -> camera only: each term alone, all three, none

Rows (``ROWS``; every student of a seed distils from the teacher trained with that seed):

1. ``lidar_teacher``: ``lidar_teacher.yaml``, the LiDAR detector alone (``--teacher-steps``);
2. ``camera_alone``: ``camera_student.yaml``, the camera detector alone;
3-5. ``unidistill_{feature,relation,response}``: ``camera_unidistill_<loss>.yaml``, camera + one UniDistill loss
   from the frozen LiDAR teacher;
6. ``unidistill_all``: ``camera_unidistill.yaml``, camera + all three losses;
7. ``fusion_teacher``: ``fusion_teacher.yaml``, the fusion detector alone (``--teacher-steps``);
8. ``fusion_to_lidar``: ``fusion_to_lidar.yaml``, the LiDAR detector distilled from the fusion teacher.

Every run is a plain ``xmodal fit`` of the recipe with paths, seed, step budget (warm-up scaled below the recipe's
2000 steps), logger, export folder, device and the teacher folder rewritten (written under ``<work>/configs``);
validation is off. Each exported model (``ExportStudent``) is scored on the test split with
:func:`xmodal.eval.loops.evaluate_bev` (nuScenes-style mAP, NDS over ATE/ASE/AOE, per-class AP). Finished
``row/seed`` entries of the results JSON are skipped on a rerun with the same budget and data and an unchanged
recipe file (each run stores its recipe's SHA-256, so results of an edited recipe are redone); a teacher whose
export folder is gone is retrained when a student still needs it. Parameters and CPU ms per sample (one thread,
batch 1, median) are measured once per model type. Results: ``bench/results/bev.{json,md}``
(``bench/bev_report.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bench import harness
from bench.harness import Run

CONFIGS = harness.CONFIGS / "bev"
RECIPE_DATA = "runs/data/bev-small"
ACCELERATOR = {"cpu": "cpu", "cuda": "gpu"}


@dataclass(frozen=True)
class Row:
    recipe: str
    teacher: str | None = None  # the row whose export (same seed) is this row's frozen teacher
    trains_teacher: bool = False  # trained with --teacher-steps


ROWS: dict[str, Row] = {
    "lidar_teacher": Row("lidar_teacher.yaml", trains_teacher=True),
    "camera_alone": Row("camera_student.yaml"),
    "unidistill_feature": Row("camera_unidistill_feature.yaml", "lidar_teacher"),
    "unidistill_relation": Row("camera_unidistill_relation.yaml", "lidar_teacher"),
    "unidistill_response": Row("camera_unidistill_response.yaml", "lidar_teacher"),
    "unidistill_all": Row("camera_unidistill.yaml", "lidar_teacher"),
    "fusion_teacher": Row("fusion_teacher.yaml", trains_teacher=True),
    "fusion_to_lidar": Row("fusion_to_lidar.yaml", "fusion_teacher"),
}
SMOKE_CORPUS = {"size": "tiny", "n_train": 8, "n_val": 2, "n_test": 4, "image_size": 32, "azimuth_steps": 180}


def plan(rows: Sequence[str]) -> list[str]:
    """``rows`` with the teachers they need, in ``ROWS`` order (teachers before their students)."""
    wanted = set(rows) | {ROWS[r].teacher for r in rows if ROWS[r].teacher}
    return [name for name in ROWS if name in wanted]


def ensure_corpus(data: Path, smoke: bool) -> None:
    """Build bev-scenes in ``data`` (``small``, or a tiny one with ``smoke``) unless its ``meta.json`` is there."""
    options: dict[str, Any] = dict(SMOKE_CORPUS, workers=1, preview=False) if smoke else {"size": "small"}
    harness.ensure_corpus("bev-scenes", data, seed=0, progress=not smoke, **options)


class Bench:
    """Paths, config rewriting, training and evaluation of one benchmark folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.work, self.data = args, args.work, args.data
        self.image_size = json.loads((self.data / "meta.json").read_text())["image_size"]

    def export(self, row: str, seed: int) -> Path:
        return self.work / "models" / f"{row}-seed{seed}"

    def config(self, row: str, seed: int) -> Path:
        """Write the rewritten recipe of ``row`` for ``seed`` and return its path."""
        run, spec = f"{row}-seed{seed}", ROWS[row]
        config = harness.load_recipe(CONFIGS / spec.recipe, {RECIPE_DATA: str(self.data)})
        config["seed_everything"] = seed
        harness.scale_schedule(config, self.args.teacher_steps if spec.trains_teacher else self.args.steps)
        trainer = config["trainer"]
        trainer.update({"accelerator": ACCELERATOR[self.args.device], "limit_val_batches": 0,
                        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(self.work / "logs"), "name": run, "version": 0}}})
        for callback in trainer["callbacks"]:
            if callback["class_path"].endswith("ExportStudent"):
                callback["init_args"]["out_dir"] = str(self.export(row, seed))
        trainer["callbacks"].append(harness.step_timer(self.work / "timers" / f"{run}.json"))
        if spec.teacher is not None:
            config["model"]["teacher"]["init_args"]["model"] = str(self.export(spec.teacher, seed))
        modality = config["data"]["modalities"][0]["init_args"]
        if modality.get("cameras", True):
            modality["image_size"] = self.image_size
        if self.args.smoke:
            config["data"].update({"batch_size": 2, "num_workers": 0})
        return harness.write_config(config, self.work / "configs" / f"{run}.yaml")

    def fit(self, row: str, seed: int) -> dict[str, Any]:
        """``xmodal fit`` one row; returns the config, wall seconds, steps and median step seconds."""
        run = f"{row}-seed{seed}"
        for stale in (self.work / "logs" / run, self.export(row, seed)):  # an interrupted run restarts
            shutil.rmtree(stale, ignore_errors=True)
        path = self.config(row, seed)
        seconds = harness.fit(path)
        timer = json.loads((self.work / "timers" / f"{run}.json").read_text())
        return {"config": str(path), "seconds": seconds, "steps": timer["steps"], "step_s": timer["median_step_s"]}

    def loader(self, config: Path, batch_size: int) -> tuple[Any, Any]:
        """The BEVModality of a written recipe and an in-order loader over the test split."""
        from xmodal.data.eval_sets import bev_loader, recipe_bev_args
        from xmodal.modalities.bev import BEVModality

        modality = BEVModality(**recipe_bev_args(config))
        return modality, bev_loader(str(self.data / "test-*.tar"), modality, batch_size, 0)

    def evaluate(self, row: str, seed: int, config: Path) -> dict[str, Any]:
        """mAP, NDS, mATE/mASE/mAOE, AP per threshold and per-class AP of an exported model on the test split."""
        from xmodal.eval.loops import evaluate_bev
        from xmodal.zoo.loading import load_detector

        model = load_detector(str(self.export(row, seed)))
        modality, loader = self.loader(config, 2 if self.args.smoke else 8)
        classes = modality.classes or []
        start = time.perf_counter()
        metrics = evaluate_bev(model, loader, classes, device=self.args.device, modalities=[modality])
        summary: dict[str, Any] = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        summary["per_class_AP"] = {name: entry["AP"] for name, entry in metrics["per_class"].items()}
        summary["seconds"] = time.perf_counter() - start
        return summary

    def cost(self, row: str, seed: int, config: Path) -> dict[str, Any]:
        """Parameters and CPU ms per sample (one thread, batch 1, median of repeated ``predict`` calls)."""
        from xmodal.contracts import count_params
        from xmodal.data.wds import prepare_on_device
        from xmodal.zoo.loading import load_detector

        model: Any = load_detector(str(self.export(row, seed)))
        modality, loader = self.loader(config, 1)
        batch = prepare_on_device(next(iter(loader)), [modality], train=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        times = []
        try:
            model.eval()
            with torch.inference_mode():
                for _ in range(3 if self.args.smoke else 20):
                    start = time.perf_counter()
                    model.predict(batch)
                    times.append(time.perf_counter() - start)
        finally:
            torch.set_num_threads(threads)
        return {"params": count_params(model), "cpu_ms_per_sample": 1000 * statistics.median(times[1:]),
                "threads": 1, "measured_on": f"{row}/seed{seed}"}


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings for the JSON, with the corpus' size and image size from its ``meta.json``."""
    meta = json.loads((args.data / "meta.json").read_text())
    return {"steps": args.steps, "teacher_steps": args.teacher_steps, "seeds": args.seeds, "rows": args.rows,
            "data": str(args.data), "device": args.device, "smoke": args.smoke,
            "corpus": {k: meta.get(k) for k in ("size", "counts", "image_size", "mean_points_per_scene")}}


def same_budget(previous: dict[str, Any], settings: dict[str, Any]) -> bool:
    """An earlier invocation's runs are reused with the same budget, data and smoke flag."""
    return all(previous.get("config", {}).get(k) == settings[k] for k in ("steps", "teacher_steps", "data", "smoke"))


def recipe_sha256(row: str) -> str:
    """Fingerprint of a row's recipe file: a finished run of an edited recipe is stale."""
    return hashlib.sha256((CONFIGS / ROWS[row].recipe).read_bytes()).hexdigest()


def must_run(bench: Bench, runs: dict[str, Any], rows: Sequence[str], run: Run) -> bool:
    """A run is done once it is in the results with its recipe unchanged since; a teacher is rerun when its export
    is gone and a student waits."""
    if run.key not in runs or runs[run.key].get("recipe_sha256") != recipe_sha256(run.method):
        return True
    waiting = [r for r in rows if ROWS[r].teacher == run.method and Run(r, run.seed).key not in runs]
    return bool(waiting) and not (bench.export(run.method, run.seed) / "config.json").is_file()


def run_row(bench: Bench, results: dict[str, Any], run: Run) -> dict[str, Any]:
    """Train one row and score it; the first run of each model type also measures its cost."""
    train = bench.fit(run.method, run.seed)
    config = Path(train["config"])
    entry = {"row": run.method, "seed": run.seed, "export": str(bench.export(run.method, run.seed)), "train": train,
             "eval": bench.evaluate(run.method, run.seed, config), "recipe_sha256": recipe_sha256(run.method)}
    kind = model_type(run.method)
    if kind not in results["models"]:
        results["models"][kind] = bench.cost(run.method, run.seed, config)
    return entry


def model_type(row: str) -> str:
    return str(yaml.safe_load((CONFIGS / ROWS[row].recipe).read_text())["model"]["student"]["init_args"]["inputs"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="rows to run (their teachers are added)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps of every student")
    parser.add_argument("--teacher-steps", type=int, default=2000,
                        help="optimizer steps of the LiDAR and fusion teachers (the same as --steps makes the "
                        "LiDAR teacher row the LiDAR-alone baseline of fusion -> LiDAR)")
    parser.add_argument("--data", "--data-root", type=Path,
                        help="bev-scenes corpus, built when missing (default runs/data/bev-small; <work>/data with "
                        "--smoke)")
    parser.add_argument("--work", type=Path, help="default runs/bench/bev (a temp dir with --smoke)")
    parser.add_argument("--out", type=Path, help="results prefix, .json/.md (default bench/results/bev; "
                        "<work>/bev with --smoke)")
    parser.add_argument("--device", choices=list(ACCELERATOR), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny corpus, 3 steps, 1 seed, batch 2: a pipeline check, the numbers mean nothing")
    args = parser.parse_args(argv)
    finish_defaults(args)
    from bench.bev_report import write_report

    ensure_corpus(args.data, args.smoke)
    bench = Bench(args)
    rows = plan(args.rows)
    json_path = args.out.with_suffix(".json")
    settings = settings_of(args)
    results: dict[str, Any] = {"config": settings, "machine": harness.machine_info(), "runs": {}, "models": {}}
    results.update(harness.resume(json_path, lambda previous: same_budget(previous, settings), ["runs", "models"]))

    def save() -> None:
        harness.save_json(results, json_path)

    budgets = {row: args.teacher_steps if ROWS[row].trains_teacher else args.steps for row in rows}
    runs = harness.plan({row: ROWS[row].recipe for row in rows}, args.seeds, budgets, seed_major=True)
    harness.run_pending(runs, results["runs"],
                        lambda run: run_row(bench, results, run), save,
                        pending=lambda run: must_run(bench, results["runs"], rows, run))
    save()
    print(f"[bench] wrote {json_path} and {write_report(results, args.out)}")
    return results


def finish_defaults(args: argparse.Namespace) -> None:
    """Fill the arguments whose defaults depend on ``--smoke``."""
    if args.smoke:
        args.steps, args.teacher_steps = min(args.steps, 3), min(args.teacher_steps, 3)
        args.seeds = args.seeds[:1]
        args.work = args.work or Path(tempfile.mkdtemp(prefix="xmodal-bev-smoke-"))
        args.data = args.data or args.work / "data"
        args.out = args.out or args.work / "bev"
    args.work = args.work or Path("runs/bench/bev")
    args.data = args.data or Path(RECIPE_DATA)
    args.out = args.out or harness.RESULTS / "bev"


if __name__ == "__main__":
    main()

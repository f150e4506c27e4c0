"""Gradient diagnostics of LiDAR -> camera UniDistill: each distillation term's gradient norm relative to the
detection loss's, for the earlier recipe and the authors' one, on the same corpus and the same LiDAR teacher.

    python -m bench.bev_diagnostics                            # 240-scene corpus, teacher 300 steps, students 41
    python -m bench.bev_diagnostics --teacher-steps 20 --steps 3 --every 1 --out /tmp/diag   # a quick check

Steps: build (or reuse) a bev-scenes corpus in ``--data`` (the generator of ``bench/bev.py``'s ``bev-small``, fewer
scenes); train the LiDAR teacher (``lidar_teacher.yaml``, ``--teacher-steps``); then run each recipe of ``RECIPES``
with ``xmodal fit --config <recipe rewritten> --diagnose=<every>`` for ``--steps`` steps (the learning-rate warm-up
scaled to the budget as ``bench/bev.py`` does, a CSV log of every step, a step timer). From each log: per measured
step, every term's value, weighted gradient norm on the whole student, ratio to the detection loss's gradient norm
and cosine with it (``diag/<term>/...``), and the median seconds per training step (diagnosed steps excluded).
Results: ``bench/results/bev_diagnostics.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import harness
from bench.bev import CONFIGS, RECIPE_DATA

GRID = "*grid"  # placeholder swapped for the recipe's own grid mapping
# The LiDAR -> camera losses before issue 23 (commit 641a41e): MSE on bev.feat (the neck), relation on the neck,
# response at the 9 keypoints with per-class probabilities and no softening, every weight 1.
EARLIER_LOSSES: list[dict[str, Any]] = [
    {"class_path": "UniDistillFeatureLoss", "init_args": {"grid": GRID, "distance": "mse", "weight": 1.0}},
    {"class_path": "UniDistillRelationLoss", "init_args": {"grid": GRID, "weight": 1.0}},
    {"class_path": "UniDistillResponseLoss",
     "init_args": {"grid": GRID, "region": "keypoints", "teacher_temperature": 1.0, "heatmap_weight": 1.0,
                   "reg_weight": 1.0, "weight": 1.0}},
]
# name: (recipe file, the distillation losses replacing the recipe's, or None to keep them)
RECIPES: dict[str, tuple[str, list[dict[str, Any]] | None]] = {
    "earlier": ("camera_unidistill.yaml", EARLIER_LOSSES),
    "reference": ("camera_unidistill.yaml", None),
    "camera_alone": ("camera_student.yaml", None),
}
STATS = ("value", "grad_all", "ratio", "cos_task")
TERM_NAMES = {"BEVDetectionLoss": "detection", "UniDistillFeatureLoss": "unidistill_feature",
              "UniDistillRelationLoss": "unidistill_relation", "UniDistillResponseLoss": "unidistill_response"}


def recipe_config(name: str, args: argparse.Namespace, teacher: Path) -> dict[str, Any]:
    """The recipe of ``name`` with this run's data, budget, teacher, logger and timer."""
    recipe, losses = RECIPES[name]
    config = harness.load_recipe(CONFIGS / recipe, {RECIPE_DATA: str(args.data)})
    harness.scale_schedule(config, args.steps)
    model = config["model"]
    if losses is not None:
        grid = model["student"]["init_args"]["grid"]
        replaced = [{**loss, "init_args": {**loss["init_args"], "grid": grid}} for loss in losses]
        model["losses"] = model["losses"][:1] + replaced  # the detection loss stays first
    if "teacher" in model:
        model["teacher"]["init_args"]["model"] = str(teacher)
    trainer = config["trainer"]
    trainer.update({"accelerator": "cpu", "limit_val_batches": 0, "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(args.work / "logs"), "name": name, "version": 0}}})
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ExportStudent"):
            callback["init_args"]["out_dir"] = str(args.work / "models" / name)
    trainer["callbacks"].append(harness.step_timer(args.work / "timers" / f"{name}.json"))
    config["data"]["modalities"][0]["init_args"]["image_size"] = json.loads(
        (args.data / "meta.json").read_text())["image_size"]
    return config


def train_teacher(args: argparse.Namespace) -> Path:
    """The LiDAR teacher (``lidar_teacher.yaml`` for ``--teacher-steps``), reused when its export is there."""
    out = args.work / "models" / "lidar_teacher"
    if (out / "config.json").is_file():
        return out
    config = harness.load_recipe(CONFIGS / "lidar_teacher.yaml", {RECIPE_DATA: str(args.data)})
    harness.scale_schedule(config, args.teacher_steps)
    trainer = config["trainer"]
    trainer.update({"accelerator": "cpu", "limit_val_batches": 0, "logger": False})
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ExportStudent"):
            callback["init_args"]["out_dir"] = str(out)
    trainer["callbacks"].append(harness.step_timer(args.work / "timers" / "lidar_teacher.json"))
    harness.fit(harness.write_config(config, args.work / "configs" / "lidar_teacher.yaml"))
    return out


def read_diagnostics(log: Path, every: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{step: {term: {stat: value}}}`` from a CSV log's ``diag/<term>/<stat>`` columns at the measured steps
    (multiples of ``every``; the logger repeats a measurement on the next step's row)."""
    by_step: dict[str, dict[str, dict[str, float]]] = {}
    with log.open() as f:
        for row in csv.DictReader(f):
            if int(row["step"]) % every:
                continue
            for column, cell in row.items():
                parts = column.split("/")
                if len(parts) == 3 and parts[0] == "diag" and parts[2] in STATS and cell not in ("", None):
                    by_step.setdefault(row["step"], {}).setdefault(parts[1], {})[parts[2]] = float(cell)
    return by_step


def run_recipe(name: str, args: argparse.Namespace, teacher: Path) -> dict[str, Any]:
    shutil.rmtree(args.work / "logs" / name, ignore_errors=True)
    config = recipe_config(name, args, teacher)
    losses = config["model"]["losses"]
    weights = {TERM_NAMES[loss["class_path"]]: loss["init_args"].get("weight", 1.0) for loss in losses}
    path = harness.write_config(config, args.work / "configs" / f"{name}.yaml")
    command = ["fit", "--config", str(path), f"--diagnose={args.every}"]
    start = time.perf_counter()
    harness.xmodal(command)
    seconds = time.perf_counter() - start
    timer = json.loads((args.work / "timers" / f"{name}.json").read_text())
    diagnosed = {int(s) for s in range(0, args.steps, args.every)}
    step_s = [t for i, t in enumerate(timer.get("step_s", [])) if i not in diagnosed]
    return {"command": "xmodal " + " ".join(command), "weights": weights, "seconds": seconds, "steps": timer["steps"],
            "median_step_s": statistics.median(step_s) if step_s else timer["median_step_s"],
            "diagnostics": read_diagnostics(args.work / "logs" / name / "version_0" / "metrics.csv", args.every)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/data/bev-diag"))
    parser.add_argument("--scenes", type=int, default=240, help="training scenes of a corpus built here")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/bev_diagnostics"))
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "bev_diagnostics")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=41, help="student steps per recipe")
    parser.add_argument("--every", type=int, default=20, help="--diagnose=<every>")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args(argv)
    harness.ensure_corpus("bev-scenes", args.data, seed=0, size="small", n_train=args.scenes, n_val=8, n_test=8,
                          workers=1)
    machine = harness.machine_info()
    teacher = train_teacher(args)
    timer = args.work / "timers" / "lidar_teacher.json"
    results: dict[str, Any] = {
        "config": {"data": str(args.data), "scenes": args.scenes, "teacher_steps": args.teacher_steps,
                   "steps": args.steps, "every": args.every},
        "machine": machine, "recipes": {},
        "teacher_median_step_s": json.loads(timer.read_text())["median_step_s"] if timer.is_file() else None,
    }
    for name in args.recipes:
        results["recipes"][name] = run_recipe(name, args, teacher)
        harness.save_json(results, args.out.with_suffix(".json"))
    from bench.bev_report import write_diagnostics_report

    print(f"[bench] wrote {args.out.with_suffix('.json')} and {write_diagnostics_report(results, args.out)}")
    return results


if __name__ == "__main__":
    main()

"""``xmodal eval bev``: nuScenes-style 3D detection mAP/NDS (protocol in :mod:`xmodal.eval.bev`) and BEV renders.

Usage::

    xmodal eval bev --results results.json --shards 'data/bev/test-*.tar' [--classes car truck pedestrian cyclist]
    xmodal eval bev --model runs/models/bev-camera --config configs/bev/camera_student.yaml --shards ...
                    [--write-results results.json] [--render 8 --render-dir renders/] [--out metrics.json]
    xmodal eval bev --config configs/bev/camera_unidistill.yaml --checkpoint last.ckpt [--part teacher] --shards ...

``--model`` is an exported detector folder (what ``ExportStudent`` writes) or zoo name; ``--config`` gives the
recipe's BEVModality settings (classes, image size, points) and, without ``--model``, rebuilds its Distiller
(``--checkpoint`` weights; ``--part teacher`` scores the frozen teacher).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from xmodal.commands.eval_common import emit_results
from xmodal.data.eval_sets import bev_loader, recipe_bev_args
from xmodal.eval.bev import TP_ERRORS, Detector, read_results
from xmodal.eval.loops import evaluate_bev, evaluate_results
from xmodal.modalities.bev import BEVModality
from xmodal.modalities.bev_nets import DEFAULT_CLASSES
from xmodal.render import DEFAULT_GRID_RANGE, BEVRenders
from xmodal.zoo.loading import load_detector


def check_bev_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot express; ``parser.error`` exits with status 2."""
    if not (args.results or args.model or args.config):
        parser.error("one of --results, --model or --config is required")
    if args.results and (args.config or args.checkpoint or args.write_results):
        parser.error("--config, --checkpoint and --write-results need a model, not --results")
    if args.checkpoint and (args.model or not args.config):
        parser.error("--checkpoint needs --config (and no --model)")
    if args.render > 0 and not args.render_dir:
        parser.error("--render needs --render-dir")
    if args.batch_size < 1 or args.render < 0:
        parser.error("--batch-size must be >= 1 and --render >= 0")


def run_bev(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """``xmodal eval bev``: score a results JSON or a detector; print a table and the JSON (``--out`` writes it)."""
    check_bev_args(parser, args)
    recipe = recipe_bev_args(args.config) if args.config else {}
    model: Detector | None = None
    if not args.results:
        try:
            model = load_detector(args.model, args.config, args.checkpoint, args.part)
        except (FileNotFoundError, ValueError, ImportError, KeyError, TypeError) as error:
            parser.error(str(error))
    model_classes, extent, sensors = detector_traits(model)
    classes = list(args.classes or recipe.get("classes") or model_classes or DEFAULT_CLASSES)
    settings = {**recipe, "classes": classes}
    if args.results:
        settings["cameras"] = False  # only boxes and points are needed
    elif "cameras" not in settings and sensors:
        settings["cameras"] = "camera" in sensors
    if args.image_size:
        settings["image_size"] = args.image_size
    if args.max_points:
        settings["max_points"] = args.max_points
    modality = BEVModality(**settings)
    options: dict[str, Any] = {"max_range": args.max_range, "min_gt_points": args.min_gt_points,
                               "ignore_empty_classes": not args.keep_empty_classes}
    renders = BEVRenders(args.render, args.render_dir, args.grid_range or extent or DEFAULT_GRID_RANGE,
                         args.score_threshold, classes) if args.render > 0 else None
    try:
        loader = bev_loader(args.shards, modality, args.batch_size, args.num_workers)
        if model is None:
            metrics = evaluate_results(read_results(args.results, classes), loader, classes, on_batch=renders,
                                       **options)
        else:
            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            meta = {f"use_{sensor}": True for sensor in args.sensors or sensors}
            metrics = evaluate_bev(model, loader, classes, device=device, modalities=[modality],
                                   results_path=args.write_results, results_meta=meta, on_batch=renders, **options)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"xmodal eval bev: {error}") from error
    if renders is not None and renders.paths:
        metrics["renders"] = renders.paths
    out = {"task": "bev", "model": args.results or args.model or args.config, "dataset": args.shards,
           "classes": classes, "metrics": metrics, "skipped": loader.tally.as_dict()}
    print(format_bev_table(out))
    print(f"data: {loader.tally.summary()}")
    emit_results(out, args.out)
    return out


def detector_traits(model: Any) -> tuple[list[str] | None, list[float] | None, list[str]]:
    """Class names, BEV extent and sensors of a detector that says them (``grid.classes``, ``grid.x_range``,
    ``grid.y_range``, ``inputs`` as :class:`~xmodal.modalities.bev_detector.BEVDetector` has); ``None`` / ``[]``
    otherwise."""
    net = getattr(model, "detector", model)  # a BEVTeacher wraps its detector
    inputs, grid = getattr(net, "inputs", None), getattr(net, "grid", None)
    classes = getattr(grid, "classes", None)
    x, y = getattr(grid, "x_range", None), getattr(grid, "y_range", None)
    extent = [float(x[0]), float(y[0]), float(x[1]), float(y[1])] if x is not None and y is not None else None
    sensors = {"lidar": ["lidar"], "camera": ["camera"], "fusion": ["camera", "lidar"]}.get(str(inputs), [])
    return (list(classes) if classes is not None else None), extent, sensors


def format_bev_table(results: Mapping[str, Any]) -> str:
    """The summary numbers, then one row per class."""
    metrics = results["metrics"]
    ap_keys = [f"AP@{t:g}" for t in metrics["protocol"]["dist_thresholds"]]
    lines = [f"bev  model={results['model']}  data={results['dataset']}  samples={metrics['samples']}"]
    lines += [f"  {key:<6} {metrics[key]:.4f}" for key in ("mAP", "NDS", *[f"m{e}" for e in TP_ERRORS])]
    columns = ["gt", "pred", *ap_keys, *TP_ERRORS]
    lines.append(f"  {'class':<12}" + "".join(f"{c:>8}" for c in columns))
    for name, row in metrics["per_class"].items():
        cells = [f"{row[c]:>8}" if isinstance(row[c], int) else f"{row[c]:>8.3f}" if row[c] is not None
                 else f"{'-':>8}" for c in columns]
        lines.append(f"  {name:<12}" + "".join(cells))
    return "\n".join(lines)

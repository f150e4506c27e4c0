"""The parsers of ``xmodal eval`` and its tasks, torch-free: ``xmodal eval TASK --help`` imports no model code.

The tasks' runners live in :mod:`~xmodal.commands.eval` (zeroshot, retrieval), :mod:`~xmodal.commands.eval_base2novel`,
:mod:`~xmodal.commands.eval_asr` and :mod:`~xmodal.commands.eval_bev`.
"""

from __future__ import annotations

import argparse
from typing import Any

from xmodal.commands.eval_common import PROG, add_common, add_model
from xmodal.sources import module_constant

DEFAULT_BEV_CLASSES: tuple[str, ...] = module_constant("xmodal.modalities.bev_nets", "DEFAULT_CLASSES")


def add_task(tasks: Any, name: str, summary: str) -> tuple[argparse.ArgumentParser, Any]:
    """A task of a dual encoder (``--model``) and its group of data sources, of which one is required."""
    task = tasks.add_parser(name, help=summary)
    add_model(task)
    return task, task.add_mutually_exclusive_group(required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Zero-shot classification and retrieval benchmarks.")
    tasks = parser.add_subparsers(dest="task", required=True)

    zeroshot, source = add_task(tasks, "zeroshot", "zero-shot top-1/top-5 accuracy")
    source.add_argument("--shards", metavar="PATTERN",
                        help="WebDataset shard pattern (brace/glob) with png/jpg and a json 'label'")
    source.add_argument("--folder", metavar="DIR", help="ImageNet-style folder: DIR/<class_name>/*.jpg")
    zeroshot.add_argument("--classes", metavar="JSON",
                          help='{"classes": [...], "templates": [...]} or a list of names; required with --shards, '
                          "optional with --folder (default: folder names)")
    zeroshot.add_argument("--templates", nargs="+", metavar="TEMPLATE",
                          help="prompt templates with a {} placeholder (default: the --classes JSON's, "
                          "else 'a photo of a {}.')")
    add_common(zeroshot)
    zeroshot.set_defaults(subparser=zeroshot)

    retrieval, source = add_task(tasks, "retrieval", "image<->text recall@1/5/10")
    source.add_argument("--shards", metavar="PATTERN",
                        help="WebDataset shard pattern with png/jpg and txt (one caption per image)")
    source.add_argument("--captions-json", metavar="FILE", help="Karpathy-split or COCO-annotations caption file")
    retrieval.add_argument("--image-root", metavar="DIR", help="folder the caption file's image paths are relative to")
    retrieval.add_argument("--split", help="Karpathy split to keep (default: 'test' when the file has splits, "
                           "else every image; 'all' keeps every image)")
    add_common(retrieval)
    retrieval.set_defaults(subparser=retrieval)

    add_base2novel_parser(tasks)
    add_asr_parser(tasks)
    add_bev_parser(tasks)
    return parser


def add_base2novel_parser(tasks: Any) -> None:
    """Add the ``base2novel`` task to ``xmodal eval``'s sub-parsers."""
    task, source = add_task(tasks, "base2novel", "base / novel / harmonic-mean top-1 accuracy (base-to-novel)")
    source.add_argument("--shards", metavar="PATTERN", help="WebDataset shards with png/jpg and a json 'label'")
    source.add_argument("--folder", metavar="DIR", help="ImageNet-style folder: DIR/<class_name>/*.png")
    task.add_argument("--split", required=True, metavar="JSON",
                      help='class split: {"classes": [...], "base": [indices], "novel": [indices]}')
    task.add_argument("--class-vectors", metavar="FILE",
                      help="classify against this stored class vectors file (default: the model's own classifier)")
    task.add_argument("--templates", nargs="+", metavar="TEMPLATE",
                      help="zero-shot prompt templates for plain CLIPs (default: 'a photo of a {}.')")
    add_common(task)
    task.set_defaults(subparser=task)


def add_asr_parser(tasks: Any) -> argparse.ArgumentParser:
    """Add the ``asr`` subcommand to ``xmodal eval``'s subparsers."""
    asr = tasks.add_parser("asr", help="lip-reading CER/WER (greedy and beam) and alignment plots")
    model = asr.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", metavar="NAME_OR_DIR", help="zoo name or folder of a LipReader")
    model.add_argument("--config", metavar="YAML", help="training recipe (rebuilds student, teacher and losses)")
    asr.add_argument("--checkpoint", metavar="CKPT", help="Lightning checkpoint of --config's run")
    source = asr.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", metavar="PATTERN", help="WebDataset shards with mp4 + txt (+ flac for --plot)")
    source.add_argument("--list", metavar="FILE", help="file list: 'relative/video/path transcript...' per line")
    asr.add_argument("--root", metavar="DIR", help="folder --list paths are relative to (default: the list's)")
    asr.add_argument("--beam-size", type=int, default=4, metavar="K", help="beam width; 1 = greedy only")
    asr.add_argument("--num-frames", type=int, default=75, metavar="N", help="most frames per clip (75 = 3 s)")
    asr.add_argument("--size", type=int, default=64, metavar="PX", help="frame side (64 = the recipe's)")
    asr.add_argument("--fps", type=float, default=25.0, help="frame rate clips are re-timed to")
    asr.add_argument("--plot", metavar="DIR", help="write DIR/alignment.png (needs --config and audio)")
    asr.add_argument("--plot-count", type=int, default=4, metavar="N", help="utterances in the plot")
    asr.add_argument("--batch-size", type=int, default=16, metavar="N")
    asr.add_argument("--device", help="cpu, cuda... (default: cuda when available)")
    asr.add_argument("--out", metavar="FILE", help="write the results JSON here")
    asr.set_defaults(subparser=asr)
    return asr


def add_bev_parser(tasks: Any) -> argparse.ArgumentParser:
    """Add the ``bev`` subcommand to ``xmodal eval``'s subparsers."""
    bev = tasks.add_parser("bev", help="nuScenes-style 3D detection mAP/NDS (TP errors ATE/ASE/AOE) and BEV renders")
    source = bev.add_mutually_exclusive_group()
    source.add_argument("--results", metavar="JSON", help="nuScenes results JSON to score (no model needed)")
    source.add_argument("--model", metavar="NAME_OR_DIR",
                        help="exported detector folder (ExportStudent's) or zoo name")
    bev.add_argument("--config", metavar="YAML",
                     help="training recipe: its data BEVModality settings, and without --model its model section")
    bev.add_argument("--checkpoint", metavar="CKPT", help="Lightning checkpoint of --config's run (without --model)")
    bev.add_argument("--part", choices=("student", "teacher"), default="student",
                     help="which model of --config's recipe to score (default: student)")
    bev.add_argument("--shards", required=True, metavar="PATTERN", help="ground-truth BEV shards (brace/glob)")
    bev.add_argument("--classes", nargs="+", metavar="NAME",
                     help="class names in label order (default: the recipe's BEVModality classes, else the "
                     f"model's grid classes, else {' '.join(DEFAULT_BEV_CLASSES)})")
    bev.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                     help="camera images are resized to this (default: the recipe's, else as stored)")
    bev.add_argument("--max-points", type=int, metavar="N", help="most LiDAR points per sweep (default: the recipe's)")
    bev.add_argument("--max-range", type=float, metavar="M",
                     help="ignore boxes M metres or farther (BEV) from the ego")
    bev.add_argument("--min-gt-points", type=int, default=1, metavar="N",
                     help="ignore ground truth with fewer LiDAR points, where the batches carry box_points")
    bev.add_argument("--keep-empty-classes", action="store_true",
                     help="score classes without ground truth as AP 0, errors 1 (the devkit's way) instead of "
                     "leaving them out")
    bev.add_argument("--write-results", metavar="JSON", help="with a model: write its predictions as nuScenes results")
    bev.add_argument("--sensors", nargs="+", choices=("camera", "lidar", "radar"),
                     help="sensors the model used, for the written results' meta (default: the model's inputs)")
    bev.add_argument("--render", type=int, default=0, metavar="N", help="render the first N samples as PNG")
    bev.add_argument("--render-dir", metavar="DIR", help="folder for --render's PNGs")
    bev.add_argument("--score-threshold", type=float, default=0.3, metavar="S",
                     help="lowest score of a rendered prediction")
    bev.add_argument("--grid-range", type=float, nargs=4, metavar=("XMIN", "YMIN", "XMAX", "YMAX"),
                     help="extent of the renders in metres (default: the model's grid, else -32 -32 32 32)")
    bev.add_argument("--batch-size", type=int, default=8, metavar="N")
    bev.add_argument("--num-workers", type=int, default=0, metavar="N", help="data-loader worker processes")
    bev.add_argument("--device", help="cpu, cuda... (default: cuda when available)")
    bev.add_argument("--out", metavar="FILE", help="write the results JSON here")
    bev.set_defaults(subparser=bev)
    return bev

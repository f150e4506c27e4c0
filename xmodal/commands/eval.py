"""``xmodal eval zeroshot|retrieval|base2novel|asr|bev``: benchmark a zoo model or checkpoint folder.

Usage::

    xmodal eval zeroshot  --model NAME_OR_DIR --shards 'data/test-*.tar' --classes data/classes.json
    xmodal eval zeroshot  --model NAME_OR_DIR --folder imagenet/val [--classes names.json] [--templates ...]
    xmodal eval retrieval --model NAME_OR_DIR --shards 'data/test-*.tar'
    xmodal eval retrieval --model NAME_OR_DIR --captions-json dataset_coco.json --image-root coco/ [--split test]
    xmodal eval base2novel --model NAME_OR_DIR --split split.json (--shards 'data/test-*.tar' | --folder DIR)
    xmodal eval asr       (--model NAME_OR_DIR | --config recipe.yaml [--checkpoint CKPT]) (--shards ... | --list FILE)
                          [--beam-size 4] [--plot DIR]   (lip reading CER/WER; see xmodal.commands.eval_asr)
    xmodal eval bev       (--results nuscenes.json | --config recipe.yaml [--checkpoint CKPT]) --shards ...
                          [--render N --render-dir DIR]   (3D detection mAP/NDS; see xmodal.commands.eval_bev)

Results are printed as a table and as JSON (``--out`` also writes the JSON), in clip_benchmark's shape:
``{"task", "model", "dataset", "image_size", "metrics": {...}, "skipped": {"samples", "failed_shards"}}``; shards
that yield no sample at all stop the run with a one-line error.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmodal.commands.eval_args import build_parser
from xmodal.commands.eval_common import PROG, emit_results, format_table, load_model, model_image_size

if TYPE_CHECKING:
    from xmodal.data.wds import LossTally
    from xmodal.eval.zeroshot import DualEncoder

    Run = tuple[dict[str, Any], str, LossTally]  # metrics, dataset description, what the shards lost

# Model code (torch) is imported after parsing, so that `xmodal eval [TASK] --help` answers at once.


def eval_main(argv: Sequence[str]) -> None:
    """Entry point of ``xmodal eval``; bad arguments exit with status 2 and a message naming the flag."""
    args = build_parser().parse_args(list(argv))
    task: argparse.ArgumentParser = args.subparser  # errors are reported with the task's usage line
    if args.task == "asr":
        from xmodal.commands.eval_asr import run_asr

        run_asr(task, args)
        return
    if args.task == "bev":
        from xmodal.commands.eval_bev import run_bev

        run_bev(task, args)
        return
    check_args(task, args)
    if args.task == "base2novel":
        from xmodal.commands.eval_base2novel import run_base2novel

        return run_base2novel(task, args)
    import torch

    model = load_model(task, args.model)
    image_size = args.image_size or model_image_size(task, model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = run_zeroshot if args.task == "zeroshot" else run_retrieval
    try:
        metrics, dataset, tally = run(model, args, image_size, device)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{PROG} {args.task}: {error}") from error
    results = {"task": args.task, "model": args.model, "dataset": dataset, "image_size": image_size,
               "metrics": metrics, "skipped": tally.as_dict()}
    print(format_table(results))
    print(f"data: {tally.summary()}")
    emit_results(results, args.out)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot express; ``parser.error`` exits with status 2."""
    if args.task == "zeroshot" and args.shards and not args.classes:
        parser.error("--classes is required with --shards (a JSON with the class names in label order)")
    if args.task == "retrieval" and args.captions_json and not args.image_root:
        parser.error("--image-root is required with --captions-json")
    if args.task == "retrieval" and args.image_root and not args.captions_json:
        parser.error("--image-root only applies to --captions-json")
    for flag in ("batch_size", "image_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")


def run_zeroshot(model: DualEncoder, args: argparse.Namespace, image_size: int, device: str) -> Run:
    from xmodal.data.eval_sets import shard_loader
    from xmodal.data.wds import LossTally
    from xmodal.eval.formats import read_classes
    from xmodal.eval.loops import evaluate_zeroshot, evaluate_zeroshot_folder
    from xmodal.eval.zeroshot import SIMPLE_TEMPLATES

    classnames, json_templates = read_classes(args.classes) if args.classes else (None, None)
    templates = args.templates or json_templates or list(SIMPLE_TEMPLATES)
    if args.folder:
        metrics = evaluate_zeroshot_folder(model, args.folder, templates, image_size, args.batch_size, device,
                                           classnames, args.num_workers)
        return metrics, args.folder, LossTally()
    assert classnames is not None  # check_args
    loader = shard_loader(args.shards, image_size, args.batch_size, args.num_workers)
    metrics = evaluate_zeroshot(model, loader, classnames, templates, device)
    return {**metrics, "classes": len(classnames)}, args.shards, loader.tally


def run_retrieval(model: DualEncoder, args: argparse.Namespace, image_size: int, device: str) -> Run:
    from xmodal.data.eval_sets import shard_loader
    from xmodal.data.wds import LossTally
    from xmodal.eval.loops import evaluate_retrieval, evaluate_retrieval_json

    if args.shards:
        loader = shard_loader(args.shards, image_size, args.batch_size, args.num_workers)
        return evaluate_retrieval(model, loader, device), args.shards, loader.tally
    split = resolve_split(args.captions_json, args.split)
    metrics = evaluate_retrieval_json(model, args.captions_json, args.image_root, image_size, args.batch_size,
                                      split, device, args.num_workers)
    return metrics, args.captions_json + (f" ({split})" if split else ""), LossTally()


def resolve_split(captions_json: str, split: str | None) -> str | None:
    """``--split``: ``"all"`` -> every image; unset -> ``"test"`` when the file's images carry a split field."""
    if split == "all":
        return None
    if split is not None:
        return split
    data = json.loads(Path(captions_json).read_text())
    images = data.get("images") or [] if isinstance(data, dict) else []
    return "test" if any(isinstance(img, dict) and "split" in img for img in images) else None


"""``xmodal eval zeroshot|retrieval``: benchmark a zoo model or checkpoint folder on shards, folders or caption files.

Usage::

    xmodal eval zeroshot  --model NAME_OR_DIR --shards 'data/test-*.tar' --classes data/classes.json
    xmodal eval zeroshot  --model NAME_OR_DIR --folder imagenet/val [--classes names.json] [--templates ...]
    xmodal eval retrieval --model NAME_OR_DIR --shards 'data/test-*.tar'
    xmodal eval retrieval --model NAME_OR_DIR --captions-json dataset_coco.json --image-root coco/ [--split test]
    xmodal eval base2novel --model NAME_OR_DIR --split split.json (--shards 'data/test-*.tar' | --folder DIR)
    xmodal eval asr       (--model NAME_OR_DIR | --config recipe.yaml [--checkpoint CKPT]) (--shards ... | --list FILE)
                          [--beam-size 4] [--plot DIR]   (lip reading CER/WER; see xmodal.eval.asr)
    xmodal eval bev       (--results nuscenes.json | --config recipe.yaml [--checkpoint CKPT]) --shards ...
                          [--render N --render-dir DIR]   (3D detection mAP/NDS; see xmodal.eval.bev)

Results are printed as a table and as JSON (``--out`` also writes the JSON), in clip_benchmark's shape:
``{"task", "model", "dataset", "image_size", "metrics": {...}, "skipped": {"samples", "failed_shards"}}``; shards
that yield no sample at all stop the run with a one-line error.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader

from xmodal.data.wds import CountedBatches, LossTally
from xmodal.eval.zeroshot import SIMPLE_TEMPLATES, DualEncoder

PROG = "xmodal eval"
Run = tuple[dict[str, Any], str, LossTally]  # metrics, dataset description, what the shards lost


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Zero-shot classification and retrieval benchmarks.")
    tasks = parser.add_subparsers(dest="task", required=True)

    zeroshot = tasks.add_parser("zeroshot", help="zero-shot top-1/top-5 accuracy")
    add_model(zeroshot)
    source = zeroshot.add_mutually_exclusive_group(required=True)
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

    retrieval = tasks.add_parser("retrieval", help="image<->text recall@1/5/10")
    add_model(retrieval)
    source = retrieval.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", metavar="PATTERN",
                        help="WebDataset shard pattern with png/jpg and txt (one caption per image)")
    source.add_argument("--captions-json", metavar="FILE", help="Karpathy-split or COCO-annotations caption file")
    retrieval.add_argument("--image-root", metavar="DIR", help="folder the caption file's image paths are relative to")
    retrieval.add_argument("--split", help="Karpathy split to keep (default: 'test' when the file has splits, "
                           "else every image; 'all' keeps every image)")
    add_common(retrieval)
    retrieval.set_defaults(subparser=retrieval)

    from xmodal.eval.base2novel import add_base2novel_parser

    add_base2novel_parser(tasks, add_model, add_common)

    from xmodal.eval.asr import add_asr_parser

    add_asr_parser(tasks)

    from xmodal.eval.bev import add_bev_parser

    add_bev_parser(tasks)
    return parser


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME_OR_DIR",
                        help="zoo name (xmodal.zoo.list_models) or checkpoint folder")


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, metavar="N",
                        help="side images are decoded to (default: the model's input size)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N")
    parser.add_argument("--num-workers", type=int, default=0, metavar="N", help="data-loader worker processes")
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument("--out", metavar="FILE", help="write the results JSON here")


def eval_main(argv: Sequence[str]) -> None:
    """Entry point of ``xmodal eval``; bad arguments exit with status 2 and a message naming the flag."""
    args = build_parser().parse_args(list(argv))
    task: argparse.ArgumentParser = args.subparser  # errors are reported with the task's usage line
    if args.task == "asr":
        from xmodal.eval.asr import run_asr

        run_asr(task, args)
        return
    if args.task == "bev":
        from xmodal.eval.bev import run_bev

        run_bev(task, args)
        return
    check_args(task, args)
    if args.task == "base2novel":
        from xmodal.eval.base2novel import base2novel_cli

        return base2novel_cli(task, args)
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
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


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


def load_model(parser: argparse.ArgumentParser, name_or_path: str) -> DualEncoder:
    from xmodal.zoo import ChecksumError, create_model

    try:
        model = create_model(name_or_path)
    except (FileNotFoundError, ValueError, ImportError, ChecksumError) as error:
        parser.error(f"--model {name_or_path}: {error}")
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        parser.error(f"--model {name_or_path}: {type(model).__name__} has no encode_image/encode_text")
    return cast(DualEncoder, model)


def model_image_size(parser: argparse.ArgumentParser, model: DualEncoder) -> int:
    size = getattr(getattr(model, "normalize", None), "size", None)
    if not isinstance(size, int):
        parser.error(f"{type(model).__name__} does not say its input size; pass --image-size")
    return size


def read_classes(path: str) -> tuple[list[str] | None, list[str] | None]:
    """Class names and templates from a classes JSON (``{"classes", "templates"?}`` or a plain list of names)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return [str(c) for c in data], None
    if not isinstance(data, dict) or "classes" not in data:
        raise ValueError(f"{path}: expected {{'classes': [...], 'templates': [...]}} or a list of class names")
    templates = data.get("templates")
    return [str(c) for c in data["classes"]], [str(t) for t in templates] if templates else None


def shard_loader(pattern: str, image_size: int, batch_size: int, num_workers: int) -> CountedBatches:
    """An in-order loader of uint8 images, captions and labels from shards (corrupt samples skipped and counted)."""
    from xmodal.data.wds import make_pipeline
    from xmodal.modalities.image import ImageModality
    from xmodal.modalities.text import TextModality

    pipeline = make_pipeline(pattern, [ImageModality(image_size), TextModality()], batch_size, train=False)
    loader = DataLoader(pipeline, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available())
    return CountedBatches(loader, pattern)


def run_zeroshot(model: DualEncoder, args: argparse.Namespace, image_size: int, device: str) -> Run:
    from xmodal.eval.folders import evaluate_zeroshot_folder
    from xmodal.eval.zeroshot import evaluate_zeroshot

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
    from xmodal.eval.retrieval import evaluate_retrieval, evaluate_retrieval_json

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


def format_table(results: dict[str, Any]) -> str:
    """A two-column metric table under a header naming the task, model and data."""
    metrics = results["metrics"]
    width = max(len(k) for k in metrics)
    lines = [f"{results['task']}  model={results['model']}  data={results['dataset']}  size={results['image_size']}"]
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<{width}}  {shown:>8}")
    return "\n".join(lines)

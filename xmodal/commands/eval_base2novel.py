"""``xmodal eval base2novel``: base / novel / harmonic-mean accuracy (see :mod:`xmodal.eval.base2novel`)."""

from __future__ import annotations

import argparse
from typing import Any, cast

import torch

from xmodal.classvectors import load_class_vectors
from xmodal.commands.eval_common import PROG, emit_results, format_table, model_image_size
from xmodal.data.eval_sets import folder_loader, shard_loader
from xmodal.data.wds import CountedBatches, LossTally
from xmodal.eval.base2novel import read_split
from xmodal.eval.loops import evaluate_base2novel
from xmodal.eval.zeroshot import SIMPLE_TEMPLATES


def run_base2novel(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Run ``xmodal eval base2novel`` from parsed arguments; print the table and JSON, write ``--out``."""
    from xmodal.zoo import ChecksumError, create_model

    try:
        model = create_model(args.model)
        split = read_split(args.split)
        classifier = None
        if args.class_vectors:
            classifier = load_class_vectors(args.class_vectors, classes=split.classes).vectors
    except (FileNotFoundError, ValueError, ImportError, ChecksumError, KeyError) as error:
        parser.error(str(error))
    if not hasattr(model, "embed_images"):
        parser.error(f"--model {args.model}: {type(model).__name__} has no embed_images")
    image_size = args.image_size or model_image_size(parser, cast(Any, model))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.folder:
            loader = folder_loader(args.folder, split, image_size, args.batch_size, args.num_workers)
        else:
            loader = shard_loader(args.shards, image_size, args.batch_size, args.num_workers)
        metrics = evaluate_base2novel(model, loader, split, classifier, args.templates or SIMPLE_TEMPLATES, device)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{PROG} base2novel: {error}") from error
    tally = loader.tally if isinstance(loader, CountedBatches) else LossTally()
    results = {"task": "base2novel", "model": args.model, "dataset": args.folder or args.shards,
               "image_size": image_size, "metrics": metrics, "skipped": tally.as_dict()}
    print(format_table(results))
    print(f"data: {tally.summary()}")
    emit_results(results, args.out)

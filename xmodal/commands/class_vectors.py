"""``xmodal class-vectors --teacher DIR --out FILE``: store a prompt-tuned teacher's class vectors once (PromptKD)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def class_vectors_main(argv: Sequence[str]) -> None:
    """``xmodal class-vectors``: compute a stage-1 prompted teacher's class vectors once and store them."""
    parser = argparse.ArgumentParser(prog="xmodal class-vectors", description=class_vectors_main.__doc__)
    parser.add_argument("--teacher", required=True, metavar="DIR",
                        help="checkpoint folder of a prompt-tuned PromptedCLIP (stage 1's ExportStudent output)")
    parser.add_argument("--out", required=True, metavar="FILE", help="class vectors file to write (.safetensors)")
    parser.add_argument("--classes", metavar="JSON",
                        help="classes JSON ({'classes': [...]} or a list); default: every class the teacher knows")
    args = parser.parse_args(list(argv))
    from xmodal.eval.formats import read_classes
    from xmodal.modalities.prompts import PromptedCLIP
    from xmodal.teachers.prompted import store_class_vectors
    from xmodal.zoo import create_model

    model = create_model(args.teacher)
    if not isinstance(model, PromptedCLIP):
        parser.error(f"--teacher {args.teacher}: {type(model).__name__} is not a PromptedCLIP")
    classes = read_classes(args.classes)[0] if args.classes else None
    path = store_class_vectors(model, args.out, classes)
    print(f"stored {len(classes or model.all_classes)} class vectors in {path}")

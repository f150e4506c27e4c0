"""What the ``xmodal eval`` tasks share: the model and common options, loading a dual encoder, printing results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from xmodal.eval.zeroshot import DualEncoder

PROG = "xmodal eval"


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


def load_model(parser: argparse.ArgumentParser, name_or_path: str) -> DualEncoder:
    from xmodal.zoo import ChecksumError, create_model

    try:
        model = create_model(name_or_path)
    except (FileNotFoundError, ValueError, ImportError, ChecksumError) as error:
        parser.error(f"--model {name_or_path}: {error}")
    if not (hasattr(model, "embed_images") and hasattr(model, "embed_texts")):
        parser.error(f"--model {name_or_path}: {type(model).__name__} has no embed_images/embed_texts")
    return cast("DualEncoder", model)


def model_image_size(parser: argparse.ArgumentParser, model: DualEncoder) -> int:
    size = getattr(getattr(model, "normalize", None), "size", None)
    if not isinstance(size, int):
        parser.error(f"{type(model).__name__} does not say its input size; pass --image-size")
    return size


def format_table(results: dict[str, Any]) -> str:
    """A two-column metric table under a header naming the task, model and data."""
    metrics = results["metrics"]
    width = max(len(k) for k in metrics)
    lines = [f"{results['task']}  model={results['model']}  data={results['dataset']}  size={results['image_size']}"]
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<{width}}  {shown:>8}")
    return "\n".join(lines)


def emit_results(results: dict[str, Any], out: str | None) -> None:
    """Print the results JSON and, with ``--out``, write it there."""
    print(json.dumps(results, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")

"""``xmodal stats --config recipe.yaml [--batches N] [--split train] [--out stats.json]``: teacher-target statistics.

Builds the recipe's model and data exactly as ``xmodal fit`` does (the same Lightning CLI, so overrides such as
``--data.batch_size 16`` work), runs the teacher over ``N`` batches of a split and prints, per float output key,
its width, mean square per dimension, the share of its energy in the mean vector, the range of its per-dimension
standard deviations and its largest ``|x|`` (:mod:`xmodal.data.stats`). ``--out`` writes the full statistics as
JSON, which a loss's ``normalize`` can read (:class:`~xmodal.losses.normalize.TargetNorm`'s ``stats``).

Batches get the modalities' evaluation transform, as ``xmodal cache`` computes its outputs (``--augment``: the
training transform), and the teacher runs as in training (inference mode, the recipe's ``teacher_dtype``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `xmodal stats --help` loads neither torch nor Lightning
    from xmodal.data.stats import TeacherStats
    from xmodal.data.wds import WdsDataModule
    from xmodal.distiller import Distiller

SPLITS = ("train", "val", "test", "predict")


def stats_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmodal stats", description=__doc__.split("\n\n")[1] if __doc__ else None,
        epilog="Other arguments (--config FILE, --model.* / --data.* overrides) go to the recipe's Lightning CLI.",
    )
    parser.add_argument("--batches", type=int, default=20, help="batches to run the teacher over (default 20)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="data split (default train)")
    parser.add_argument("--out", type=Path, default=None, help="write the statistics here as JSON")
    parser.add_argument("--device")  # default: cuda when available, decided after parsing (it needs torch)
    parser.add_argument("--augment", action="store_true", help="use the modalities' training transform")
    return parser


def build_recipe(argv: Sequence[str]) -> tuple[Distiller, WdsDataModule]:
    """The recipe's Distiller and DataModule, instantiated by the CLI that ``xmodal fit`` uses."""
    from xmodal.commands.lightning import DESCRIPTION, XmodalCLI
    from xmodal.data.wds import WdsDataModule
    from xmodal.distiller import Distiller
    from xmodal.plugins import load_plugins

    load_plugins()
    cli = XmodalCLI(
        Distiller, WdsDataModule, args=list(argv), run=False, seed_everything_default=0,
        parser_kwargs={"exit_on_error": False, "description": DESCRIPTION}, auto_configure_optimizers=False,
    )
    return cli.model, cli.datamodule


def teacher_statistics(model: Distiller, data: WdsDataModule, split: str, batches: int, device: str,
                       augment: bool = False) -> tuple[TeacherStats, int]:
    """Statistics of the teacher's outputs over ``batches`` batches of ``split``, and how many batches it saw."""
    import torch

    from xmodal.data.stats import TeacherStats
    from xmodal.data.wds import move_batch, prepare_on_device

    if model.teacher is None or not isinstance(model.teacher, torch.nn.Module):
        raise SystemExit("xmodal stats: the recipe has no teacher (model.teacher)")
    model.to(device)
    model.teacher.to(device, dtype=model.teacher_dtype).eval()
    stats, seen = TeacherStats(), 0
    loader = getattr(data, f"{split}_dataloader")()
    for batch in loader:
        if seen == batches:
            break
        batch = move_batch(data.on_before_batch_transfer(batch, 0), device)
        outputs = model.teacher_outputs(prepare_on_device(batch, data.modalities, train=augment))
        if outputs is None:
            raise SystemExit("xmodal stats: no loss of the recipe reads the teacher")
        stats.update(outputs)
        seen += 1
    return stats, seen


def stats_main(argv: Sequence[str]) -> None:
    options, rest = stats_parser().parse_known_args(list(argv))
    import torch

    model, data = build_recipe(rest)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    stats, seen = teacher_statistics(model, data, options.split, options.batches, device, options.augment)
    print(f"teacher outputs over {seen} {options.split} batch(es):")
    print(stats.table())
    if options.out is not None:
        report: dict[str, Any] = {"split": options.split, "batches": seen, "augment": options.augment,
                                  "stats": stats.to_dict()}
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(report, indent=1))
        print(f"written to {options.out}")

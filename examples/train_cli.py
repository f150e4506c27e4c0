"""Train with the Lightning CLI: build the offline ``shapes`` corpus, then ``xmodal fit`` on a tiny recipe.

The same from a shell, in the working directory::

    xmodal data make shapes --out runs/examples/shapes --image-size 32 --n-train 512 --n-val 64 --n-test 128
    xmodal fit --config examples/tiny_clip.yaml --trainer.max_steps 50

``xmodal.commands.main.main`` below is the ``xmodal`` console script, called in-process.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from xmodal.commands.main import main as xmodal

CONFIG = Path(__file__).resolve().with_name("tiny_clip.yaml")
WORK = Path("runs/examples")  # where tiny_clip.yaml reads and writes, relative to the working directory


def run(argv: Sequence[str] | None = None) -> Path:
    """Train and export; returns the exported model folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (the recipe's max_steps)")
    args = parser.parse_args(argv)
    if not (WORK / "shapes" / "classes.json").exists():
        xmodal(["data", "make", "shapes", "--out", str(WORK / "shapes"), "--image-size", "32", "--n-train", "512",
                "--n-val", "64", "--n-test", "128", "--shard-size", "256"])
    xmodal(["fit", "--config", str(CONFIG), "--trainer.max_steps", str(args.steps)])
    return WORK / "model"


if __name__ == "__main__":
    print(f"exported to {run()}; logs (metrics.csv) under {WORK / 'logs'}")

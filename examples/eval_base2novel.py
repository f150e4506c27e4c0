"""Base-to-novel accuracy (base, novel, harmonic mean) of a CLIP or prompted model (``xmodal eval base2novel``).

The split names which classes are "base" (seen while prompt-tuning) and which "novel"; this script writes one from
the corpus's classes when there is none (``xmodal.eval.base2novel.make_split``: the first half base)::

    xmodal eval base2novel --model runs/examples/model --split runs/examples/split.json \\
        --shards 'runs/examples/shapes/test-*.tar' --out runs/examples/base2novel.json

A PromptKD student (``configs/prompt_distill/student_stage2.yaml``) is evaluated the same way; a prompt-tuned
teacher also takes ``--class-vectors FILE`` (``xmodal class-vectors``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xmodal.commands.main import main as xmodal
from xmodal.eval.base2novel import make_split, write_split


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/examples/model", help="exported folder or zoo name")
    parser.add_argument("--data", type=Path, default=Path("runs/examples/shapes"), help="corpus with test shards")
    args = parser.parse_args(argv)
    split = args.data.parent / "split.json"
    if not split.exists():
        classes = json.loads((args.data / "classes.json").read_text())
        write_split(make_split(classes["classes"] if isinstance(classes, dict) else classes), split)
    out = args.data.parent / "base2novel.json"
    xmodal(["eval", "base2novel", "--model", args.model, "--split", str(split), "--shards",
            str(args.data / "test-*.tar"), "--device", "cpu", "--out", str(out)])
    return json.loads(out.read_text())["metrics"]


if __name__ == "__main__":
    run()

"""Lip-reading CER/WER of a lip reader, greedy and beam search (``xmodal eval asr``), on the offline ``avsync``
corpus (built here when missing)::

    xmodal data make avsync --out runs/examples/avsync --n-train 8 --n-val 4 --n-test 8
    xmodal eval asr --model MODEL --shards 'runs/examples/avsync/test-*.tar' --beam-size 4 \\
        --out runs/examples/asr.json

MODEL is an exported lip reader (e.g. ``runs/lipreading/libs_full/student`` after
``xmodal fit --config configs/lipreading/libs_full.yaml``) or its zoo name. ``--list FILE`` reads a GRID/LRS2-style
file list instead of shards; ``--config recipe.yaml --plot DIR`` also draws the learned alignments
(``pip install 'xmodal[plots]'``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xmodal.commands.main import main as xmodal


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported lip reader folder or zoo name")
    parser.add_argument("--data", type=Path, default=Path("runs/examples/avsync"), help="corpus with test shards")
    parser.add_argument("--beam-size", default="4")
    args = parser.parse_args(argv)
    if not list(args.data.glob("test-*.tar")):
        xmodal(["data", "make", "avsync", "--out", str(args.data), "--n-train", "8", "--n-val", "4", "--n-test", "8"])
    out = args.data.parent / "asr.json"
    xmodal(["eval", "asr", "--model", args.model, "--shards", str(args.data / "test-*.tar"), "--beam-size",
            args.beam_size, "--device", "cpu", "--out", str(out)])
    return json.loads(out.read_text())["metrics"]


if __name__ == "__main__":
    run()

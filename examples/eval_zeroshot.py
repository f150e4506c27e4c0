"""Zero-shot classification accuracy of a CLIP model on labelled shards (``xmodal eval zeroshot``)::

    xmodal eval zeroshot --model runs/examples/model --shards 'runs/examples/shapes/test-*.tar' \\
        --classes runs/examples/shapes/classes.json --out runs/examples/zeroshot.json

``--model`` takes an exported folder or a zoo name; ``--folder DIR`` reads an ImageNet-style folder instead.
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
    parser.add_argument("--model", default="runs/examples/model", help="exported folder or zoo name")
    parser.add_argument("--data", type=Path, default=Path("runs/examples/shapes"), help="corpus with test shards")
    args = parser.parse_args(argv)
    out = args.data.parent / "zeroshot.json"
    xmodal(["eval", "zeroshot", "--model", args.model, "--shards", str(args.data / "test-*.tar"),
            "--classes", str(args.data / "classes.json"), "--device", "cpu", "--out", str(out)])
    return json.loads(out.read_text())["metrics"]


if __name__ == "__main__":
    run()

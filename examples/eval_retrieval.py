"""Image <-> text retrieval recall@1/5/10 of a CLIP model on captioned shards (``xmodal eval retrieval``)::

    xmodal eval retrieval --model runs/examples/model --shards 'runs/examples/shapes/test-*.tar' \\
        --out runs/examples/retrieval.json

``--captions-json FILE --image-root DIR`` reads COCO/Flickr-style caption files instead of shards.
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
    out = args.data.parent / "retrieval.json"
    xmodal(["eval", "retrieval", "--model", args.model, "--shards", str(args.data / "test-*.tar"), "--device", "cpu",
            "--out", str(out)])
    return json.loads(out.read_text())["metrics"]


if __name__ == "__main__":
    run()

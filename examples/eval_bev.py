"""nuScenes-style 3D detection mAP/NDS of a BEV detector, with bird's-eye renders (``xmodal eval bev``), on the
offline ``bev-scenes`` corpus (built here when missing)::

    xmodal data make bev-scenes --out runs/examples/bev --size tiny
    xmodal eval bev --model MODEL --shards 'runs/examples/bev/test-*.tar' --render 2 \\
        --render-dir runs/examples/bev_renders --out runs/examples/bev.json

MODEL is an exported detector (e.g. after ``xmodal fit --config configs/bev/camera_unidistill.yaml``) or its zoo
name. ``--results FILE`` scores a nuScenes-format results JSON from any detector instead; ``--write-results FILE``
writes one.
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
    parser.add_argument("--model", required=True, help="exported detector folder or zoo name")
    parser.add_argument("--data", type=Path, default=Path("runs/examples/bev"), help="corpus with test shards")
    args = parser.parse_args(argv)
    if not list(args.data.glob("test-*.tar")):
        xmodal(["data", "make", "bev-scenes", "--out", str(args.data), "--size", "tiny"])
    out = args.data.parent / "bev.json"
    xmodal(["eval", "bev", "--model", args.model, "--shards", str(args.data / "test-*.tar"), "--render", "2",
            "--render-dir", str(args.data.parent / "bev_renders"), "--device", "cpu", "--out", str(out)])
    return json.loads(out.read_text())["metrics"]


if __name__ == "__main__":
    run()

"""``xmodal compress --config stages.yaml``: progressive multi-stage compression (see :mod:`xmodal.progressive`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from xmodal import progressive


def compress_main(argv: Sequence[str]) -> None:
    """``xmodal compress --config stages.yaml``: run every stage and print the exported stage folders."""
    summary = progressive.__doc__.split("\n\n")[0] if progressive.__doc__ else ""
    parser = argparse.ArgumentParser(prog="xmodal compress", description=summary)
    parser.add_argument("--config", "-c", required=True, help="the stages file (see xmodal.progressive)")
    args = parser.parse_args(list(argv))
    for folder in progressive.compress(progressive.load_stages(args.config)):
        print(folder)

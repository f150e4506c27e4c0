"""``xmodal data make NAME --out DIR [--seed N] [--image-size N] [--n-train N] ...``: build an offline corpus."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def data_main(argv: Sequence[str]) -> None:
    from xmodal.data.corpora import CORPORA, make_corpus

    parser = argparse.ArgumentParser(prog="xmodal data", description="Build offline corpora as WebDataset shards.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("make", help="generate a corpus")
    make.add_argument("name", help=f"one of: {', '.join(sorted(CORPORA))}")
    make.add_argument("--out", required=True, help="output folder for shards, classes.json, tokenizer/ and meta.json")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--image-size", type=int)
    make.add_argument("--n-train", type=int)
    make.add_argument("--n-val", type=int)
    make.add_argument("--n-test", type=int)
    make.add_argument("--shard-size", type=int)
    args = parser.parse_args(list(argv))
    options = {k: v for k, v in vars(args).items() if k not in ("verb", "name", "out") and v is not None}
    meta = make_corpus(args.name, args.out, **options)
    print(json.dumps(meta, indent=2, default=str))

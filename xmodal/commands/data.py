"""``xmodal data make NAME --out DIR [--seed N] [--size S] [--image-size N] ...``: build an offline corpus.

Options a corpus's ``make`` does not take are refused, naming the corpus (``--size`` is for ``avspeech-grid``).
"""

from __future__ import annotations

import argparse
import inspect
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
    make.add_argument("--size", choices=("tiny", "small", "medium"), help="corpus size, where the corpus has sizes")
    make.add_argument("--source", help="folder with the corpus's source files, where the corpus reads some")
    make.add_argument("--workers", type=int, help="generating processes, where the corpus is generated in parallel")
    args = parser.parse_args(list(argv))
    options = {k: v for k, v in vars(args).items() if k not in ("verb", "name", "out") and v is not None}
    if args.name in CORPORA:
        accepted = inspect.signature(CORPORA[args.name]).parameters
        refused = sorted(k for k in options if k not in accepted and k != "seed")
        if refused:
            parser.error(f"{args.name} does not take {', '.join('--' + k.replace('_', '-') for k in refused)}")
    meta = make_corpus(args.name, args.out, **options)
    print(json.dumps(meta, indent=2, default=str))

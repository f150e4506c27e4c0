"""``xmodal cache --config cache.yaml``: run a teacher over shards once (see :mod:`xmodal.data.cache`); prints the
cached outputs' statistics (:mod:`xmodal.data.stats`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from xmodal.data.cache import OutputOverlapsInput, cache_teacher
from xmodal.data.stats import TeacherStats
from xmodal.plugins import load_plugins


def cache_main(argv: Sequence[str]) -> None:
    """``xmodal cache --config cache.yaml`` (or flags): ``teacher``, ``modalities``, ``shards``, ``out``..."""
    from jsonargparse import CLI

    load_plugins()  # short class names of teachers and modalities

    try:
        manifest = CLI(cache_teacher, args=list(argv), as_positional=False)
    except OutputOverlapsInput as error:
        raise SystemExit(f"xmodal cache: {error}") from error
    print(json.dumps({k: manifest[k] for k in ("shards", "count", "skipped", "failed_shards", "seconds")}, indent=2))
    print(TeacherStats.from_dict(manifest["stats"]).table())  # also in the manifest, under "stats"
    for failed in manifest["failed_shards"]:
        print(f"xmodal cache: shard failed mid-way, the rest of it was not cached: {failed}", file=sys.stderr)
    if manifest["skipped"]:
        print(f"xmodal cache: skipped {manifest['skipped']} corrupt sample(s): {', '.join(manifest['skipped_keys'])}",
              file=sys.stderr)

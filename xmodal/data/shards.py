"""Writing WebDataset shards and naming them with brace patterns.

Samples are dicts with a ``__key__`` and one entry per extension, encoded by WebDataset's default encoder:
bytes and strings are written as they are, ``json`` dicts as JSON, ``npy`` arrays with ``np.save``, PIL images
under ``png``/``jpg`` through the image encoder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm.auto import tqdm

SHARD_DIGITS = 6
PARTIAL = ".partial"  # suffix of shards still being written


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    prefix: str,
    max_count: int = 1000,
    *,
    mtime: float | None = None,
    progress: str | None = None,
    total: int | None = None,
    first_shard: int = 0,
    replace: bool = True,
    keep_empty: bool = False,
) -> list[Path]:
    """Write ``samples`` to ``out_dir/{prefix}-000000.tar``, ``{prefix}-000001.tar``, ...

    Shards are written as ``.{prefix}-NNNNNN.tar.partial`` and renamed only once every sample is written, so a
    failure (an exception from ``samples`` included) leaves no partial shard: the temporaries are removed and
    the folder keeps what it held before. Only after the renames are shards that an earlier run left under the
    same prefix (:func:`existing_shards`) replaced or deleted, so a pattern built from the returned paths never
    mixes runs and ``samples`` may still be reading them lazily while this writes. Callers whose inputs could be
    such shards must refuse that themselves (``xmodal cache`` does).

    Args:
        samples: sample dicts, each with ``__key__`` and extension keys (``png``, ``txt``, ``json``, ``npy``...).
        out_dir: folder for the shards; created if missing.
        prefix: shard name prefix, usually the split (``train``).
        max_count: samples per shard.
        mtime: modification time stored in the tar headers; a fixed value makes shards byte-reproducible.
            ``None`` stores the current time, as WebDataset does.
        progress: description of a tqdm progress bar; no bar when ``None``.
        total: number of samples, for the progress bar.
        first_shard: number of the first shard written (``{prefix}-{first_shard:06d}.tar``).
        replace: delete the shards an earlier run left under the same prefix that this call did not write;
            ``False`` keeps them, for callers that write a split one shard at a time (``xmodal data convert``).
        keep_empty: when ``samples`` is empty, still write one empty (valid) shard, so that shard numbers
            stay consecutive for a caller that writes them one at a time.

    Returns:
        The shard paths in order. Empty when ``samples`` is empty, unless ``keep_empty``.
    """
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partials: list[Path] = []
    written = 0
    pattern = str(out / f".{prefix}-%0{SHARD_DIGITS}d.tar{PARTIAL}")
    bar = tqdm(total=total, desc=progress, unit="sample", disable=progress is None, dynamic_ncols=True)
    try:
        with bar, wds.ShardWriter(
            pattern, maxcount=max_count, verbose=0, post=lambda name: partials.append(Path(name)), mtime=mtime,
            start_shard=first_shard,
        ) as sink:
            for sample in samples:
                sink.write(sample)
                written += 1
                bar.update()
    except BaseException:
        for path in partials:
            path.unlink(missing_ok=True)
        raise
    paths: list[Path] = []
    for partial in partials:
        if written or keep_empty:
            paths.append(partial.replace(partial.with_name(partial.name[1:].removesuffix(PARTIAL))))
        else:  # ShardWriter opens its first shard before any sample arrives
            partial.unlink(missing_ok=True)
    if replace:
        for old in set(existing_shards(out, prefix)) - set(paths):
            old.unlink()
    return paths


def existing_shards(out_dir: str | Path, prefix: str) -> list[Path]:
    """The ``{prefix}-NNNNNN.tar`` files in ``out_dir``: what :func:`write_shards` there would replace or delete."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    name = re.compile(rf"{re.escape(prefix)}-\d{{{SHARD_DIGITS}}}\.tar")
    return sorted(path for path in out.iterdir() if name.fullmatch(path.name))


def shard_pattern(paths: Sequence[str | Path]) -> str:
    """A brace pattern covering consecutive shards, e.g. ``dir/train-{000000..000003}.tar``.

    Args:
        paths: shard paths as :func:`write_shards` returns them (same folder and prefix, consecutive numbers).

    Returns:
        A pattern that ``webdataset.WebDataset`` expands; the path itself when there is one shard.

    Raises:
        ValueError: if ``paths`` is empty or the shards are not consecutive shards of one prefix.
    """
    if not paths:
        raise ValueError("no shards to make a pattern from")
    parsed = [_split_shard_name(Path(p)) for p in paths]
    heads = {(folder, prefix, width) for folder, prefix, _, width in parsed}
    if len(heads) != 1:
        raise ValueError(f"shards differ in folder, prefix or number width: {[str(p) for p in paths]}")
    numbers = sorted(number for _, _, number, _ in parsed)
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise ValueError(f"shard numbers are not consecutive: {numbers}")
    folder, prefix, _, width = parsed[0]
    if len(numbers) == 1:
        return str(Path(paths[0]))
    name = f"{prefix}{{{numbers[0]:0{width}d}..{numbers[-1]:0{width}d}}}.tar"
    return str(folder / name) if str(folder) != "." else name


def _split_shard_name(path: Path) -> tuple[Path, str, int, int]:
    match = re.fullmatch(r"(.*?)(\d+)\.tar", path.name)
    if match is None:
        raise ValueError(f"not a numbered shard: {path}")
    return path.parent, match.group(1), int(match.group(2)), len(match.group(2))

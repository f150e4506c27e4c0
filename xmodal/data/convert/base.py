"""What every format of ``xmodal data convert`` shares: the :class:`Conversion` a format declares, and the runner.

A format module turns a dataset folder into a :class:`Conversion`: the jobs of each split (one per sample, in
order), the module-level function that reads one job into a shard sample, the source files of a job and the
options. :func:`run_conversion` then writes ``{split}-NNNNNN.tar`` shards of ``shard_size`` jobs each, generating
the samples in worker processes (:class:`xmodal.data.corpora.writer.SamplePool`) and writing them through
:func:`xmodal.data.shards.write_shards`.

Resuming: each shard is recorded in ``manifest.json`` with a digest of its jobs (and the format and options) as
soon as it is written, so a rerun keeps every shard whose file is there and whose digest is unchanged and writes
only the others. A job whose source is missing or corrupt raises :class:`SkipSample`: the sample is left out of
its shard (shard ``k`` always holds the jobs ``k * shard_size ...``, so a shard may hold fewer samples) and
counted per reason.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from tqdm.auto import tqdm

if TYPE_CHECKING:  # the shard writers import torch (through webdataset): imported where used, after parsing
    from xmodal.data.corpora.writer import SamplePool

Job = TypeVar("Job")
Sample = dict[str, Any]
MANIFEST = "manifest.json"
DEFAULT_SHARD_SIZE = 1000
SHOWN_SKIPS = 5  # skipped files printed at the end of a run
CHUNKSIZE = 4  # jobs per task sent to a worker: reading and re-encoding media is slow enough for small tasks


class ConvertError(ValueError):
    """A source that cannot be converted at all (a malformed annotation file, a missing folder); names the file."""


class SkipSample(Exception):
    """Raised by a format's sample function when a job's source is missing or corrupt: the sample is skipped.

    Args:
        path: the file that is missing or corrupt.
        reason: a short, countable reason, e.g. ``"missing image"``, ``"corrupt audio"``.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(path, reason)
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _no_side_files(out: Path) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Conversion(Generic[Job]):
    """A format's declaration of a dataset; :func:`run_conversion` writes it.

    Attributes:
        format: the format's name (``manifest.json``'s ``format``, ``meta.json``'s ``corpus``).
        splits: the jobs of each split, one per sample, in the order the samples are written. A job's ``repr``
            is its identity for resuming, so jobs are plain values (tuples, frozen dataclasses of paths/strings).
        sample: the shard sample of one job, with the field names the recipes' corpora use; raises
            :class:`SkipSample` for a missing or corrupt source. Worker processes get it pickled: a module-level
            function, or a ``functools.partial`` of one.
        sources: the files a job reads, for the manifest's digest of the source file list.
        options: what the conversion was asked for (stored in the manifest; a change rewrites every shard).
        side_files: writes the dataset's other files into the output folder (e.g. ``classes.json``) after the
            shards; returns fields to add to ``manifest.json`` and ``meta.json``.
    """

    format: str
    splits: Mapping[str, Sequence[Job]]
    sample: Callable[[Job], Sample]
    sources: Callable[[Job], Sequence[Path]]
    options: dict[str, Any] = field(default_factory=dict)
    side_files: Callable[[Path], dict[str, Any]] | None = _no_side_files


class Converter(Protocol):
    """A format of ``xmodal data convert``: its name, a one-line help, its command-line options and how it reads
    a dataset folder (read-only ``name`` and ``help``: plain attributes and frozen dataclass fields both fit)."""

    @property
    def name(self) -> str: ...

    @property
    def help(self) -> str: ...

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def build(self, src: Path, args: argparse.Namespace) -> Conversion: ...


def sample_key(*parts: str) -> str:
    """A WebDataset ``__key__`` from ``parts`` (joined by ``_``): WebDataset splits a file name at its first dot
    and a key names a file in the tar, so dots, slashes and spaces become ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", "_".join(parts))


def read_json(path: Path) -> Any:
    """The parsed JSON of an annotation file; :class:`ConvertError` naming it when it is missing or malformed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConvertError(f"{path}: annotation file not found") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConvertError(f"{path}: not valid JSON ({error})") from error


def read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """``(line number, stripped line)`` of the non-blank lines of a text file (``what`` it is, for the error);
    :class:`ConvertError` naming it when it cannot be read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConvertError(f"{path}: cannot read the {what} ({error})") from error
    return [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()]


@dataclass
class _Skips:
    reasons: Counter[str] = field(default_factory=Counter)
    files: list[dict[str, str]] = field(default_factory=list)

    def add(self, split: str, skip: SkipSample) -> None:
        self.reasons[skip.reason] += 1
        self.files.append({"split": split, "file": skip.path, "reason": skip.reason})


SKIPPED = "__skipped__"  # the key of the stand-in sample a worker returns for a skipped job


def _attempt(sample: Callable[[Job], Sample], job: Job) -> Sample:
    try:
        return sample(job)
    except SkipSample as skip:
        return {SKIPPED: skip}


def run_conversion(conversion: Conversion[Job], out: str | Path, *, workers: int | None = None,
                   shard_size: int = DEFAULT_SHARD_SIZE, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Write ``conversion`` to ``out`` (created): its shards, side files, ``manifest.json`` and ``meta.json``.

    Args:
        conversion: what to write.
        out: the output folder.
        workers: processes reading the sources; ``None``: one per CPU core, up to 8.
        shard_size: jobs per shard (a shard holds fewer samples where some were skipped).
        resume: keep the shards an earlier run wrote from the same jobs; ``False`` rewrites every shard.
        progress: show a progress bar per split.

    Returns:
        The manifest written to ``manifest.json``.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    known = _recorded_shards(folder) if resume else {}  # shard name -> record, updated as shards are written
    records: dict[str, list[dict[str, Any]]] = {}

    def save_progress() -> None:  # after each shard, so that an interrupted run keeps what it finished
        by_split: dict[str, list[dict[str, Any]]] = {}
        for name, record in sorted(known.items()):
            by_split.setdefault(name.rsplit("-", 1)[0], []).append(record)
        _write_json(folder / MANIFEST, _manifest(conversion, by_split, complete=False))

    attempt = functools.partial(_attempt, conversion.sample)
    from xmodal.data.corpora.writer import SamplePool, default_workers

    with SamplePool(attempt, default_workers(workers), CHUNKSIZE) as pool:
        for split, jobs in conversion.splits.items():
            records[split] = []
            for record, written in _Shards(folder, split, shard_size, progress).write(conversion, jobs, pool, known):
                records[split].append(record)
                if written:
                    known[record["name"]] = record
                    save_progress()
    extra = conversion.side_files(folder) if conversion.side_files is not None else {}
    manifest = {**_manifest(conversion, records, complete=True), **extra,
                "seconds": round(time.perf_counter() - start, 3)}
    _write_json(folder / MANIFEST, manifest)
    _write_json(folder / "meta.json", _meta(conversion, manifest, extra))
    if progress:
        _print_skips(manifest)
    return manifest


@dataclass(frozen=True)
class _Shards:
    """The shards of one split: shard ``k`` holds the samples of jobs ``k * size`` to ``(k + 1) * size - 1``."""

    folder: Path
    split: str
    size: int
    progress: bool

    def write(self, conversion: Conversion[Job], jobs: Sequence[Job], pool: SamplePool,
              earlier: Mapping[str, dict[str, Any]]) -> Iterator[tuple[dict[str, Any], bool]]:
        """Write the shards whose jobs changed since ``earlier`` (records by shard name); yields every shard's
        record in order, and whether it was written now."""
        from xmodal.data.shards import SHARD_DIGITS, existing_shards

        chunks = [jobs[i:i + self.size] for i in range(0, len(jobs), self.size)]
        names = [f"{self.split}-{k:0{SHARD_DIGITS}d}.tar" for k in range(len(chunks))]
        digests = [_jobs_digest(conversion, chunk) for chunk in chunks]
        kept = {k for k, name in enumerate(names)
                if (self.folder / name).is_file() and earlier.get(name, {}).get("jobs_digest") == digests[k]}
        for stale in set(existing_shards(self.folder, self.split)) - {self.folder / name for name in names}:
            stale.unlink()
        done = sum(len(chunks[k]) for k in kept)
        with tqdm(total=len(jobs), initial=done, desc=f"{conversion.format} {self.split}", unit="sample",
                  disable=not self.progress, dynamic_ncols=True) as bar:
            for k, chunk in enumerate(chunks):
                if k in kept:
                    yield earlier[names[k]], False
                else:  # one shard's jobs at a time: at most a shard of samples waits in memory
                    yield self._write_one(k, pool.map(chunk), digests[k], bar), True

    def _write_one(self, number: int, results: Iterator[Sample], digest: str,
                   bar: tqdm) -> dict[str, Any]:
        from xmodal.data.shards import write_shards

        skips = _Skips()
        written = 0

        def samples() -> Iterator[Sample]:
            nonlocal written
            for result in results:
                bar.update()
                if SKIPPED in result:
                    skips.add(self.split, result[SKIPPED])
                else:
                    written += 1
                    yield result

        paths = write_shards(samples(), self.folder, self.split, max_count=1 << 62, mtime=0.0, first_shard=number,
                             replace=False, keep_empty=True)
        return {"name": paths[0].name, "jobs_digest": digest, "samples": written, "skipped": skips.files}


def _jobs_digest(conversion: Conversion[Job], jobs: Sequence[Job]) -> str:
    text = json.dumps([conversion.format, conversion.options, [repr(job) for job in jobs]], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _sources_digest(conversion: Conversion[Job]) -> tuple[int, str]:
    files = sorted({str(path) for jobs in conversion.splits.values() for job in jobs
                    for path in conversion.sources(job)})
    return len(files), hashlib.sha256("\n".join(files).encode()).hexdigest()


def _recorded_shards(folder: Path) -> dict[str, dict[str, Any]]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return {record["name"]: record for records in manifest["shards"].values() for record in records}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # no manifest, or not one of ours: nothing is kept


def _manifest(conversion: Conversion[Job], records: dict[str, list[dict[str, Any]]], *,
              complete: bool) -> dict[str, Any]:
    skipped = [entry for split_records in records.values() for record in split_records for entry in record["skipped"]]
    source_count, source_digest = _sources_digest(conversion) if complete else (None, None)
    return {
        "format": conversion.format,
        "complete": complete,
        "options": conversion.options,
        "jobs": {split: len(jobs) for split, jobs in conversion.splits.items()},
        "counts": {split: sum(r["samples"] for r in split_records) for split, split_records in records.items()},
        "skipped": dict(sorted(Counter(entry["reason"] for entry in skipped).items())),
        "skipped_files": skipped,
        "sources": {"files": source_count, "sha256": source_digest},
        "shards": records,
    }


def _meta(conversion: Conversion[Job], manifest: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``meta.json`` in the corpora's form (``corpus``, ``counts``, ``patterns``, ``shards``), plus the side files'
    fields, so that what reads a generated corpus' ``meta.json`` reads a converted one alike."""
    from xmodal.data.shards import shard_pattern

    patterns = {split: shard_pattern([r["name"] for r in records]) if records else None
                for split, records in manifest["shards"].items()}
    shards = {split: len(records) for split, records in manifest["shards"].items()}
    return {"corpus": conversion.format, "counts": manifest["counts"], "patterns": patterns, "shards": shards,
            "converted_by": MANIFEST, **extra}


def _print_skips(manifest: dict[str, Any], shown: int = SHOWN_SKIPS) -> None:
    """The skip counts per reason and the first ``shown`` skipped files, on stderr."""
    if not manifest["skipped"]:
        return
    files = manifest["skipped_files"]
    lines = [f"skipped {len(files)} samples: "
             + ", ".join(f"{count} {reason}" for reason, count in manifest["skipped"].items())
             + f" (every file is listed in {MANIFEST})"]
    lines += [f"  {entry['file']}: {entry['reason']}" for entry in files[:shown]]
    if len(files) > shown:
        lines.append(f"  ... and {len(files) - shown} more")
    print("\n".join(lines), file=sys.stderr)


def _write_json(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(value, indent=1, default=str))
    temporary.replace(path)

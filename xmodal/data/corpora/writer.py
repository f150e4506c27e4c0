"""The corpus writer every offline generator uses: splits to shards, the worker pool and ``meta.json``.

A generator declares its corpus as a :class:`Corpus`: the jobs of each split (one per sample, in order), the
function that turns a job into a shard sample, and its metadata and side files. :func:`write_corpus` generates
the samples (in worker processes when asked, in job order whatever their number), writes ``{split}-NNNNNN.tar``
through :func:`xmodal.data.shards.write_shards` (shards of an earlier run under the same split are replaced),
lets the generator write its other files, and writes ``meta.json``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

from xmodal.data.shards import shard_pattern, write_shards

Job = TypeVar("Job")
Sample = dict[str, Any]
CHUNKSIZE = 64  # jobs per task sent to a worker process
PARALLEL_MIN_CHUNKS = 4  # a split with fewer jobs than this many chunks is generated in the calling process
MAX_DEFAULT_WORKERS = 8


@dataclass(frozen=True)
class Written:
    """What :func:`write_corpus` wrote: per split, the samples, the shard pattern relative to the folder (``None``
    for an empty split) and the number of shards; and the seconds that generating and writing them took."""

    counts: dict[str, int]
    patterns: dict[str, str | None]
    shards: dict[str, int]
    seconds: float


@dataclass(frozen=True)
class Timing:
    """How ``meta.json`` reports the build: ``workers``, ``seconds``, ``{unit}_per_second`` and ``created``."""

    unit: str = "samples"
    seconds_digits: int = 3
    rate_digits: int = 1

    def fields(self, written: Written, workers: int) -> dict[str, Any]:
        total, seconds = sum(written.counts.values()), written.seconds
        return {
            "workers": workers,
            "seconds": round(seconds, self.seconds_digits),
            f"{self.unit}_per_second": round(total / seconds, self.rate_digits) if seconds > 0 else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def _no_fields() -> dict[str, Any]:
    return {}


def _no_side_files(out: Path, written: Written) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Corpus(Generic[Job]):
    """A generator's declaration of its corpus; :func:`write_corpus` writes it.

    Attributes:
        name: ``meta.json``'s ``corpus`` and the progress bars' label.
        splits: the jobs of each split, one per sample, in the order the samples are written.
        sample: the shard sample of one job. Worker processes get it pickled: a module-level function.
        shard_size: samples per shard.
        header: ``meta.json`` fields between ``corpus`` and ``counts``.
        details: ``meta.json`` fields after ``shards``, asked for once every split is written (so they can
            report what ``inspect`` saw).
        side_files: writes the corpus' other files into the folder, after the shards and before ``meta.json``;
            returns fields to append to ``meta.json``.
        inspect: sees each sample, with its split, in the calling process as it is written.
        workers: generating processes; 1 generates in the calling process.
        chunksize: jobs per task sent to a worker process.
        timing: how ``meta.json`` reports the build, after ``details``; ``None``: it does not.
    """

    name: str
    splits: Mapping[str, Sequence[Job]]
    sample: Callable[[Job], Sample]
    shard_size: int
    header: Mapping[str, Any] = field(default_factory=dict)
    details: Callable[[], dict[str, Any]] = _no_fields
    side_files: Callable[[Path, Written], dict[str, Any]] = _no_side_files
    inspect: Callable[[str, Sample], None] | None = None
    workers: int = 1
    chunksize: int = CHUNKSIZE
    timing: Timing | None = None


class SamplePool(Generic[Job]):
    """Turns jobs into samples in job order: in ``workers`` forked processes, opened on first need and shared by
    every :meth:`map` until the pool is closed, or in the calling process for one worker and for job lists shorter
    than ``PARALLEL_MIN_CHUNKS`` chunks (where starting processes costs more than it saves)."""

    def __init__(self, sample: Callable[[Job], Sample], workers: int = 1, chunksize: int = CHUNKSIZE) -> None:
        self.sample, self.workers, self.chunksize = sample, workers, chunksize
        self._pool: Pool | None = None

    def map(self, jobs: Sequence[Job]) -> Iterator[Sample]:
        if self.workers <= 1 or len(jobs) < PARALLEL_MIN_CHUNKS * self.chunksize:
            return map(self.sample, jobs)
        if self._pool is None:
            self._pool = multiprocessing.get_context("fork").Pool(self.workers)
        return self._pool.imap(self.sample, jobs, chunksize=self.chunksize)

    def __enter__(self) -> SamplePool[Job]:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._pool is None:
            return
        if kind is None:
            self._pool.close()
        else:  # jobs still queued would only delay the error
            self._pool.terminate()
        self._pool.join()
        self._pool = None


def default_workers(workers: int | None) -> int:
    """``workers``, or for ``None`` one per CPU core up to ``MAX_DEFAULT_WORKERS``."""
    return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1) if workers is None else workers


def generate(sample: Callable[[Job], Sample], jobs: Sequence[Job], *, workers: int = 1,
             chunksize: int = CHUNKSIZE) -> Iterator[Sample]:
    """The samples of ``jobs`` in order, generated by a :class:`SamplePool` of ``workers`` processes."""
    with SamplePool(sample, workers, chunksize) as pool:
        yield from pool.map(jobs)


def write_corpus(out_dir: str | Path, corpus: Corpus[Job], *, progress: bool = True) -> dict[str, Any]:
    """Write ``corpus`` to ``out_dir`` (created): its shards, its side files and ``meta.json``.

    ``meta.json`` holds ``corpus``, the header, ``counts``, ``patterns`` and ``shards`` per split, the details,
    the timing and what the side files added, in that order.

    Returns:
        The metadata written to ``meta.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = _write_splits(out, corpus, progress)
    meta: dict[str, Any] = {"corpus": corpus.name, **corpus.header, "counts": written.counts,
                            "patterns": written.patterns, "shards": written.shards, **corpus.details()}
    if corpus.timing is not None:
        meta.update(corpus.timing.fields(written, corpus.workers))
    meta.update(corpus.side_files(out, written))
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _write_splits(out: Path, corpus: Corpus[Job], progress: bool) -> Written:
    start = time.perf_counter()
    patterns: dict[str, str | None] = {}
    shards: dict[str, int] = {}
    with SamplePool(corpus.sample, corpus.workers, corpus.chunksize) as pool:
        for split, jobs in corpus.splits.items():
            stream = _inspected(pool.map(jobs), split, corpus.inspect)
            paths = write_shards(stream, out, split, corpus.shard_size, mtime=0.0, total=len(jobs),
                                 progress=f"{corpus.name} {split}" if progress else None)
            patterns[split] = shard_pattern([p.name for p in paths]) if paths else None
            shards[split] = len(paths)
    counts = {split: len(jobs) for split, jobs in corpus.splits.items()}
    return Written(counts, patterns, shards, time.perf_counter() - start)


def _inspected(samples: Iterable[Sample], split: str,
               inspect: Callable[[str, Sample], None] | None) -> Iterator[Sample]:
    for sample in samples:
        if inspect is not None:
            inspect(split, sample)
        yield sample


@dataclass(frozen=True)
class Vocabulary:
    """The text side of an image-caption corpus: zero-shot class names and prompt templates, and every caption
    and prompt the generator can write (``texts``, called once), which the corpus' word tokenizer covers."""

    classes: Sequence[str]
    templates: Sequence[str]
    texts: Callable[[], Iterable[str]]
    context_length: int

    def fields(self) -> dict[str, Any]:
        """The ``meta.json`` fields naming the vocabulary's files."""
        return {"classes": "classes.json", "num_classes": len(self.classes), "tokenizer": "tokenizer",
                "context_length": self.context_length}

    def write(self, out: Path, written: Written) -> dict[str, Any]:
        """Side files: ``classes.json`` (class names and templates) and ``tokenizer/``; adds no fields."""
        from xmodal.modalities.text import build_word_tokenizer

        classes = {"classes": list(self.classes), "templates": list(self.templates)}
        (out / "classes.json").write_text(json.dumps(classes, indent=1))
        build_word_tokenizer(self.texts(), out / "tokenizer", context_length=self.context_length)
        return {}


def caption_corpus(name: str, splits: Mapping[str, Sequence[Job]], sample: Callable[[Job], Sample], *,
                   vocabulary: Vocabulary, seed: int, image_size: int, shard_size: int, workers: int | None,
                   details: Mapping[str, Any]) -> Corpus[Job]:
    """An image-caption corpus (``png``, ``txt``, ``json`` samples) with its vocabulary's side files; ``details``
    follow the vocabulary's fields in ``meta.json``; ``workers=None``: :func:`default_workers`."""
    return Corpus(name, splits, sample, shard_size, header={"seed": seed, "image_size": image_size},
                  details=lambda: {**vocabulary.fields(), **details}, side_files=vocabulary.write,
                  workers=default_workers(workers), timing=Timing())

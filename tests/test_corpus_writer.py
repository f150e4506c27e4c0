"""The corpus writer: sample order with a worker pool, meta.json, side files, rewriting a folder, failures."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds

from xmodal.data.corpora.writer import PARALLEL_MIN_CHUNKS, Corpus, SamplePool, Timing, Written, write_corpus


def numbered(job: tuple[str, int]) -> dict[str, Any]:
    split, index = job
    time.sleep(0.002 * (index % 3))  # uneven work, so that workers finish out of order
    return {"__key__": f"{split}-{index:04d}", "txt": str(index), "json": {"pid": os.getpid()}}


def failing(job: tuple[str, int]) -> dict[str, Any]:
    if job[1] == 5:
        raise RuntimeError("sample 5 failed")
    return numbered(job)


def corpus_of(sizes: dict[str, int], **options: Any) -> Corpus[tuple[str, int]]:
    splits = {split: [(split, i) for i in range(n)] for split, n in sizes.items()}
    options.setdefault("sample", numbered)
    return Corpus(name="toy", splits=splits, shard_size=4, **options)


def read(out: Path, pattern: str) -> list[dict[str, Any]]:
    return list(wds.WebDataset(str(out / pattern), shardshuffle=False))


def test_pool_keeps_job_order(tmp_path: Path) -> None:
    corpus = corpus_of({"train": 24, "val": 3}, workers=2, chunksize=1)
    meta = write_corpus(tmp_path, corpus, progress=False)
    train = read(tmp_path, meta["patterns"]["train"])
    assert [s["__key__"] for s in train] == [f"train-{i:04d}" for i in range(24)]
    assert [s["txt"] for s in train] == [str(i).encode() for i in range(24)]
    assert os.getpid() not in {json.loads(s["json"])["pid"] for s in train}, "train is long enough for the pool"
    val = read(tmp_path, meta["patterns"]["val"])
    assert {json.loads(s["json"])["pid"] for s in val} == {os.getpid()}, "a short split is generated in-process"


def test_sample_pool_generates_short_job_lists_in_process() -> None:
    short = [("x", i) for i in range(PARALLEL_MIN_CHUNKS * 2 - 1)]
    with SamplePool(numbered, workers=2, chunksize=2) as pool:
        samples = list(pool.map(short))
    assert [s["__key__"] for s in samples] == [f"x-{i:04d}" for i in range(len(short))]
    assert {s["json"]["pid"] for s in samples} == {os.getpid()}


def test_meta_json_layout_and_side_files(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []

    def side_files(out: Path, written: Written) -> dict[str, Any]:
        (out / "extra.txt").write_text(str(written.counts))
        return {"extra": "extra.txt"}

    corpus = corpus_of(
        {"train": 9, "val": 0, "test": 2}, header={"seed": 3}, details=lambda: {"seen": len(seen)},
        side_files=side_files, inspect=lambda split, sample: seen.append((split, sample["__key__"])),
        timing=Timing("scenes", seconds_digits=2, rate_digits=2),
    )
    meta = write_corpus(tmp_path / "new", corpus, progress=False)
    out = tmp_path / "new"
    assert json.loads((out / "meta.json").read_text()) == meta
    assert list(meta) == ["corpus", "seed", "counts", "patterns", "shards", "seen", "workers", "seconds",
                          "scenes_per_second", "created", "extra"]
    assert meta["corpus"] == "toy" and meta["counts"] == {"train": 9, "val": 0, "test": 2}
    assert meta["patterns"] == {"train": "train-{000000..000002}.tar", "val": None, "test": "test-000000.tar"}
    assert meta["shards"] == {"train": 3, "val": 0, "test": 1} and meta["workers"] == 1
    assert meta["seen"] == 11 and seen[0] == ("train", "train-0000") and seen[-1] == ("test", "test-0001")
    assert (out / "extra.txt").read_text() == str(meta["counts"])
    assert len(read(out, meta["patterns"]["train"])) == 9


def test_meta_without_timing(tmp_path: Path) -> None:
    meta = write_corpus(tmp_path, corpus_of({"train": 1}), progress=False)
    assert list(meta) == ["corpus", "counts", "patterns", "shards"]


def test_rewriting_a_folder_replaces_shards_and_keeps_other_files(tmp_path: Path) -> None:
    write_corpus(tmp_path, corpus_of({"train": 10, "val": 5}), progress=False)
    (tmp_path / "notes.txt").write_text("kept")
    meta = write_corpus(tmp_path, corpus_of({"train": 3, "val": 0}), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "notes.txt", "train-000000.tar"]
    assert json.loads((tmp_path / "meta.json").read_text())["counts"] == {"train": 3, "val": 0}
    assert [s["__key__"] for s in read(tmp_path, meta["patterns"]["train"])] == ["train-0000", "train-0001",
                                                                                 "train-0002"]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_sample_leaves_the_earlier_corpus(tmp_path: Path, workers: int) -> None:
    write_corpus(tmp_path, corpus_of({"train": 6}), progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="sample 5 failed"):
        write_corpus(tmp_path, corpus_of({"train": 12}, sample=failing, workers=workers, chunksize=1),
                     progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

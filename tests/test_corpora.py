"""Offline corpora and the shard writer: counts, determinism, held-out combinations, tokenizer coverage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from xmodal.data.corpora import CORPORA, digits, make_corpus, shapes
from xmodal.data.shards import shard_pattern, write_shards
from xmodal.modalities.text import load_tokenizer, words

UNK_ID, EOS_ID = 1, 3


def read_split(out: Path, meta: dict, split: str) -> list[dict]:
    return list(wds.WebDataset(str(out / meta["patterns"][split]), shardshuffle=False))


def sample_bytes(samples: list[dict]) -> list[tuple[str, bytes, bytes, bytes]]:
    return [(s["__key__"], s["png"], s["txt"], s["json"]) for s in samples]


def sample_bytes_raw(samples: list[dict]) -> list[tuple[str, bytes, str, str]]:
    return [(s["__key__"], s["png"], s["txt"], json.dumps(s["json"])) for s in samples]


@pytest.fixture(scope="module")
def shapes_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    meta = make_corpus("shapes", out, image_size=32, n_train=480, n_val=60, n_test=96, shard_size=200, workers=1,
                       progress=False)
    return out, meta


@pytest.fixture(scope="module")
def digits_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("digits")
    meta = make_corpus("digits", out, n_train=300, n_val=50, shard_size=128, workers=1, progress=False)
    return out, meta


def test_write_shards_round_trip_and_pattern(tmp_path: Path) -> None:
    def make_samples(n: int) -> list[dict]:
        return [
            {"__key__": f"s{i:03d}", "png": Image.new("RGB", (4, 4), (i, 0, 0)), "txt": f"caption {i}",
             "json": {"i": i}, "npy": np.full(3, i, dtype=np.int16)}
            for i in range(n)
        ]

    paths = write_shards(make_samples(25), tmp_path, "train", max_count=10)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    pattern = shard_pattern(paths)
    assert pattern == str(tmp_path / "train-{000000..000002}.tar")
    read = list(wds.WebDataset(pattern, shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in read] == [f"s{i:03d}" for i in range(25)]
    assert read[7]["json"] == {"i": 7} and read[7]["txt"] == "caption 7"
    assert read[7]["npy"].tolist() == [7, 7, 7] and read[7]["png"][0, 0].tolist() == [7, 0, 0]

    assert [p.name for p in write_shards(make_samples(5), tmp_path, "train", max_count=10)] == ["train-000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"], "stale shards must be removed"
    assert shard_pattern(["a/train-000000.tar"]) == "a/train-000000.tar"
    assert write_shards([], tmp_path / "empty", "val") == []
    with pytest.raises(ValueError):
        shard_pattern(["train-000000.tar", "train-000002.tar"])


def test_write_shards_fixed_mtime_is_byte_reproducible(tmp_path: Path) -> None:
    samples = [{"__key__": f"k{i}", "txt": str(i)} for i in range(3)]
    first = write_shards(samples, tmp_path / "a", "x", mtime=0.0)
    second = write_shards(samples, tmp_path / "b", "x", mtime=0.0)
    assert first[0].read_bytes() == second[0].read_bytes()


def test_make_corpus_names() -> None:
    assert set(CORPORA) == {"shapes", "digits", "avsync", "avspeech-grid", "bev-scenes", "fashion-mnist"}
    with pytest.raises(ValueError, match="avsync, bev-scenes, digits, fashion-mnist, shapes"):
        make_corpus("imagenet", "/nonexistent")


def test_held_out_rule() -> None:
    held, kept = shapes.combinations(True), shapes.combinations(False)
    assert len(held) == len(shapes.CLASSES) and len(held) + len(kept) == 480
    assert sorted(f"{c} {s}" for c, s, _, _ in held) == sorted(shapes.CLASSES), "one held-out cell per class"
    for index, values in enumerate((shapes.COLOURS, shapes.SHAPES, shapes.SIZES, shapes.POSITIONS)):
        assert {combo[index] for combo in kept} == set(values)
    assert len({(size, position) for _, _, size, position in held}) == 10


def test_shapes_splits(shapes_corpus: tuple[Path, dict]) -> None:
    out, meta = shapes_corpus
    assert meta["counts"] == {"train": 480, "val": 60, "test": 96}
    assert json.loads((out / "meta.json").read_text())["patterns"] == meta["patterns"]
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"] == list(shapes.CLASSES) and len(classes["classes"]) == 48
    split_infos = {}
    for split, n in meta["counts"].items():
        samples = read_split(out, meta, split)
        assert len(samples) == n
        assert [s["__key__"] for s in samples] == [f"{split}-{i:07d}" for i in range(n)]
        infos = [json.loads(s["json"]) for s in samples]
        for info, sample in zip(infos, samples, strict=True):
            assert classes["classes"][info["label"]] == f"{info['colour']} {info['shape']}"
            assert info["colour"] in sample["txt"].decode() and info["shape"] in sample["txt"].decode()
        split_infos[split] = infos
        with Image.open(io.BytesIO(samples[0]["png"])) as image:
            assert image.size == (32, 32) and image.mode == "RGB"

    def combos(split: str) -> set[tuple[str, str, str, str]]:
        return {(i["colour"], i["shape"], i["size"], i["position"]) for i in split_infos[split]}

    held = set(shapes.combinations(True))
    assert not combos("train") & held and not combos("val") & held
    assert combos("test") <= held and combos("test") == held
    assert combos("train") == set(shapes.combinations(False))
    assert {i["label"] for i in split_infos["train"]} == set(range(48))
    assert {i["count"] for i in split_infos["train"]} == {1, 2, 3}


def test_shapes_captions_tokenize(shapes_corpus: tuple[Path, dict]) -> None:
    out, meta = shapes_corpus
    tokenizer = load_tokenizer(str(out / "tokenizer"), 16)
    captions = [s["txt"].decode() for s in read_split(out, meta, "train")]
    classes = json.loads((out / "classes.json").read_text())
    prompts = [t.format(c) for c in classes["classes"] for t in classes["templates"]]
    for texts in (captions, prompts, shapes.all_texts()):
        ids = tokenizer(texts)
        assert ids.shape == (len(texts), 16)
        assert not (ids == UNK_ID).any()
        assert (ids == EOS_ID).sum(dim=1).eq(1).all(), "every text must fit with its end token"
    assert max(len(words(t)) for t in shapes.all_texts()) <= 14


def test_shapes_deterministic(tmp_path: Path, shapes_corpus: tuple[Path, dict]) -> None:
    out, meta = shapes_corpus
    again = make_corpus("shapes", tmp_path, image_size=32, n_train=480, n_val=60, n_test=96, shard_size=200,
                        workers=2, progress=False)
    for split in ("train", "test"):
        assert sample_bytes(read_split(tmp_path, again, split)) == sample_bytes(read_split(out, meta, split))
    assert (tmp_path / "train-000000.tar").read_bytes() == (out / "train-000000.tar").read_bytes()
    other = list(shapes.samples("train", 8, seed=1, image_size=32))
    first = read_split(out, meta, "train")[:8]
    assert [s["png"] for s in other] != [s["png"] for s in first]


def test_digits(digits_corpus: tuple[Path, dict]) -> None:
    from sklearn.datasets import load_digits

    out, meta = digits_corpus
    target = load_digits().target
    pools = digits.source_splits()
    assert meta["counts"] == {"train": 300, "val": 50, "test": len(pools["test"])}
    assert not set(pools["train"]) & set(pools["test"]) and not set(pools["val"]) & set(pools["test"])
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"][7] == "seven"
    tokenizer = load_tokenizer(str(out / "tokenizer"), 16)
    for split, n in meta["counts"].items():
        samples = read_split(out, meta, split)
        assert len(samples) == n
        infos = [json.loads(s["json"]) for s in samples]
        assert all(info["label"] == target[info["source_index"]] for info in infos)
        assert {info["source_index"] for info in infos} <= set(pools[split].tolist())
        ids = tokenizer([s["txt"].decode() for s in samples])
        assert not (ids == UNK_ID).any() and (ids == EOS_ID).sum(dim=1).eq(1).all()
    test_infos = [json.loads(s["json"]) for s in read_split(out, meta, "test")]
    assert sorted(info["source_index"] for info in test_infos) == pools["test"].tolist()
    prompts = [t.format(c) for c in classes["classes"] for t in classes["templates"]]
    assert not (tokenizer(prompts) == UNK_ID).any()


def test_digits_deterministic() -> None:
    first = list(digits.samples("val", 20, seed=3, image_size=24))
    assert sample_bytes_raw(first) == sample_bytes_raw(list(digits.samples("val", 20, seed=3, image_size=24)))
    assert sample_bytes_raw(first) != sample_bytes_raw(list(digits.samples("val", 20, seed=4, image_size=24)))
    with Image.open(io.BytesIO(first[0]["png"])) as image:
        assert image.size == (24, 24)

"""The Fashion-MNIST corpus: the idx reader, the missing-package error and the corpus layout on fabricated idx
files (everywhere), and the corpus built from the Debian package ``dataset-fashion-mnist`` (where installed)."""

from __future__ import annotations

import gzip
import io
import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from xmodal.data.corpora import CORPORA, fashion_mnist
from xmodal.eval.base2novel import read_split

needs_package = pytest.mark.skipif(
    not (fashion_mnist.SOURCE_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def fabricate(folder: Path, per_class: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Idx files with ``per_class[name]`` images of each class, every image different."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (image_stem, label_stem) in fashion_mnist.SOURCE_FILES.items():
        rng = np.random.default_rng(len(name))
        labels = rng.permutation(np.repeat(np.arange(10), per_class[name])).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        write_idx(folder / f"{image_stem}.gz", images)
        write_idx(folder / f"{label_stem}.gz", labels)
        out[name] = (images, labels)
    return out


def read_corpus(out: Path, meta: dict, split: str) -> list[dict]:
    samples = list(wds.WebDataset(str(out / meta["patterns"][split]), shardshuffle=False))
    for sample in samples:
        sample["json"] = json.loads(sample["json"])
    return samples


def shard_bytes(out: Path) -> dict[str, bytes]:
    names = sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".txt") or p.name == "split.json")
    return {name: (out / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    folder = tmp_path_factory.mktemp("idx")
    return folder, fabricate(folder, {"train": 30, "t10k": 4})


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, fabricated: tuple[Path, dict]) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fashion")
    meta = fashion_mnist.make(out, source=fabricated[0], n_train=200, n_val=25, n_test=30, shard_size=64, workers=1,
                              progress=False)
    return out, meta


def test_registered() -> None:
    assert CORPORA["fashion-mnist"] is fashion_mnist.make


def test_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "plain").write_bytes(gzip.decompress((tmp_path / "a.gz").read_bytes()))
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "plain"), array)
    (tmp_path / "short").write_bytes(gzip.decompress((tmp_path / "a.gz").read_bytes())[:-1])
    with pytest.raises(ValueError, match="header declares"):
        fashion_mnist.read_idx(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an idx file"):
        fashion_mnist.read_idx(tmp_path / "bad")


def test_missing_package_error(tmp_path: Path) -> None:
    with pytest.raises(fashion_mnist.MissingSourceError, match="apt-get install -y dataset-fashion-mnist") as error:
        fashion_mnist.make(tmp_path / "out", source=tmp_path / "nowhere", progress=False)
    assert "--source DIR" in str(error.value) and "train-images-idx3-ubyte.gz" in str(error.value)
    assert not (tmp_path / "out").exists()
    fabricate(tmp_path / "partial", {"train": 1, "t10k": 1})
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(fashion_mnist.MissingSourceError, match="partial lacks t10k-labels-idx1-ubyte.gz. Install"):
        fashion_mnist.load_source(str(tmp_path / "partial"))


def test_layout_and_counts(small: tuple[Path, dict]) -> None:
    out, meta = small
    assert meta["counts"] == {"train": 200, "val": 25, "test": 30}
    assert meta["corpus"] == "fashion-mnist" and meta["num_classes"] == 10
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"] == list(fashion_mnist.CLASSES) and classes["templates"]
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    train = read_corpus(out, meta, "train")
    assert [s["__key__"] for s in train] == [f"train-{i:07d}" for i in range(200)]
    assert Counter(s["json"]["label"] for s in train) == {c: 20 for c in range(10)}


def test_val_balanced_and_disjoint(small: tuple[Path, dict]) -> None:
    out, meta = small
    val = read_corpus(out, meta, "val")
    assert sorted(Counter(s["json"]["label"] for s in val).values()) == [2] * 5 + [3] * 5
    train_rows = {s["json"]["source_index"] for s in read_corpus(out, meta, "train")}
    val_rows = {s["json"]["source_index"] for s in val}
    assert len(val_rows) == 25 and not train_rows & val_rows
    assert {s["json"]["source"] for s in val} == {"train"}
    assert {s["json"]["source"] for s in read_corpus(out, meta, "test")} == {"t10k"}


def test_samples_are_the_source_images(small: tuple[Path, dict], fabricated: tuple[Path, dict]) -> None:
    out, meta = small
    for split in ("train", "test"):
        for sample in read_corpus(out, meta, split)[:8]:
            images, labels = fabricated[1][sample["json"]["source"]]
            row = sample["json"]["source_index"]
            assert sample["json"]["label"] == labels[row]
            assert sample["json"]["class_name"] == fashion_mnist.CLASSES[labels[row]]
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), images[row])


def test_base_novel_split(small: tuple[Path, dict]) -> None:
    split = read_split(small[0] / small[1]["split"])
    assert split.classes == list(fashion_mnist.CLASSES)
    assert split.base == [0, 1, 2, 3, 4] and split.novel == [5, 6, 7, 8, 9]


def test_low_label_subsets_nested_and_balanced(small: tuple[Path, dict]) -> None:
    out, meta = small
    train = read_corpus(out, meta, "train")
    ten, one = fashion_mnist.labelled_keys(out, 10), fashion_mnist.labelled_keys(out, 1)
    assert set(one) < set(ten)
    assert meta["low_label"] == {"1pct": {"keys": "labelled-1pct.txt", "count": 10},
                                 "10pct": {"keys": "labelled-10pct.txt", "count": 20}}
    for percent, keys, per_class in ((10, ten, 2), (1, one, 1)):
        flagged = [s for s in train if s["json"][f"labelled_{percent}pct"]]
        assert [s["__key__"] for s in flagged] == keys
        assert Counter(s["json"]["label"] for s in flagged) == {c: per_class for c in range(10)}
    assert all("labelled_10pct" not in s["json"] for s in read_corpus(out, meta, "val"))


def test_deterministic_by_seed(tmp_path: Path, small: tuple[Path, dict], fabricated: tuple[Path, dict]) -> None:
    options: dict[str, Any] = {"source": fabricated[0], "n_train": 200, "n_val": 25, "n_test": 30, "shard_size": 64,
               "progress": False}
    again = fashion_mnist.make(tmp_path / "again", workers=2, **options)
    assert again["counts"] == small[1]["counts"]
    assert shard_bytes(tmp_path / "again") == shard_bytes(small[0])
    fashion_mnist.make(tmp_path / "other", seed=1, workers=1, **options)
    other = shard_bytes(tmp_path / "other")
    assert other["val-000000.tar"] != shard_bytes(small[0])["val-000000.tar"]


def test_captions_fit_the_tokenizer() -> None:
    from xmodal.modalities.text import words

    assert max(len(words(text)) for text in fashion_mnist.all_texts()) + 2 <= fashion_mnist.CONTEXT_LENGTH


def test_image_size_upsamples(tmp_path: Path, fabricated: tuple[Path, dict]) -> None:
    meta = fashion_mnist.make(tmp_path, source=fabricated[0], image_size=32, n_train=10, n_val=10, n_test=10,
                              workers=1, progress=False)
    image = Image.open(io.BytesIO(read_corpus(tmp_path, meta, "test")[0]["png"]))
    assert image.size == (32, 32) and image.mode == "L"


@needs_package
def test_package_corpus(tmp_path: Path) -> None:
    meta = fashion_mnist.make(tmp_path, n_train=100, n_val=50, n_test=40, shard_size=64, workers=1, progress=False)
    assert meta["source_images"] == {"train": 60000, "t10k": 10000}
    source = fashion_mnist.load_source(str(fashion_mnist.SOURCE_DIR))
    assert all(Counter(labels.tolist()) == {c: len(labels) // 10 for c in range(10)} for _, labels in source.values())
    val = read_corpus(tmp_path, meta, "val")
    assert Counter(s["json"]["label"] for s in val) == {c: 5 for c in range(10)}
    for split in ("train", "val", "test"):
        for sample in read_corpus(tmp_path, meta, split)[:5]:
            images, labels = source[sample["json"]["source"]]
            row = sample["json"]["source_index"]
            assert sample["json"]["label"] == labels[row]
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), images[row])
    assert set(fashion_mnist.labelled_keys(tmp_path, 1)) <= set(fashion_mnist.labelled_keys(tmp_path, 10))


def test_labelled_flag_hides_the_other_training_labels(small: tuple[Path, dict]) -> None:
    from xmodal.data.wds import WdsDataModule
    from xmodal.modalities.image import ImageModality

    out, meta = small
    module = WdsDataModule([ImageModality(size=28)], train=str(out / meta["patterns"]["train"]),
                           val=str(out / meta["patterns"]["val"]), batch_size=50, shuffle_buffer=1,
                           labelled_flag="labelled_10pct")
    seen = {key: label for batch in module.train_dataloader()
            for key, label in zip(batch["__key__"], batch["label"].tolist(), strict=True)}
    labelled = set(fashion_mnist.labelled_keys(out, 10))
    assert labelled and len(seen) == meta["counts"]["train"]
    assert {key for key, label in seen.items() if label != -100} == labelled
    assert all(label >= 0 for batch in module.val_dataloader() for label in batch["label"].tolist())

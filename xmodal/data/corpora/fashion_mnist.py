"""Fashion-MNIST: Zalando's 70,000 real 28 x 28 grayscale photos of clothing in ten classes, as image-caption pairs.

The images come from the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``;
``make system-deps`` does it as root), which installs the original idx files in ``/usr/share/datasets/fashion-mnist``;
``source=DIR`` (``--source DIR``) reads the same four files (``.gz`` or not) from elsewhere. Each sample holds the
image (``png``, grayscale, the original pixels at ``image_size=28``, bicubic-resampled otherwise; the image modality
decodes it to RGB at the recipe's size), a caption (``txt``) from one of several templates, some of which add a
short description of the class, and ``json`` with ``label``, ``class_name``, the idx file (``source``: ``train`` or
``t10k``) and the row in it (``source_index``).

Splits
    ``val`` is held out from the 60,000 training images, class-balanced (``n_val`` split over the ten classes,
    the first classes taking one more when it does not divide), drawn by the seed; ``train`` takes ``n_train``
    of the rest (all of it by default), class-balanced likewise; ``test`` takes ``n_test`` of the 10,000 test
    images (all by default). Each split is written in a seeded order.

Base-to-novel
    ``split.json`` (:mod:`xmodal.eval.base2novel`'s format) makes the first five classes base and the rest novel.

Low-label subsets
    For semi-supervised distillation, each train sample's ``json`` says whether its label belongs to the 1 % and
    the 10 % labelled subsets (``labelled_1pct``, ``labelled_10pct``); ``labelled-1pct.txt`` and
    ``labelled-10pct.txt`` list their keys, one a line (:func:`labelled_keys`). Both are class-balanced (at least
    one sample per class) and nested: the 1 % subset lies inside the 10 % one. A recipe uses a subset by keeping
    the hard-label loss to its samples (``label`` set to the loss's ``ignore_index``, -100, for every other
    sample, e.g. from ``batch["__key__"]`` and :func:`labelled_keys`) while the teacher's soft targets cover the
    whole train split.

Everything written is a function of the seed, the sizes and the source files.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xmodal.data.corpora.writer import Vocabulary, Written, caption_corpus, write_corpus
from xmodal.eval.base2novel import make_split, write_split

DEBIAN_PACKAGE = "dataset-fashion-mnist"
SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCE_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SPLIT_SOURCES = {"train": "train", "val": "train", "test": "t10k"}
SOURCE_SIZE = 28
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
DESCRIPTIONS = (
    "a short sleeved casual top",
    "long trousers covering both legs",
    "a long sleeved knitted sweater",
    "a one piece garment with a skirt",
    "a long warm jacket with buttons",
    "an open summer shoe held by straps",
    "a collared shirt with buttons",
    "a low sports shoe with laces",
    "a handbag or shopping bag",
    "a short boot covering the ankle",
)
TEMPLATES = (
    "a photo of a {}.",
    "a grayscale photo of a {}.",
    "a product photo of a {}.",
    "a photo of the {}, a type of clothing.",
    "a low resolution photo of a {}.",
)
CAPTION_TEMPLATES = (
    "a photo of a {name}",
    "a grayscale product photo of a {name}",
    "a small picture of a {name}",
    "a {name}, {description}",
    "a photo of {description}",
    "{description}, a {name}",
)
CONTEXT_LENGTH = 24
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
LOW_LABEL_PERCENTS = (1, 10)
IDX_DTYPES: dict[int, np.dtype[Any]] = {code: np.dtype(name) for code, name in (
    (0x08, "u1"), (0x09, "i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8"))}


class MissingSourceError(FileNotFoundError):
    """The Fashion-MNIST idx files are not where the generator looks."""


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (``.gz`` or not): the array its header declares.

    Raises:
        ValueError: if the header is not idx or declares more or fewer bytes than follow it.
    """
    file = Path(path)
    data = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES:
        raise ValueError(f"{file} is not an idx file")
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{file}: header declares {shape} ({expected} bytes) but {len(data) - offset} bytes follow")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def source_path(source_dir: Path, stem: str) -> Path | None:
    """``stem.gz`` or ``stem`` in ``source_dir``, whichever exists first; ``None`` for neither."""
    return next((path for path in (source_dir / f"{stem}.gz", source_dir / stem) if path.is_file()), None)


@functools.lru_cache(maxsize=2)
def load_source(source_dir: str | Path = SOURCE_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The images (``N x 28 x 28`` uint8) and labels (``N`` int64) of the ``train`` and ``t10k`` idx files.

    Raises:
        MissingSourceError: if a file is missing; the message names the Debian package and ``--source``.
    """
    folder = Path(source_dir)
    paths = {stem: source_path(folder, stem) for pair in SOURCE_FILES.values() for stem in pair}
    found = {stem: path for stem, path in paths.items() if path is not None}
    if len(found) < len(paths):
        missing = ", ".join(f"{stem}.gz" for stem in paths if stem not in found)
        raise MissingSourceError(
            f"Fashion-MNIST not found: {folder} lacks {missing}. Install the Debian package {DEBIAN_PACKAGE} "
            f"(apt-get update && apt-get install -y {DEBIAN_PACKAGE}, or `make system-deps` as root), or pass "
            f"--source DIR (source=DIR) naming a folder with the four idx files"
        )
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (image_stem, label_stem) in SOURCE_FILES.items():
        images = read_idx(found[image_stem])
        labels = read_idx(found[label_stem]).astype(np.int64)
        if images.ndim != 3 or images.shape[0] != labels.shape[0] or images.dtype != np.uint8:
            raise ValueError(f"{folder}: {name} images {images.shape} {images.dtype} do not match "
                             f"{labels.shape[0]} labels")
        if labels.min() < 0 or labels.max() >= len(CLASSES):
            raise ValueError(f"{folder}: {name} labels outside 0..{len(CLASSES) - 1}")
        out[name] = (images, labels)
    return out


def balanced_counts(n: int, num_classes: int = len(CLASSES)) -> list[int]:
    """``n`` split over the classes: ``n // C`` each, the first ``n % C`` classes one more."""
    return [n // num_classes + (c < n % num_classes) for c in range(num_classes)]


def balanced_take(labels: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices of ``pool`` drawn class-balanced (:func:`balanced_counts`), in a seeded order.

    Raises:
        ValueError: if a class has fewer indices in ``pool`` than its share.
    """
    taken = []
    for label, count in enumerate(balanced_counts(n)):
        members = pool[labels[pool] == label]
        if count > len(members):
            raise ValueError(f"{count} {CLASSES[label]} images asked for, only {len(members)} available")
        taken.append(rng.permutation(members)[:count])
    return rng.permutation(np.concatenate(taken))


def source_splits(labels: dict[str, np.ndarray], *, seed: int, n_train: int | None, n_val: int,
                  n_test: int | None) -> dict[str, np.ndarray]:
    """Source indices of each split in write order: val from the training images, train from the rest."""
    train_pool = np.arange(len(labels["train"]))
    val = balanced_take(labels["train"], train_pool, n_val, np.random.default_rng([seed, SPLIT_IDS["val"], 1]))
    rest = np.setdiff1d(train_pool, val)
    train = balanced_take(labels["train"], rest, len(rest) if n_train is None else n_train,
                          np.random.default_rng([seed, SPLIT_IDS["train"], 1]))
    test_pool = np.arange(len(labels["t10k"]))
    test = balanced_take(labels["t10k"], test_pool, len(test_pool) if n_test is None else n_test,
                         np.random.default_rng([seed, SPLIT_IDS["test"], 1]))
    return {"train": train, "val": val, "test": test}


def low_label_ranks(labels: np.ndarray, seed: int) -> np.ndarray:
    """Per train sample, how many of the nested low-label subsets (largest first) hold it, in ``0..2``: 2 for the
    1 % subset (also in 10 %), 1 for 10 % only, 0 for neither. Each class keeps ``max(1, round(p% * its count))``
    labels in a seeded order, so the smaller subset is a prefix of the larger."""
    ranks = np.zeros(len(labels), dtype=np.int64)
    rng = np.random.default_rng([seed, SPLIT_IDS["train"], 2])
    for label in range(len(CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == label))
        for percent in sorted(LOW_LABEL_PERCENTS, reverse=True):
            ranks[members[:max(1, round(len(members) * percent / 100))]] += 1
    return ranks


def labelled_flags(rank: int) -> dict[str, bool]:
    """The ``json`` flags of a train sample in ``rank`` of the low-label subsets (see :func:`low_label_ranks`)."""
    largest_first = sorted(LOW_LABEL_PERCENTS, reverse=True)
    return {f"labelled_{percent}pct": rank > k for k, percent in enumerate(largest_first)}


def caption(label: int, template: int) -> str:
    """Caption template ``template`` filled for class ``label``."""
    return CAPTION_TEMPLATES[template].format(name=CLASSES[label], description=DESCRIPTIONS[label])


def all_texts() -> list[str]:
    """Every caption the generator can write, and every zero-shot prompt."""
    texts = [template.format(name) for name in CLASSES for template in TEMPLATES]
    return texts + [caption(label, t) for label in range(len(CLASSES)) for t in range(len(CAPTION_TEMPLATES))]


def png_bytes(image: np.ndarray, image_size: int) -> bytes:
    """A ``28 x 28`` uint8 image as a grayscale PNG of ``image_size`` pixels a side (bicubic when resized)."""
    picture = Image.fromarray(image)
    if image_size != picture.width:
        picture = picture.resize((image_size, image_size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def sample(split: str, index: int, source_index: int, rank: int | None, *, seed: int, image_size: int,
           source_dir: str) -> dict[str, Any]:
    """The shard sample ``index`` of ``split``: source image ``source_index``; ``rank``: train only, its low-label
    subsets (:func:`low_label_ranks`)."""
    source = SPLIT_SOURCES[split]
    images, labels = load_source(source_dir)[source]
    label = int(labels[source_index])
    rng = np.random.default_rng([seed, SPLIT_IDS[split], 0, index])
    meta: dict[str, Any] = {"label": label, "class_name": CLASSES[label], "source": source,
                            "source_index": int(source_index)}
    if rank is not None:
        meta.update(labelled_flags(rank))
    return {"__key__": sample_key(split, index), "png": png_bytes(images[source_index], image_size),
            "txt": caption(label, int(rng.integers(len(CAPTION_TEMPLATES)))), "json": meta}


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:07d}"


def labelled_keys(corpus_dir: str | Path, percent: int) -> list[str]:
    """The keys of the train samples whose labels a ``percent`` % low-label recipe may use."""
    return (Path(corpus_dir) / _labelled_file(percent)).read_text().split()


def make(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = SOURCE_SIZE,
    n_train: int | None = None,
    n_val: int = 5000,
    n_test: int | None = None,
    shard_size: int = 1000,
    source: str | Path = SOURCE_DIR,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the Fashion-MNIST corpus: ``{train,val,test}-NNNNNN.tar``, ``classes.json``, ``tokenizer/``,
    ``split.json``, ``labelled-{1,10}pct.txt`` and ``meta.json``.

    Args:
        out_dir: output folder (created; shards of an earlier run there are replaced).
        seed: the val hold-out, the subsets, the orders and the caption templates are a function of the seed.
        image_size: side of the square PNGs; 28 keeps the original pixels.
        n_train: training samples, class-balanced; ``None``: every training image not in val (55,000).
        n_val: validation samples held out from the training images, class-balanced.
        n_test: test samples, class-balanced; ``None``: all 10,000.
        shard_size: samples per shard.
        source: folder with the four idx files (the Debian package's by default).
        workers: encoding processes; ``None`` uses up to 8 CPU cores. The output does not depend on it.
        progress: show tqdm progress bars.

    Returns:
        The metadata written to ``meta.json``; shard patterns in it are relative to ``out_dir``.

    Raises:
        MissingSourceError: if the idx files are not in ``source``.
    """
    source_dir = str(source)
    data = load_source(source_dir)
    labels = {name: labels for name, (_, labels) in data.items()}
    indices = source_splits(labels, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
    ranks = low_label_ranks(labels["train"][indices["train"]], seed)
    jobs = {split: [(split, index, int(src), int(ranks[index]) if split == "train" else None, seed, image_size,
                     source_dir) for index, src in enumerate(found)] for split, found in indices.items()}
    subsets = {percent: [sample_key("train", int(i)) for i in np.flatnonzero(ranks > k)]
               for k, percent in enumerate(sorted(LOW_LABEL_PERCENTS, reverse=True))}
    vocabulary = Vocabulary(CLASSES, TEMPLATES, all_texts, CONTEXT_LENGTH)
    class_split = make_split(CLASSES)

    def side_files(out: Path, written: Written) -> dict[str, Any]:
        write_split(class_split, out / "split.json")
        for percent, keys in subsets.items():
            (out / _labelled_file(percent)).write_text("".join(f"{key}\n" for key in keys))
        return vocabulary.write(out, written)

    corpus = caption_corpus(
        "fashion-mnist", jobs, _job, vocabulary=vocabulary, seed=seed, image_size=image_size,
        shard_size=shard_size, workers=workers,
        details={"source_images": {name: len(found) for name, found in labels.items()},
                 "descriptions": dict(zip(CLASSES, DESCRIPTIONS, strict=True)), "split": "split.json",
                 "base_classes": [CLASSES[i] for i in class_split.base],
                 "low_label": {f"{percent}pct": {"keys": _labelled_file(percent), "count": len(keys)}
                               for percent, keys in sorted(subsets.items())}},
    )
    return write_corpus(out_dir, dataclasses.replace(corpus, side_files=side_files), progress=progress)


_Job = tuple[str, int, int, int | None, int, int, str]


def _job(args: _Job) -> dict[str, Any]:
    split, index, source_index, rank, seed, image_size, source_dir = args
    return sample(split, index, source_index, rank, seed=seed, image_size=image_size, source_dir=source_dir)


def _labelled_file(percent: int) -> str:
    return f"labelled-{percent}pct.txt"


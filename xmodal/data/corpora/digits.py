"""Digits: scikit-learn's real handwritten digits (1,797 images of 8 x 8, shipped offline) as image-caption pairs.

Each sample renders one source digit: upscaled (bicubic), slightly rotated, scaled and shifted, written in one of
four ink colours on light, textured paper, with pixel noise; its caption names the digit (as a word or a numeral)
and sometimes the ink colour.

Splits
    The 1,797 source images are split once, stratified by digit and independently of the seed, into
    ``test`` (20 %), ``val`` (10 %) and ``train`` (the rest), so no source image is shared between splits.
    A split of ``n`` samples renders its source images in rounds (a seeded permutation of the pool per round):
    ``n_train`` larger than the pool gives several differently rendered copies of each training digit, and
    ``n_val``/``n_test`` default to one rendering per source image.

Zero-shot classes are ``"zero"`` .. ``"nine"``; ``label`` is the digit, ``source_index`` the row in
``sklearn.datasets.load_digits()``. Everything is a function of ``(seed, split, index)``.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xmodal.data.corpora.writer import Vocabulary, caption_corpus, generate, write_corpus

CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INKS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 30),
    "blue": (30, 55, 175),
    "red": (180, 30, 35),
    "green": (25, 120, 50),
}
TEMPLATES = (
    "a handwritten digit {}.",
    "a photo of the number {}.",
    "the number {} written by hand.",
    "a handwritten {}.",
    "the digit {}.",
)
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {numeral} written by hand",
    "a photo of the number {word}",
    "a handwritten {word}",
    "the digit {numeral}",
    "a scan of a handwritten {numeral}",
    "the digit {word} written in {ink} ink",
    "a {ink} handwritten {word}",
    "the number {numeral} in {ink} ink",
)
CONTEXT_LENGTH = 16
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1


@functools.lru_cache(maxsize=1)
def source() -> tuple[np.ndarray, np.ndarray]:
    """The scikit-learn digits: images ``1797 x 8 x 8`` (0-16) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def source_splits() -> dict[str, np.ndarray]:
    """Source-image indices of each split: fixed, stratified by digit, sorted."""
    from sklearn.model_selection import train_test_split

    _, labels = source()
    indices = np.arange(len(labels))
    rest, test = train_test_split(indices, test_size=TEST_FRACTION, stratify=labels, random_state=0)
    train, val = train_test_split(
        rest, test_size=VAL_FRACTION / (1 - TEST_FRACTION), stratify=labels[rest], random_state=0
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def caption(label: int, ink: str, template: int) -> str:
    """Caption template ``template`` filled for digit ``label`` written in ``ink``."""
    return CAPTION_TEMPLATES[template].format(word=CLASSES[label], numeral=str(label), ink=ink)


def all_texts() -> list[str]:
    """Every caption the generator can write, and every zero-shot prompt."""
    texts = [template.format(name) for name in CLASSES for template in TEMPLATES]
    texts += [caption(label, ink, t) for label in range(10) for ink in INKS for t in range(len(CAPTION_TEMPLATES))]
    return texts


def schedule(split: str, n: int, seed: int) -> list[int]:
    """Source-image index of each of ``n`` samples: rounds over the split's pool, each in a seeded order."""
    pool = source_splits()[split]
    rng = np.random.default_rng([seed, SPLIT_IDS[split], 1])
    rounds = -(-n // len(pool))
    return [int(i) for _ in range(rounds) for i in rng.permutation(pool)][:n]


def render(digit: np.ndarray, ink: str, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Draw an 8 x 8 digit (0-16) in ``ink`` on paper: ``image_size x image_size x 3`` uint8."""
    size = image_size
    glyph = Image.fromarray(np.clip(digit * (255.0 / 16.0), 0, 255).astype(np.uint8))
    box = max(8, round(size * rng.uniform(0.7, 0.9)))
    glyph = glyph.resize((box, box), Image.Resampling.BICUBIC).rotate(
        rng.uniform(-12.0, 12.0), resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0
    )
    canvas = Image.new("L", (size, size), 0)
    left = round((size - glyph.width) / 2 + rng.uniform(-0.06, 0.06) * size)
    top = round((size - glyph.height) / 2 + rng.uniform(-0.06, 0.06) * size)
    canvas.paste(glyph, (left, top))
    alpha = np.asarray(canvas, dtype=np.float32)[..., None] / 255.0
    paper = rng.uniform(190.0, 250.0) + rng.uniform(-10.0, 10.0, 3)
    paper_texture = rng.normal(0.0, rng.uniform(1.0, 6.0), (size, size, 1))
    colour = np.asarray(INKS[ink], dtype=np.float32) + rng.uniform(-15.0, 15.0, 3)
    image = (paper + paper_texture) * (1.0 - alpha) + colour * alpha
    image += rng.normal(0.0, rng.uniform(0.0, 5.0), image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def sample(split: str, index: int, source_index: int, *, seed: int, image_size: int) -> dict:
    """The shard sample ``index`` of ``split``, rendering source image ``source_index``."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], 0, index])
    images, labels = source()
    label = int(labels[source_index])
    ink = list(INKS)[int(rng.integers(len(INKS)))]
    text = caption(label, ink, int(rng.integers(len(CAPTION_TEMPLATES))))
    buffer = io.BytesIO()
    Image.fromarray(render(images[source_index], ink, rng, image_size)).save(buffer, format="PNG", compress_level=1)
    return {
        "__key__": f"{split}-{index:07d}",
        "png": buffer.getvalue(),
        "txt": text,
        "json": {"label": label, "digit": CLASSES[label], "ink": ink, "source_index": int(source_index)},
    }


def samples(split: str, n: int, *, seed: int, image_size: int, workers: int = 1) -> Iterator[dict]:
    """The ``n`` samples of ``split`` in order; the same whatever the number of ``workers`` (processes)."""
    return generate(_job, _jobs(split, n, seed, image_size), workers=workers)


def make(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    n_train: int = 20000,
    n_val: int | None = None,
    n_test: int | None = None,
    shard_size: int = 1000,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the digits corpus: ``{train,val,test}-NNNNNN.tar``, ``classes.json``, ``tokenizer/``, ``meta.json``.

    Args:
        out_dir: output folder (created; shards of an earlier run there are replaced).
        seed: everything rendered is a function of the seed (the source split is fixed).
        image_size: side of the square images in pixels.
        n_train: training samples, rendered from the 1,257 training digits.
        n_val: validation samples; ``None``: one per validation digit (180).
        n_test: test samples; ``None``: one per test digit (360).
        shard_size: samples per shard.
        workers: rendering processes; ``None`` uses up to 8 CPU cores. The output does not depend on it.
        progress: show tqdm progress bars.

    Returns:
        The metadata written to ``meta.json``; shard patterns in it are relative to ``out_dir``.
    """
    pools = source_splits()
    sizes = {
        "train": n_train,
        "val": len(pools["val"]) if n_val is None else n_val,
        "test": len(pools["test"]) if n_test is None else n_test,
    }
    corpus = caption_corpus(
        "digits",
        {split: _jobs(split, n, seed, image_size) for split, n in sizes.items()},
        _job,
        vocabulary=Vocabulary(CLASSES, TEMPLATES, all_texts, CONTEXT_LENGTH),
        seed=seed,
        image_size=image_size,
        shard_size=shard_size,
        workers=workers,
        details={"source_images": {split: len(pool) for split, pool in pools.items()}},
    )
    return write_corpus(out_dir, corpus, progress=progress)


_Job = tuple[str, int, int, int, int]


def _jobs(split: str, n: int, seed: int, image_size: int) -> list[_Job]:
    return [(split, index, src, seed, image_size) for index, src in enumerate(schedule(split, n, seed))]


def _job(args: _Job) -> dict:
    split, index, source_index, seed, image_size = args
    return sample(split, index, source_index, seed=seed, image_size=image_size)

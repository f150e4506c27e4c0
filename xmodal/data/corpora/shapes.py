"""Shapes: procedural image-caption pairs whose test split holds attribute combinations never seen in training.

Every image shows one coloured shape, or two or three copies of it, on a textured background (flat, noise,
gradient or stripes, always dark and desaturated so the shape's colour stays readable), with pixel noise.

Attributes
    colour (8): red, green, blue, yellow, purple, orange, white, cyan.
    shape (6): circle, square, triangle, star, cross, diamond.
    size (2): small, large.
    position (5): top left, top right, bottom left, bottom right, center.
    count (1-3): small shapes come as one, two or three copies (uniformly), large shapes always as one, because
    three large copies do not fit in a quadrant. Count is free of the held-out rule.

Zero-shot classes
    ``"{colour} {shape}"`` (48 of them); ``label = colour_index * 6 + shape_index``.

Held-out rule
    The combination (colour ``i``, shape ``j``, size ``k``, position ``l``), indices into the lists above, is
    held out when ``5 * k + l == (3 * i + 7 * j) % 10``. So each class holds out exactly one of its ten
    (size, position) cells (48 of the 480 combinations) and keeps the other nine in training: every colour,
    shape, class, size and position is seen in training, only the combination is new. As 3 and 7 are prime
    to 10, the six shapes of a colour, and the eight colours of a shape, hold out different cells.

Splits
    ``train``: only combinations that are not held out, scheduled in rounds of 48 samples, one per class, each
    class cycling through its nine cells; so any 48 consecutive samples cover every class and 432 cover every
    training combination. ``val``: the same distribution as train with different samples (i.i.d.; pick
    checkpoints without looking at held-out combinations); ``heldout_val=True`` draws it like test instead.
    ``test``: held-out combinations only, in rounds of 48 (one per class): compositional generalisation.

Everything is a function of ``(seed, split, index)``, so the same seed gives byte-identical PNGs and captions.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from xmodal.data.corpora.writer import Vocabulary, caption_corpus, generate, write_corpus

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 85, 240),
    "yellow": (245, 225, 40),
    "purple": (160, 60, 210),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 215, 225),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS = {"cross": "crosses"}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
COUNT_WORDS = ("one", "two", "three")
BACKGROUNDS = ("flat", "noise", "gradient", "stripes")
CLASSES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a small {}.",
    "a large {}.",
    "a drawing of a {}.",
    "there is a {}.",
    "an image of a {}.",
)
CAPTION_TEMPLATES = (
    "a photo of {np} {loc}",
    "{np} {loc}",
    "{bare}, {size}, {where}",
    "there {be} {np} {loc}",
    "{loc} {be} {np}",
    "an image of {np} {loc}",
    "a drawing of {np} {loc}",
)
CONTEXT_LENGTH = 16
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
SUPERSAMPLE = 4
RADIUS = {"small": 0.085, "large": 0.17}
ANCHORS = {"top left": (0.26, 0.26), "top right": (0.74, 0.26), "bottom left": (0.26, 0.74),
           "bottom right": (0.74, 0.74), "center": (0.5, 0.5)}
SPREAD = {1: 0.0, 2: 1.3, 3: 1.55}


@dataclass(frozen=True)
class Attributes:
    """What one image shows."""

    colour: str
    shape: str
    size: str
    position: str
    count: int = 1

    @property
    def label(self) -> int:
        return list(COLOURS).index(self.colour) * len(SHAPES) + SHAPES.index(self.shape)

    @property
    def class_name(self) -> str:
        return f"{self.colour} {self.shape}"

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "colour": self.colour, "shape": self.shape, "size": self.size,
                "position": self.position, "count": self.count}


def is_held_out(colour: str, shape: str, size: str, position: str) -> bool:
    """Whether a (colour, shape, size, position) combination is reserved for the held-out split."""
    i, j = list(COLOURS).index(colour), SHAPES.index(shape)
    return len(POSITIONS) * SIZES.index(size) + POSITIONS.index(position) == (3 * i + 7 * j) % 10


def combinations(held_out: bool) -> list[tuple[str, str, str, str]]:
    """All (colour, shape, size, position) combinations that are (or are not) held out."""
    return [c for c in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS) if is_held_out(*c) == held_out]


def caption(attrs: Attributes, template: int, variant: int) -> str:
    """The caption for ``attrs`` in caption template ``template`` with location wording ``variant`` (0-3)."""
    plural = attrs.count > 1
    noun = PLURALS.get(attrs.shape, attrs.shape + "s") if plural else attrs.shape
    quantity = COUNT_WORDS[attrs.count - 1] if plural else "a"
    bare_quantity = quantity if plural else _article(attrs.colour)
    corner = attrs.position != "center"
    where = f"{attrs.position} corner" if corner else attrs.position
    preposition = ("in", "near", "at", "in")[variant % 4]
    if variant % 4 == 3:
        loc = f"in the {attrs.position} corner" if corner else "in the middle"
    else:
        loc = f"{preposition} the {attrs.position}"
    return CAPTION_TEMPLATES[template].format(
        np=f"{quantity} {attrs.size} {attrs.colour} {noun}",
        bare=f"{bare_quantity} {attrs.colour} {noun}",
        size=attrs.size,
        where=where,
        loc=loc,
        be="are" if plural else "is",
    )


def all_texts(max_count: int = 3) -> list[str]:
    """Every caption the generator can write, and every zero-shot prompt."""
    texts = [template.format(name) for name in CLASSES for template in TEMPLATES]
    for colour, shape, size, position in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS):
        for count in range(1, (max_count if size == "small" else 1) + 1):
            attrs = Attributes(colour, shape, size, position, count)
            texts.extend(caption(attrs, t, v) for t in range(len(CAPTION_TEMPLATES)) for v in range(4))
    return texts


def schedule(split: str, n: int, seed: int, held_out: bool) -> list[tuple[str, str, str, str]]:
    """The (colour, shape, size, position) of each of ``n`` samples: rounds of one sample per class."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], 1])
    cells: dict[str, list[tuple[str, str, str, str]]] = {name: [] for name in CLASSES}
    for combo in combinations(held_out):
        cells[f"{combo[0]} {combo[1]}"].append(combo)
    orders = [[cells[name][k] for k in rng.permutation(len(cells[name]))] for name in CLASSES]
    out: list[tuple[str, str, str, str]] = []
    for round_index in itertools.count():
        if len(out) >= n:
            break
        out.extend(orders[c][round_index % len(orders[c])] for c in rng.permutation(len(CLASSES)))
    return out[:n]


def render(attrs: Attributes, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Draw ``attrs`` on a random background: ``image_size x image_size x 3`` uint8."""
    size = image_size
    image = _background(rng, size)
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    radius = RADIUS[attrs.size] * size * rng.uniform(0.9, 1.1)
    ax, ay = ANCHORS[attrs.position]
    cx, cy = (ax + rng.uniform(-0.03, 0.03)) * size, (ay + rng.uniform(-0.03, 0.03)) * size
    phase = rng.uniform(0, 2 * math.pi)
    for k in range(attrs.count):
        angle = phase + 2 * math.pi * k / attrs.count
        x = cx + SPREAD[attrs.count] * radius * math.cos(angle)
        y = cy + SPREAD[attrs.count] * radius * math.sin(angle)
        tilt = math.radians(rng.uniform(-12, 12))
        if attrs.shape == "circle":
            s = SUPERSAMPLE
            draw.ellipse([(x - radius) * s, (y - radius) * s, (x + radius) * s, (y + radius) * s], fill=255)
        else:
            draw.polygon([(px * SUPERSAMPLE, py * SUPERSAMPLE) for px, py in _outline(attrs.shape, x, y, radius, tilt)],
                         fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255.0
    colour = np.asarray(COLOURS[attrs.colour], dtype=np.float32) + rng.uniform(-18, 18, 3).astype(np.float32)
    image = image * (1.0 - alpha) + colour * alpha
    image += rng.normal(0.0, rng.uniform(0.0, 6.0), image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG-encode a uint8 ``H x W x 3`` array (deterministic bytes for deterministic pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def sample(split: str, index: int, combo: Sequence[str], *, seed: int, image_size: int, max_count: int = 3) -> dict:
    """The shard sample ``index`` of ``split`` showing ``combo`` (colour, shape, size, position)."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], 0, index])
    colour, shape, size, position = combo
    count = int(rng.integers(1, max_count + 1)) if size == "small" else 1
    attrs = Attributes(colour, shape, size, position, count)
    text = caption(attrs, int(rng.integers(len(CAPTION_TEMPLATES))), int(rng.integers(4)))
    image = render(attrs, rng, image_size)
    return {"__key__": f"{split}-{index:07d}", "png": png_bytes(image), "txt": text, "json": attrs.to_json()}


def samples(split: str, n: int, *, seed: int, image_size: int, max_count: int = 3, held_out: bool | None = None,
            workers: int = 1) -> Iterator[dict]:
    """The ``n`` samples of ``split`` in order; held-out combinations for ``test`` unless ``held_out`` says otherwise.

    ``workers > 1`` renders in that many processes; the samples are the same whatever the number of workers.
    """
    held = split == "test" if held_out is None else held_out
    return generate(_job, _jobs(split, n, seed, image_size, max_count, held), workers=workers)


def make(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = 64,
    n_train: int = 20000,
    n_val: int = 2000,
    n_test: int = 2000,
    shard_size: int = 1000,
    max_count: int = 3,
    heldout_val: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the shapes corpus: ``{train,val,test}-NNNNNN.tar``, ``classes.json``, ``tokenizer/``, ``meta.json``.

    Args:
        out_dir: output folder (created; shards of an earlier run there are replaced).
        seed: everything generated is a function of the seed.
        image_size: side of the square images in pixels.
        n_train: training samples.
        n_val: validation samples (i.i.d. with train unless ``heldout_val``).
        n_test: test samples, all from held-out combinations.
        shard_size: samples per shard.
        max_count: most copies of a small shape in one image (1 turns counting off).
        heldout_val: draw val from the held-out combinations, like test.
        workers: rendering processes; ``None`` uses up to 8 CPU cores. The output does not depend on it.
        progress: show tqdm progress bars.

    Returns:
        The metadata written to ``meta.json``; shard patterns in it are relative to ``out_dir``.
    """
    if not 1 <= max_count <= len(COUNT_WORDS):
        raise ValueError(f"max_count must be in 1..{len(COUNT_WORDS)}, got {max_count}")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    held = {"train": False, "val": heldout_val, "test": True}
    corpus = caption_corpus(
        "shapes",
        {split: _jobs(split, n, seed, image_size, max_count, held[split]) for split, n in sizes.items()},
        _job,
        vocabulary=Vocabulary(CLASSES, TEMPLATES, lambda: all_texts(max_count), CONTEXT_LENGTH),
        seed=seed,
        image_size=image_size,
        shard_size=shard_size,
        workers=workers,
        details={"val": "held-out combinations" if heldout_val else "iid",
                 "held_out_combinations": len(combinations(True)), "max_count": max_count},
    )
    return write_corpus(out_dir, corpus, progress=progress)


_Job = tuple[str, int, Sequence[str], int, int, int]


def _jobs(split: str, n: int, seed: int, image_size: int, max_count: int, held_out: bool) -> list[_Job]:
    combos = schedule(split, n, seed, held_out)
    return [(split, index, combo, seed, image_size, max_count) for index, combo in enumerate(combos)]


def _job(args: _Job) -> dict:
    split, index, combo, seed, image_size, max_count = args
    return sample(split, index, combo, seed=seed, image_size=image_size, max_count=max_count)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _outline(shape: str, x: float, y: float, r: float, tilt: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        points = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "diamond":
        points = [(0.0, -1.15 * r), (0.8 * r, 0.0), (0.0, 1.15 * r), (-0.8 * r, 0.0)]
    elif shape == "triangle":
        points = [(1.25 * r * math.cos(a), 1.25 * r * math.sin(a) + 0.15 * r)
                  for a in (math.radians(d) for d in (-90, 30, 150))]
    elif shape == "star":
        points = [((1.25 if k % 2 == 0 else 0.5) * r * math.cos(math.radians(-90 + 36 * k)),
                   (1.25 if k % 2 == 0 else 0.5) * r * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]
    elif shape == "cross":
        w, h = 0.33 * r, 1.05 * r
        points = [(-w, -h), (w, -h), (w, -w), (h, -w), (h, w), (w, w), (w, h), (-w, h), (-w, w), (-h, w), (-h, -w),
                  (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cos, sin = math.cos(tilt), math.sin(tilt)
    return [(x + px * cos - py * sin, y + px * sin + py * cos) for px, py in points]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    base = _dull_colour(rng)
    if kind == "flat":
        return np.broadcast_to(base, (size, size, 3)).copy()
    if kind == "noise":
        cells = int(rng.integers(2, 9))
        coarse = rng.normal(0.0, rng.uniform(6.0, 18.0), (cells, cells, 3)).astype(np.float32)
        blotches = Image.fromarray(np.clip(coarse + 128.0, 0, 255).astype(np.uint8))
        shift = blotches.resize((size, size), Image.Resampling.BILINEAR)
        fine = rng.normal(0.0, rng.uniform(2.0, 8.0), (size, size, 3)).astype(np.float32)
        return base + np.asarray(shift, dtype=np.float32) - 128.0 + fine
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, 2 * math.pi)
    along = xs * math.cos(theta) + ys * math.sin(theta)
    if kind == "gradient":
        other = _dull_colour(rng)
        t = ((along - along.min()) / max(float(along.max() - along.min()), 1e-6))[..., None]
        return base * (1.0 - t) + other * t
    period = rng.uniform(0.06, 0.2)
    amplitude = rng.uniform(6.0, 20.0)
    wave = np.sign(np.sin(2 * math.pi * along / period + rng.uniform(0, 2 * math.pi)))[..., None]
    return base + amplitude * wave.astype(np.float32)


def _dull_colour(rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(25.0, 115.0)
    return (grey + rng.uniform(-15.0, 15.0, 3)).astype(np.float32)

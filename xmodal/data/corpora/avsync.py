"""AVSync: procedural audio-video clips whose picture and sound follow one envelope (audio teacher -> video student).

Each sample is a short clip (1 s by default: 16 frames at 16 fps, 32 x 32 px, and 16 kHz mono audio):

Video (``mp4``, MPEG-4 part 2 through PyAV: unlike libx264 on tiny frames, byte-reproducible)
    A coloured disc drifting in a straight line over a dark, noisy background; its radius and brightness follow
    the envelope.
Audio (``flac``, 16-bit)
    A tone with a second harmonic whose amplitude follows the envelope and whose pitch rises with it
    (``f0 * (1 + 0.5 * envelope)``), plus faint noise.
Envelope
    One, two or three smooth pulses (Gaussian bumps) in separate thirds of the clip, so the count is readable
    from either modality; ``label = pulses - 1``.
``txt``
    ``"a {colour} blob pulsing {once|twice|three times}"``.
``json``
    ``label``, ``pulses``, ``colour``, ``f0``, ``fps``, ``sample_rate``, and ``envelope`` (the mean envelope
    during each frame, which is what the video shows and a teacher hears).

Everything is a function of ``(seed, split, index)``: the same seed gives byte-identical shards with the same
FFmpeg and libsndfile builds.

Defaults (2000/200/200 clips, about 70 MB) are written in about ten seconds on one CPU core.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.data.corpora.writer import Corpus, write_corpus
from xmodal.modalities.audio import encode_audio
from xmodal.modalities.video import encode_mp4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 90, 245),
    "yellow": (245, 225, 40),
    "purple": (170, 70, 220),
    "cyan": (40, 215, 225),
}
COUNT_WORDS = ("once", "twice", "three times")
CLASSES = ("one pulse", "two pulses", "three pulses")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def envelope(rng: np.random.Generator, pulses: int, num_samples: int) -> np.ndarray:
    """``pulses`` Gaussian bumps in distinct thirds of the clip, peak 1: float ``num_samples`` in [0, 1]."""
    t = np.arange(num_samples) / num_samples
    env = np.zeros(num_samples)
    for slot in np.sort(rng.choice(3, size=pulses, replace=False)):
        centre = (slot + rng.uniform(0.35, 0.65)) / 3
        width = rng.uniform(0.035, 0.06)
        env = np.maximum(env, np.exp(-0.5 * ((t - centre) / width) ** 2))
    return env


def frame_envelope(env: np.ndarray, num_frames: int) -> np.ndarray:
    """Mean of the sample-rate envelope during each frame: ``num_frames``."""
    return np.array([chunk.mean() for chunk in np.array_split(env, num_frames)])


def render_frames(rng: np.random.Generator, env: np.ndarray, colour: tuple[int, int, int], size: int) -> np.ndarray:
    """A disc drifting across a noisy background, radius and brightness following ``env`` (one value per frame).

    Returns uint8 ``T x size x size x 3``.
    """
    start, end = rng.uniform(0.3, 0.7, 2) * size, rng.uniform(0.3, 0.7, 2) * size
    background = rng.uniform(15, 60) + rng.normal(0, 4, (size, size, 3))
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    frames = []
    for i, e in enumerate(env):
        cx, cy = start + (end - start) * i / max(len(env) - 1, 1)
        radius = size * (0.08 + 0.2 * e)
        coverage = np.clip(radius - np.hypot(xs - cx, ys - cy) + 0.5, 0, 1)[..., None]
        alpha = coverage * (0.2 + 0.8 * e)
        image = background * (1 - alpha) + np.asarray(colour) * alpha + rng.normal(0, 2, (size, size, 3))
        frames.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return np.stack(frames)


def synth_audio(rng: np.random.Generator, env: np.ndarray, f0: float, sample_rate: int) -> np.ndarray:
    """A two-harmonic tone with amplitude ``env`` and pitch ``f0 * (1 + 0.5 * env)``: float32 in [-1, 1]."""
    phase = 2 * math.pi * np.cumsum(f0 * (1 + 0.5 * env)) / sample_rate
    wave = env * (0.5 * np.sin(phase) + 0.2 * np.sin(2 * phase)) + rng.normal(0, 0.003, len(env))
    return np.clip(wave, -1, 1).astype(np.float32)


def sample(
    split: str, index: int, *, seed: int, seconds: float, fps: int, image_size: int, sample_rate: int
) -> dict[str, Any]:
    """The shard sample ``index`` of ``split``."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    pulses = int(rng.integers(1, 4))
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    f0 = float(rng.uniform(220, 660))
    num_frames = round(seconds * fps)
    env = envelope(rng, pulses, round(seconds * sample_rate))
    per_frame = frame_envelope(env, num_frames)
    meta = {
        "label": pulses - 1, "pulses": pulses, "colour": colour, "f0": round(f0, 2), "fps": fps,
        "sample_rate": sample_rate, "envelope": [round(float(e), 4) for e in per_frame],
    }
    return {
        "__key__": f"{split}-{index:07d}",
        "mp4": encode_mp4(render_frames(rng, per_frame, COLOURS[colour], image_size), fps),
        "flac": encode_audio(synth_audio(rng, env, f0, sample_rate), sample_rate),
        "txt": f"a {colour} blob pulsing {COUNT_WORDS[pulses - 1]}",
        "json": meta,
    }


def samples(split: str, n: int, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """The ``n`` samples of ``split`` (keyword arguments as :func:`sample`)."""
    for index in range(n):
        yield sample(split, index, **kwargs)


def make(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 200,
    shard_size: int = 500,
    seconds: float = 1.0,
    fps: int = 16,
    image_size: int = 32,
    sample_rate: int = 16000,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the AVSync corpus: ``{train,val,test}-NNNNNN.tar`` and ``meta.json`` in ``out_dir``.

    Args:
        out_dir: output folder (created; shards of an earlier run there are replaced).
        seed: everything generated is a function of the seed.
        n_train, n_val, n_test: samples per split (all i.i.d.).
        shard_size: samples per shard.
        seconds: clip length. fps: video frame rate. image_size: frame side in pixels (even).
        sample_rate: audio sample rate.
        progress: show tqdm progress bars.

    Returns:
        The metadata written to ``meta.json``; shard patterns in it are relative to ``out_dir``.
    """
    if image_size % 2:
        raise ValueError(f"image_size must be even (yuv420p), got {image_size}")
    options = {"seed": seed, "seconds": seconds, "fps": fps, "image_size": image_size, "sample_rate": sample_rate}
    corpus = Corpus(
        name="avsync",
        splits={split: [(split, index, options) for index in range(n)]
                for split, n in (("train", n_train), ("val", n_val), ("test", n_test))},
        sample=_job,
        shard_size=shard_size,
        header={**options, "num_frames": round(seconds * fps)},
        details=lambda: {"classes": list(CLASSES), "num_classes": len(CLASSES)},
    )
    return write_corpus(out_dir, corpus, progress=progress)


def _job(args: tuple[str, int, dict[str, Any]]) -> dict[str, Any]:
    split, index, options = args
    return sample(split, index, **options)

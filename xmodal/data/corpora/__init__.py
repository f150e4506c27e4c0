"""Offline corpora: generators of real WebDataset shard sets for the recipes, built on the CPU in seconds.

Each corpus module has ``make(out_dir, *, seed, image_size, n_train, n_val, n_test, shard_size, ...) -> dict``
that writes ``{train,val,test}-NNNNNN.tar`` (fields ``png``, ``txt``, ``json``), ``classes.json`` (zero-shot
class names and prompt templates), ``tokenizer/`` (a word-level tokenizer covering every caption and prompt)
and ``meta.json``, and returns the metadata. The modules declare their splits, per-sample function, metadata and
side files; :mod:`xmodal.data.corpora.writer` writes the shards (through a worker pool that keeps sample order),
the side files and ``meta.json``.

* ``shapes``: procedural coloured shapes with compositional captions; test holds unseen attribute combinations.
* ``digits``: scikit-learn's handwritten digits, upscaled and colourised, with captions.
* ``fashion-mnist``: the real Fashion-MNIST photos (Debian package ``dataset-fashion-mnist``) with captions,
  a base/novel class split and nested 1 % / 10 % labelled subsets; ``make(out_dir, *, ..., source=DIR)``.
* ``avsync``: short clips of a pulsing blob with a tone following the same envelope (audio-video pairs).
* ``avspeech-grid``: GRID sentences spoken by espeak-ng with a rendered mouth driven by the engine's phoneme
  timings (``flac``, ``mp4``, ``txt``, ``json``; needs libespeak-ng); ``make(out_dir, *, seed, size, ...)``.
* ``bev-scenes``: procedural driving scenes with a ray-cast 32-beam LiDAR (``lidar.npy``), six rendered cameras
  (``cam_*.jpg``) and nuScenes-style boxes and calibration (``json``); ``make(out_dir, *, seed, size, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from xmodal.data.corpora import avspeech, avsync, bevscenes, digits, fashion_mnist, shapes

CORPORA: dict[str, Callable[..., dict[str, Any]]] = {
    "shapes": shapes.make, "digits": digits.make, "avsync": avsync.make, "avspeech-grid": avspeech.make,
    "bev-scenes": bevscenes.make, "fashion-mnist": fashion_mnist.make,
}


def make_corpus(name: str, out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Write corpus ``name`` to ``out_dir``; ``kwargs`` go to its ``make``.

    Raises:
        ValueError: if there is no corpus called ``name``.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; available: {', '.join(sorted(CORPORA))}")
    return CORPORA[name](out_dir, **kwargs)


__all__ = ["CORPORA", "make_corpus", "avspeech", "avsync", "bevscenes", "digits", "fashion_mnist", "shapes"]

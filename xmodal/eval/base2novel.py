"""Base-to-novel generalisation (CoCoOp's protocol, used by PromptSRC and PromptKD).

The classes are split in two halves: prompts are learnt with labels of the *base* classes only, and the model is
tested on both. Base accuracy is measured on test images of base classes, choosing among base classes only;
novel accuracy likewise among novel classes; the summary is their harmonic mean
``HM = 2 * base * novel / (base + novel)``.

A split file is JSON: ``{"classes": [all names in label order], "base": [indices], "novel": [indices]}``;
:func:`make_split` gives the usual one (the first half of the classes, rounded up, are base).
Ties count against the model, as in :mod:`xmodal.eval.zeroshot`. The metric is
:class:`xmodal.eval.metrics.Base2NovelAccuracy`, the loop :func:`xmodal.eval.loops.evaluate_base2novel`, and the
few-shot training shards come from :func:`xmodal.data.eval_sets.write_fewshot_shards`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xmodal.eval.zeroshot import SIMPLE_TEMPLATES, Template, class_embeddings, topk_hits


@dataclass
class ClassSplit:
    """Class names in label order and the base / novel class indices."""

    classes: list[str]
    base: list[int]
    novel: list[int]

    def __post_init__(self) -> None:
        overlap = set(self.base) & set(self.novel)
        if overlap:
            raise ValueError(f"classes {sorted(overlap)} are both base and novel")
        bad = [i for i in self.base + self.novel if not 0 <= i < len(self.classes)]
        if bad:
            raise ValueError(f"class indices {bad} are out of range for {len(self.classes)} classes")


def make_split(classes: Sequence[str]) -> ClassSplit:
    """The usual split: the first ``ceil(C / 2)`` classes are base, the rest novel."""
    half = math.ceil(len(classes) / 2)
    return ClassSplit(list(classes), list(range(half)), list(range(half, len(classes))))


def read_split(path: str | Path) -> ClassSplit:
    data = json.loads(Path(path).read_text())
    return ClassSplit([str(c) for c in data["classes"]], [int(i) for i in data["base"]],
                      [int(i) for i in data["novel"]])


def write_split(split: ClassSplit, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(split), indent=2) + "\n")
    return out


def harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)``; 0 when both are 0."""
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def subset_hits(logits: Tensor, labels: Tensor, subset: Sequence[int]) -> tuple[int, int]:
    """Top-1 hits and count on the samples whose label is in ``subset``, choosing among ``subset`` only.

    Args:
        logits: ``N x C`` scores over every class.
        labels: ``N`` class indices into the ``C`` classes.
        subset: the class indices competing (base or novel).

    Returns:
        ``(hits, n)``.
    """
    index = torch.as_tensor(list(subset), dtype=torch.long, device=logits.device)
    remap = torch.full((logits.shape[1],), -1, dtype=torch.long, device=logits.device)
    remap[index] = torch.arange(len(index), device=logits.device)
    local = remap[labels.long().to(logits.device)]
    keep = local >= 0
    if not keep.any():
        return 0, 0
    return topk_hits(logits[keep][:, index], local[keep], (1,))[1], int(keep.sum())


def classifier_of(model: Any, split: ClassSplit, templates: Sequence[Template] = SIMPLE_TEMPLATES) -> Tensor:
    """The ``C x D`` classifier a model evaluates with, in this order of preference.

    1. its stored class vectors (``model.class_vectors``, a prompted student or the stage-2 teacher; the class
       list must equal the split's);
    2. its own prompted class features (``model.class_embeddings(classes)``, a stage-1 :class:`PromptedCLIP`);
    3. zero-shot prompt-ensembled text embeddings (a plain CLIP with ``embed_texts``).
    """
    vectors = getattr(model, "class_vectors", None)
    if isinstance(vectors, Tensor):
        stored = getattr(model, "classes", None)
        if stored is not None and list(stored) != split.classes:
            raise ValueError("the model's stored class vectors are for other classes than the split file's")
        return vectors
    if hasattr(model, "class_embeddings"):
        with torch.no_grad():
            return model.class_embeddings(split.classes)
    return class_embeddings(model, split.classes, templates)

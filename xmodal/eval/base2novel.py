"""Base-to-novel generalisation (CoCoOp's protocol, used by PromptSRC and PromptKD).

The classes are split in two halves: prompts are learnt with labels of the *base* classes only, and the model is
tested on both. Base accuracy is measured on test images of base classes, choosing among base classes only;
novel accuracy likewise among novel classes; the summary is their harmonic mean
``HM = 2 * base * novel / (base + novel)``.

A split file is JSON: ``{"classes": [all names in label order], "base": [indices], "novel": [indices]}``;
:func:`make_split` gives the usual one (the first half of the classes, rounded up, are base).
Ties count against the model, as in :mod:`xmodal.eval.zeroshot`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.eval.zeroshot import SIMPLE_TEMPLATES, Template, class_embeddings, evaluating, topk_hits


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


def base2novel_metrics(logits: Tensor, labels: Tensor, split: ClassSplit) -> dict[str, float]:
    """``{"base", "novel", "hm"}`` accuracies in [0, 1] and the counts ``n_base``/``n_novel``.

    Args:
        logits: ``N x C`` scores over every class of ``split``.
        labels: ``N`` class indices.
        split: the base / novel classes.
    """
    base_hits, n_base = subset_hits(logits, labels, split.base)
    novel_hits, n_novel = subset_hits(logits, labels, split.novel)
    base = base_hits / n_base if n_base else 0.0
    novel = novel_hits / n_novel if n_novel else 0.0
    return {"base": base, "novel": novel, "hm": harmonic_mean(base, novel), "n_base": n_base, "n_novel": n_novel}


def classifier_of(model: Any, split: ClassSplit, templates: Sequence[Template] = SIMPLE_TEMPLATES) -> Tensor:
    """The ``C x D`` classifier a model evaluates with, in this order of preference.

    1. its stored class vectors (``model.class_vectors``, a prompted student or the stage-2 teacher; the class
       list must equal the split's);
    2. its own prompted class features (``model.class_embeddings(classes)``, a stage-1 :class:`PromptedCLIP`);
    3. zero-shot prompt-ensembled text embeddings (a plain CLIP with ``encode_text``).
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


@torch.inference_mode()
def evaluate_base2novel(
    model: Any, loader: Iterable[Mapping[str, Any]], split: ClassSplit, classifier: Tensor | None = None,
    templates: Sequence[Template] = SIMPLE_TEMPLATES, device: str | torch.device | None = None,
) -> dict[str, float]:
    """Base / novel / HM top-1 accuracy of ``model`` on a labelled image loader.

    Args:
        model: has ``encode_image(images) -> B x D``; the classifier comes from :func:`classifier_of` unless given.
        loader: yields ``image`` (``B x 3 x H x W``) and ``label`` (``B``, indices into ``split.classes``).
        split: the class split.
        classifier: ``C x D`` class embeddings to use instead (e.g. a stored class vectors file).
        templates: prompt templates for the zero-shot classifier.
        device: where to run; ``None`` keeps the model where it is.
    """
    logits, labels = [], []
    with evaluating(model, device) as dev:
        weights = classifier if classifier is not None else classifier_of(model, split, templates)
        weights = F.normalize(weights.float().to(dev), dim=-1)
        for batch in loader:
            emb = F.normalize(model.encode_image(batch["image"].to(dev, non_blocking=True)).float(), dim=-1)
            logits.append(emb @ weights.T)
            labels.append(batch["label"].to(dev))
    if not logits:
        raise ValueError("the evaluation loader yielded no batch")
    return base2novel_metrics(torch.cat(logits), torch.cat(labels), split)


def iter_tar_samples(shards: str) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", ext: bytes}``) of the shards matching ``shards`` (brace/glob), in order."""
    import webdataset as wds

    from xmodal.data.wds import expand_shards

    pipeline = wds.DataPipeline(wds.SimpleShardList(expand_shards(shards)), wds.tarfile_to_samples())
    for sample in pipeline:
        yield {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def choose_shots(shards: str, classes: Sequence[int], shots: int | None, seed: int | None) -> set[str]:
    """Keys of ``shots`` samples per class in ``classes``: the first ones in shard order, or a seeded draw."""
    by_class: dict[int, list[str]] = {c: [] for c in classes}
    for sample in iter_tar_samples(shards):
        label = int(json.loads(sample["json"])["label"])
        if label in by_class:
            by_class[label].append(sample["__key__"])
    rng = random.Random(seed)
    chosen: set[str] = set()
    for keys in by_class.values():
        take = len(keys) if shots is None else min(shots, len(keys))
        chosen.update(keys[:take] if seed is None else rng.sample(keys, take))
    return chosen


def write_fewshot_shards(
    shards: str, out_dir: str | Path, split: ClassSplit, subset: str = "base", shots: int | None = 16,
    seed: int | None = None, prefix: str = "train",
) -> str:
    """Copy ``shots`` samples of each ``subset`` class into new shards, labels renumbered within the subset.

    Stage 1 (and the labels-only baseline) train on these: the novel classes' labels never reach them. The
    original label is kept as ``global_label`` in the JSON.

    Args:
        shards: the labelled training shards (brace/glob pattern).
        out_dir: where to write ``{prefix}-NNNNNN.tar``.
        split: the class split.
        subset: ``"base"`` or ``"novel"``.
        shots: samples per class; ``None`` keeps them all.
        seed: ``None`` takes the first samples of each class in shard order; a seed draws them at random.
        prefix: shard name prefix.

    Returns:
        The shard pattern of the written shards.
    """
    from xmodal.data.shards import shard_pattern, write_shards

    index = {c: i for i, c in enumerate(getattr(split, subset))}
    chosen = choose_shots(shards, list(index), shots, seed)

    def kept() -> Iterator[dict[str, Any]]:
        for sample in iter_tar_samples(shards):
            if sample["__key__"] in chosen:
                meta = json.loads(sample["json"])
                label = int(meta["label"])
                sample["json"] = json.dumps({**meta, "label": index[label], "global_label": label}).encode()
                yield sample

    paths = write_shards(kept(), out_dir, prefix, max_count=1000, mtime=0.0)
    if not paths:
        raise ValueError(f"{shards}: no sample of the {subset} classes")
    return shard_pattern(paths)


def folder_loader(root: str | Path, split: ClassSplit, image_size: int, batch_size: int = 64,
                  num_workers: int = 0) -> Iterable[Mapping[str, Any]]:
    """An ImageNet-style folder (``root/<class_name>/*.png``) labelled by the split's class names."""
    from xmodal.eval.folders import ImageFiles, image_loader, scan_image_folder

    paths, labels, names = scan_image_folder(root)
    position = {c: i for i, c in enumerate(split.classes)}
    unknown = sorted(set(names) - set(position))
    if unknown:
        raise ValueError(f"{root}: folders {unknown} are not classes of the split file")
    return image_loader(ImageFiles(paths, image_size, [position[names[i]] for i in labels]), batch_size, num_workers)

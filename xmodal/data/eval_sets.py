"""Evaluation sets as loaders: image folders and files, caption files, shards, lip-reading file lists, few-shot shards.

Image folders: an ImageNet-style folder is ``root/<class_name>/*.jpg|jpeg|png|webp``; classes are the sub-folders in
sorted order, and a folder name becomes a class name with ``_`` turned into a space (``golden_retriever`` ->
``golden retriever``). Folders named by ids (ImageNet's ``n01440764``) need class names given explicitly.

Caption files (:func:`load_captions`), autodetected:

* Karpathy splits: ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}, ...]}, ...]}``;
* COCO annotations: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.

Lip-reading file lists (:func:`read_file_list`), GRID/LRS2-style, one utterance per line::

    relative/path/to/clip transcript words ...

The path is relative to the list's root (default: the list's folder); ``.mp4`` is appended when it has no extension.
A ``.wav`` or ``.flac`` beside the clip with the same stem is loaded as its audio (needed only for alignment plots).
Blank lines and lines starting with ``#`` are skipped; transcripts are
:func:`~xmodal.modalities.transcript.normalize_transcript`-ed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from xmodal.contracts import Batch, Modality
from xmodal.data.wds import CountedBatches, make_pipeline, move_batch
from xmodal.modalities.image import IMAGE_EXTENSIONS, ImageModality, decode_image
from xmodal.modalities.transcript import normalize_transcript

if TYPE_CHECKING:
    from xmodal.eval.base2novel import ClassSplit

AUDIO_SIBLINGS = (".wav", ".flac")

# ----------------------------------------------------------------------------------------------- images on disk


class ImageFiles(Dataset):
    """Image files decoded to uint8 ``3 x size x size`` (short-side resize, centre crop), with optional labels.

    Items are ``{"image": uint8 3 x size x size, "index": int}`` plus ``"label": int`` when labels are given.
    """

    def __init__(self, paths: Sequence[str | Path], size: int, labels: Sequence[int] | None = None) -> None:
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(paths)} image paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.size = size
        self.labels = labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"image": decode_image(self.paths[index].read_bytes(), self.size), "index": index}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item


def collate_images(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack :class:`ImageFiles` items: ``image`` uint8 ``B x 3 x H x W``, ``index``/``label`` LongTensor ``B``."""
    batch: dict[str, Any] = {"image": torch.stack([item["image"] for item in items])}
    for key in ("index", "label"):
        if key in items[0]:
            batch[key] = torch.tensor([item[key] for item in items], dtype=torch.long)
    return batch


def image_loader(dataset: Dataset, batch_size: int = 64, num_workers: int = 0) -> DataLoader:
    """An in-order evaluation loader over ``dataset`` (pinned memory when CUDA is available)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=torch.cuda.is_available(),
    )


def scan_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Image paths, their labels, and the class names of an ImageNet-style folder (classes sorted by folder)."""
    root = Path(root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not class_dirs:
        raise FileNotFoundError(f"{root}: no class folders (expected root/<class_name>/*.jpg)")
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return paths, labels, [d.name.replace("_", " ") for d in class_dirs]


def folder_loader(root: str | Path, split: ClassSplit, image_size: int, batch_size: int = 64,
                  num_workers: int = 0) -> Iterable[Mapping[str, Any]]:
    """An ImageNet-style folder (``root/<class_name>/*.png``) labelled by the split's class names."""
    paths, labels, names = scan_image_folder(root)
    position = {c: i for i, c in enumerate(split.classes)}
    unknown = sorted(set(names) - set(position))
    if unknown:
        raise ValueError(f"{root}: folders {unknown} are not classes of the split file")
    return image_loader(ImageFiles(paths, image_size, [position[names[i]] for i in labels]), batch_size, num_workers)


def load_captions(captions_json: str | Path, split: str | None = None) -> list[tuple[str, list[str]]]:
    """``(relative image path, captions)`` per image from a Karpathy or COCO caption file (autodetected).

    Args:
        captions_json: the JSON file.
        split: keep only images whose ``split`` field equals this (Karpathy files: ``"test"``, ``"val"``...).

    Images without captions are dropped.
    """
    data = json.loads(Path(captions_json).read_text())
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{captions_json}: not a Karpathy or COCO caption file (no 'images' list)")
    if split is not None:
        if not any("split" in img for img in images):
            raise ValueError(f"{captions_json}: split={split!r} asked for, but its images have no 'split' field")
        images = [img for img in images if img.get("split") == split]
    if "annotations" in data:
        by_id: dict[Any, list[str]] = {img["id"]: [] for img in images}
        for ann in data["annotations"]:
            if ann["image_id"] in by_id:
                by_id[ann["image_id"]].append(ann["caption"].strip())
        pairs = [(img["file_name"], by_id[img["id"]]) for img in images]
    elif all("sentences" in img for img in images):
        pairs = [
            (str(Path(img.get("filepath", "")) / img["filename"]), [s["raw"].strip() for s in img["sentences"]])
            for img in images
        ]
    else:
        raise ValueError(f"{captions_json}: neither COCO ('annotations') nor Karpathy ('sentences' per image) format")
    return [(path, caps) for path, caps in pairs if caps]


# ------------------------------------------------------------------------------------------------------- shards


def shard_loader(pattern: str, image_size: int, batch_size: int, num_workers: int) -> CountedBatches:
    """An in-order loader of uint8 images, captions and labels from shards (corrupt samples skipped and counted)."""
    from xmodal.modalities.text import TextModality

    pipeline = make_pipeline(pattern, [ImageModality(image_size), TextModality()], batch_size, train=False)
    loader = DataLoader(pipeline, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available())
    return CountedBatches(loader, pattern)


def bev_loader(pattern: str, modality: Modality, batch_size: int, num_workers: int) -> CountedBatches:
    """An in-order loader of BEV batches from shards (corrupt samples skipped and counted)."""
    pipeline = make_pipeline(pattern, [modality], batch_size, train=False)
    return CountedBatches(DataLoader(pipeline, batch_size=None, num_workers=num_workers), pattern)


def recipe_bev_args(config: str | Path) -> dict[str, Any]:
    """``init_args`` of the BEVModality in a recipe's ``data.modalities`` (empty when there is none)."""
    import yaml

    data = yaml.safe_load(Path(config).read_text()) or {}
    for entry in (data.get("data") or {}).get("modalities") or []:
        if isinstance(entry, dict) and str(entry.get("class_path", "")).endswith("BEVModality"):
            return dict(entry.get("init_args") or {})
    return {}


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

    Stage 1 (and the labels-only baseline) of base-to-novel prompt distillation train on these: the novel classes'
    labels never reach them. The original label is kept as ``global_label`` in the JSON.

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


# ------------------------------------------------------------------------------------------- lip-reading lists


def read_file_list(path: str | Path, root: str | Path | None = None) -> list[tuple[Path, str]]:
    """``(video path, transcript)`` pairs of a list file (format in the module docstring)."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) < 2:
            raise ValueError(f"{path}:{number}: expected 'relative/video/path transcript...', got {line!r}")
        video = base / parts[0]
        items.append((video if video.suffix else video.with_suffix(".mp4"), normalize_transcript(parts[1])))
    if not items:
        raise ValueError(f"{path}: no utterances")
    return items


def list_batches(items: Sequence[tuple[Path, str]], modalities: Sequence[Any], batch_size: int) -> Iterator[Batch]:
    """Decoded, collated batches of a file list with the given modality plug-ins (video, audio, transcript)."""
    from xmodal.data.decoders import collate_items, decode_sample

    for start in range(0, len(items), batch_size):
        decoded = []
        for video, text in items[start : start + batch_size]:
            if not video.is_file():
                raise FileNotFoundError(f"video not found: {video}")
            sample: dict[str, Any] = {"__key__": str(video), "mp4": video.read_bytes(), "txt": text.encode()}
            for ext in AUDIO_SIBLINGS:
                if video.with_suffix(ext).is_file():
                    sample[ext[1:]] = video.with_suffix(ext).read_bytes()
            usable = [m for m in modalities if m.name != "audio" or any(e[1:] in sample for e in AUDIO_SIBLINGS)]
            decoded.append(decode_sample(sample, usable))
        usable = [m for m in modalities if m.name != "audio" or all("audio" in item for item in decoded)]
        yield collate_items(decoded, usable)


def to_device(batch: Batch, device: torch.device, modalities: Sequence[Any]) -> Batch:
    """Move tensors to ``device`` and run the evaluation-time device transforms of the modalities whose fields
    the batch has."""
    batch = move_batch(batch, device)
    for modality in modalities:
        if all(field in batch for field in modality.fields):
            batch = modality.on_device(batch, train=False)
    return batch

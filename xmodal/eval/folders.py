"""Images on disk as evaluation loaders: ImageNet-style class folders, plain lists of files, and image shards.

An ImageNet-style folder is ``root/<class_name>/*.jpg|jpeg|png|webp``; classes are the sub-folders in sorted
order, and a folder name becomes a class name with ``_`` turned into a space (``golden_retriever`` ->
``golden retriever``). Folders named by ids (ImageNet's ``n01440764``) need ``classnames`` given explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from xmodal.data.wds import CountedBatches
from xmodal.eval.zeroshot import SIMPLE_TEMPLATES, DualEncoder, Template, evaluate_zeroshot
from xmodal.modalities.image import IMAGE_EXTENSIONS, ImageModality, decode_image


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


def evaluate_zeroshot_folder(
    model: DualEncoder,
    root: str | Path,
    templates: Sequence[Template] = SIMPLE_TEMPLATES,
    image_size: int = 224,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    classnames: Sequence[str] | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 accuracy on an ImageNet-style folder (see the module docstring).

    Args:
        model: has ``encode_image`` and ``encode_text``.
        root: the folder of class folders.
        templates: prompt templates with a ``{}`` placeholder.
        image_size: side images are decoded to (the model resizes again to its own input size).
        batch_size: images per batch.
        device: where to run; ``None`` keeps the model where it is.
        classnames: names for the sorted class folders, overriding the folder names.
        num_workers: data-loader worker processes.

    Returns:
        ``{"top1", "top5", "n", "classes"}``.
    """
    paths, labels, folder_names = scan_image_folder(root)
    names = list(classnames) if classnames is not None else folder_names
    if len(names) != len(folder_names):
        raise ValueError(f"{root} has {len(folder_names)} class folders but {len(names)} class names were given")
    loader = image_loader(ImageFiles(paths, image_size, labels), batch_size, num_workers)
    return {**evaluate_zeroshot(model, loader, names, templates, device), "classes": len(names)}


def shard_loader(pattern: str, image_size: int, batch_size: int, num_workers: int) -> CountedBatches:
    """An in-order loader of uint8 images, captions and labels from shards (corrupt samples skipped and counted)."""
    from xmodal.data.wds import make_pipeline
    from xmodal.modalities.text import TextModality

    pipeline = make_pipeline(pattern, [ImageModality(image_size), TextModality()], batch_size, train=False)
    loader = DataLoader(pipeline, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available())
    return CountedBatches(loader, pattern)

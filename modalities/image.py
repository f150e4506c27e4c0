"""Image modality: PIL decoding in workers, uint8 batches, normalisation and augmentation on the device.

Towers are open_clip vision towers built from a ``vision_cfg`` dict (see :mod:`xmodal.students.clip`);
each model owns an :class:`ImageNormalize` so teacher and student can see different resolutions and stats.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from xmodal.contracts import Batch, Modality, to_float_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def decode_image(data: bytes, size: int) -> Tensor:
    """Decode encoded image bytes to uint8 ``3 x size x size`` (short-side resize, then centre crop)."""
    with Image.open(io.BytesIO(data)) as source:
        img = source.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    if scale != 1.0:
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    array = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageModality(Modality):
    """Decode ``jpg/png/webp`` fields to ``image`` (uint8 ``3 x H x W``).

    Args:
        size: side of the square the worker produces.
        crop_scale: lower bound of the random-resized-crop area on the device in training (1.0 = off).
        flip: random horizontal flips in training. Off by default: captions often say "left"/"right".
    """

    name = "image"
    fields = ("image",)

    def __init__(self, size: int = 32, crop_scale: float = 1.0, flip: bool = False) -> None:
        self.size = size
        self.crop_scale = crop_scale
        self.flip = flip

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        for ext in IMAGE_EXTENSIONS:
            if ext in sample:
                return {"image": decode_image(sample[ext], self.size)}
        raise KeyError(f"sample {sample.get('__key__')!r} has no image field ({', '.join(IMAGE_EXTENSIONS)})")

    def collate(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        return {"image": torch.stack([item["image"] for item in items])}

    def on_device(self, batch: Batch, train: bool) -> Batch:
        images = to_float_image(batch["image"])
        if train and self.crop_scale < 1.0:
            images = random_resized_crop(images, self.crop_scale)
        if train and self.flip:
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        batch["image"] = images
        return batch


def random_resized_crop(images: Tensor, min_scale: float) -> Tensor:
    """Per-sample random crops of area fraction in ``[min_scale, 1]``, resized back, in one ``grid_sample``."""
    b = images.shape[0]
    scale = torch.empty(b, device=images.device).uniform_(min_scale, 1.0).sqrt()
    shift = (1 - scale)[:, None] * (torch.rand(b, 2, device=images.device) * 2 - 1)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class ImageNormalize(nn.Module):
    """A model's own image preprocessing on the device: resize to its input size, then normalise.

    Input: float ``B x 3 x H x W`` in [0, 1] (uint8 is converted). Output: ``B x 3 x size x size``.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD
    ) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        images = to_float_image(images)
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True)
        return (images - self.mean) / self.std

"""Frozen ImageNet classifiers as image teachers: a torchvision architecture (``mobilenet_v2`` by default, any
torchvision classifier by name) or EfficientNet-Lite0, from a local state dict whose sha256 is checked, or from a
folder a fine-tuning run exported (:class:`~xmodal.students.imagenet.ImageNetClassifier` + ``ExportPretrained``).

Outputs: ``image.feat`` float ``B x D`` (the pooled features the classifier reads; 1280 for both shipped networks),
``image.logits`` ``B x C`` (``C = 1000`` for the ImageNet weights) and, with ``feature_map=True``,
``image.feature_map`` ``B x D x h x w``. Preprocessing is the network's own, on the device
(:class:`~xmodal.modalities.imagenet_nets.ImageNetPreprocess`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.contracts import Batch, Outputs, freeze
from xmodal.modalities.imagenet_nets import (
    EXPORT_WEIGHTS,
    ClassifierNet,
    ImageNetPreprocess,
    default_preprocess,
    load_checked_state_dict,
    load_pretrained,
    read_export,
)
from xmodal.teachers.common import state_dict_sha256


class ImageNetTeacher(nn.Module):
    """A frozen image classifier with its own preprocessing.

    Args:
        arch: torchvision model name (``mobilenet_v2``, ``resnet18``...) or ``efficientnet_lite0``.
        weights: a state-dict file of the ImageNet network, a folder exported by a fine-tuning run (its
            ``config.json`` gives the architecture, classes, preprocessing and digest), or ``None``: the file a
            pip package ships for ``arch`` (see :data:`~xmodal.modalities.imagenet_nets.SHIPPED`).
        sha256: the expected digest of the weight file; a mismatch refuses to load. ``None``: the shipped file's
            known digest, or the one an exported folder records.
        image_size, resize_size: crop side and shorter side before it (``None``: ``image_size * 256 / 224``).
            Ignored for an exported folder, which keeps the preprocessing it was trained with.
        feature_map: also output ``image.feature_map``.
    """

    def __init__(
        self, arch: str = "mobilenet_v2", weights: str | None = None, sha256: str | None = None,
        image_size: int = 224, resize_size: int | None = None, feature_map: bool = False,
    ) -> None:
        super().__init__()
        self.with_feature_map = feature_map
        if weights is not None and Path(weights).is_dir():
            config = read_export(weights)
            self.net = ClassifierNet(config.arch, config.num_classes)
            path = Path(weights) / EXPORT_WEIGHTS
            self.net.net.load_state_dict(load_checked_state_dict(path, sha256 or config.weights_sha256))
            self.preprocess = ImageNetPreprocess(config.image_size, config.resize_size, config.mean, config.std)
            self.weights_path = str(path)
        else:
            self.preprocess = default_preprocess(arch, image_size, resize_size)
            self.net, self.weights_path = load_pretrained(arch, weights, sha256)
        self.output_keys: tuple[str, ...] = ("image.feat", "image.logits") + (
            ("image.feature_map",) if feature_map else ()
        )
        freeze(self)

    def train(self, mode: bool = True) -> ImageNetTeacher:
        """Stays in eval mode whatever ``mode`` is: a teacher is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: Batch) -> Outputs:
        fmap, feat, logits = self.net.forward_parts(self.preprocess(batch["image"]))
        out: Outputs = {"image.feat": feat, "image.logits": logits}
        if self.with_feature_map:
            if fmap is None:
                raise ValueError(f"{self.net.arch} has no known feature-map module; set feature_map=False")
            out["image.feature_map"] = fmap
        return out

    def manifest(self) -> dict[str, Any]:
        return {
            "teacher": type(self).__name__, "arch": self.net.arch, "num_classes": self.net.num_classes,
            "weights_file": Path(self.weights_path).name, "weights_sha256": state_dict_sha256(self.net),
            "preprocess": self.preprocess.manifest(), "output_keys": list(self.output_keys),
        }

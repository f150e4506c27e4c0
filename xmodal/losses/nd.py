"""ND loss: align the student's embedding with the direction of the teacher's class mean, and make it long.

Reference: Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction"
(arXiv 2305.17007); official code at github.com/WangYZ1608/Knowledge-Distillation-via-ND.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from xmodal.contracts import Batch, DistillLoss, Keys
from xmodal.losses.features import make_projector


class NormDirectionLoss(DistillLoss):
    """ND loss (Wang et al., arXiv 2305.17007) on penultimate ("embedding") features.

    For a sample with label ``y``, (projected) student embedding ``f_s``, teacher embedding ``f_t`` and teacher
    class mean ``c_y``::

        L_nd = 1 - <f_s, c_y / ||c_y||> / max(||f_s||, ||f_t||)

    averaged over the batch. While ``||f_s|| < ||f_t||`` the denominator is the constant ``||f_t||``, so the
    loss falls only by growing the projection of ``f_s`` on the class direction (the norm term); once the
    student is longer than the teacher it reduces to ``1 - cos(f_s, c_y)`` (the direction term). The paper
    adds this term to a logit loss (KD, DKD, ...); here that is another entry in the distiller's list. It takes no
    ``normalize`` (:mod:`xmodal.losses.normalize`): the norm term needs the teacher's raw length ``||f_t||``.

    Class means ``c`` live in the registered buffer ``class_means`` (``num_classes x teacher_dim``, saved in
    checkpoints) and come from one of two sources:

    * ``class_means_path``: a file computed offline over the training set, as the paper does: ``.pt``/``.pth``
      (a ``num_classes x teacher_dim`` tensor), ``.npy``, or ``.json`` (``{"<label>": [floats]}``, the format of
      the official code). The buffer is then fixed.
    * otherwise, accumulated during training from the teacher's embeddings and ``batch["label"]``: the exact
      running mean of every sample seen so far (``momentum=None``; the teacher is frozen, so this converges to
      the training-set class mean the paper uses), or an EMA ``c <- momentum * c + (1 - momentum) * batch_mean``.
      Updates happen only in training mode and are summed across processes under ``torch.distributed``. A class
      not seen yet uses the teacher's own embedding as its direction.

    Args:
        student_key: student embedding key, ``B x student_dim``.
        teacher_key: teacher embedding key, ``B x teacher_dim``.
        num_classes: number of classes ``C``.
        teacher_dim: teacher embedding width.
        student_dim: student embedding width; a learned linear projector is added when it differs.
        class_means_path: optional file of class means, see above.
        momentum: ``None`` for the exact running mean, or an EMA momentum in ``[0, 1)``.
        eps: guards divisions by zero norms.
        weight: multiplier in the total loss.
        name: log name; defaults to ``"norm_direction"``.
    """

    class_means: Tensor
    class_counts: Tensor

    def __init__(
        self, student_key: Keys, teacher_key: Keys, num_classes: int, teacher_dim: int, student_dim: int | None = None,
        class_means_path: str | None = None, momentum: float | None = None, eps: float = 1e-8,
        weight: float = 1.0, name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name)
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1) or None, got {momentum}")
        self.projector = make_projector(student_dim, teacher_dim)
        self.num_classes, self.teacher_dim = num_classes, teacher_dim
        self.momentum, self.eps = momentum, eps
        self.fixed = class_means_path is not None
        self.register_buffer("class_means", torch.zeros(num_classes, teacher_dim))
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.long))
        if class_means_path is not None:
            means, present = load_class_means(class_means_path, num_classes, teacher_dim)
            self.class_means.copy_(means)
            self.class_counts.copy_(present.long())

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        if s.dim() != 2 or t.dim() != 2:
            shapes = f"{tuple(s.shape)} and {tuple(t.shape)}"
            raise ValueError(f"loss {self.name!r} works on pooled embeddings B x D, got {shapes}")
        labels = hard_labels(batch, s.shape[0], self.name)
        s = self.projector(s.float())
        t = t.detach().float()
        if self.training and not self.fixed:
            self.update_means(t, labels)
        seen = (self.class_counts[labels] > 0).unsqueeze(1)
        centres = torch.where(seen, self.class_means[labels].to(t.dtype), t)
        direction = F.normalize(centres, dim=-1, eps=self.eps)
        longest = torch.maximum(s.norm(dim=-1), t.norm(dim=-1)).clamp_min(self.eps)
        return (1 - (s * direction).sum(dim=-1) / longest).mean()

    @torch.no_grad()
    def update_means(self, t: Tensor, labels: Tensor) -> None:
        """Fold a batch of teacher embeddings ``B x D`` with labels ``B`` into ``class_means``."""
        sums = torch.zeros_like(self.class_means, dtype=torch.float32).index_add_(0, labels, t.float())
        counts = torch.bincount(labels, minlength=self.num_classes)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        present = counts > 0
        batch_means = sums[present] / counts[present].unsqueeze(1)
        old = self.class_means[present].float()
        if self.momentum is None:
            total = (self.class_counts[present] + counts[present]).unsqueeze(1)
            new = old + (batch_means - old) * counts[present].unsqueeze(1) / total
        else:
            first = (self.class_counts[present] == 0).unsqueeze(1)
            new = torch.where(first, batch_means, self.momentum * old + (1 - self.momentum) * batch_means)
        self.class_means[present] = new.to(self.class_means.dtype)
        self.class_counts += counts


def hard_labels(batch: Batch, batch_size: int, loss_name: str) -> Tensor:
    """``batch["label"]`` as a LongTensor ``B``; soft or one-hot labels ``B x C`` are reduced by argmax."""
    label = batch.get("label")
    if not isinstance(label, Tensor):
        raise KeyError(f"loss {loss_name!r} needs class labels in batch['label']")
    label = label.argmax(dim=-1) if label.dim() == 2 else label.reshape(-1)
    if label.shape[0] != batch_size:
        raise ValueError(f"loss {loss_name!r}: {label.shape[0]} labels for a batch of {batch_size}")
    return label.long()


def class_means_from(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class mean of ``features`` (``n x D``) given ``labels`` (``n``); absent classes are zero rows."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype).index_add_(0, labels.long(), features)
    counts = torch.bincount(labels.long(), minlength=num_classes).clamp_min(1)
    return sums / counts.unsqueeze(1).to(features.dtype)


def load_class_means(path: str | Path, num_classes: int, dim: int) -> tuple[Tensor, Tensor]:
    """Read class means from ``.pt``/``.pth``, ``.npy`` or ``.json`` (``{"<label>": [D floats]}``).

    Returns:
        ``(means, present)``: ``num_classes x dim`` float tensor and a ``num_classes`` bool mask of the classes
        the file gives (tensor and array files give every class; rows of zeros count as absent).
    """
    path = Path(path)
    if path.suffix == ".json":
        means = torch.zeros(num_classes, dim)
        present = torch.zeros(num_classes, dtype=torch.bool)
        for key, row in json.loads(path.read_text()).items():
            means[int(key)] = torch.tensor(row, dtype=torch.float32)
            present[int(key)] = True
    else:
        loaded = np.load(path) if path.suffix == ".npy" else torch.load(path, map_location="cpu", weights_only=True)
        means = torch.as_tensor(loaded, dtype=torch.float32)
        present = means.abs().sum(dim=1) > 0 if means.dim() == 2 else torch.zeros(0, dtype=torch.bool)
    if means.shape != (num_classes, dim):
        raise ValueError(f"{path}: class means have shape {tuple(means.shape)}, expected ({num_classes}, {dim})")
    return means, present

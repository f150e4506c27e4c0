"""Losses on features, with an optional learned projector when student and teacher widths differ."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, DistillLoss, Keys


class _FeatureLoss(DistillLoss):
    def __init__(
        self, student_key: Keys, teacher_key: Keys, student_dim: int | None = None, teacher_dim: int | None = None,
        weight: float = 1.0, name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name)
        needs_projector = student_dim is not None and teacher_dim is not None and student_dim != teacher_dim
        self.projector: nn.Module = nn.Linear(student_dim, teacher_dim) if needs_projector else nn.Identity()

    def pair(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        s = self.projector(s.float())
        t = t.float()
        if s.shape != t.shape:
            raise ValueError(
                f"loss {self.name!r}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
                "set student_dim and teacher_dim to learn a projector"
            )
        return s, t


class FeatureMSELoss(_FeatureLoss):
    """Mean squared error between (projected) student features and teacher features, any shape ``B x ... x D``."""

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        s, t = self.pair(s, t)
        return F.mse_loss(s, t)


class FeatureCosineLoss(_FeatureLoss):
    """``1 - cos(s, t)`` along the last dimension, averaged over all other positions."""

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        s, t = self.pair(s, t)
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()

"""Contrastive losses over image-text batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.contracts import Batch, DistillLoss, Keys


def clip_logits(image: Tensor, text: Tensor, scale: Tensor | float) -> Tensor:
    """``scale * image @ text.T`` for L2-normalised ``B x D`` embeddings: ``B x B`` image-to-text logits."""
    return scale * image.float() @ text.float().t()


class CLIPContrastiveLoss(DistillLoss):
    """Symmetric InfoNCE (the CLIP loss) on the student's own image/text embeddings.

    Reads ``student_key = ["image.emb", "text.emb", "logit_scale"]`` by default; pair ``i`` is the positive.
    ``loss = (CE(logits, arange) + CE(logits.T, arange)) / 2`` with ``logits = scale * I @ T.T``.
    """

    def __init__(
        self, student_key: Keys = ("image.emb", "text.emb", "logit_scale"), weight: float = 1.0,
        name: str | None = None, max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__(list(student_key) if not isinstance(student_key, str) else student_key, None, weight,
                         name or "clip")
        self.max_logit_scale = max_logit_scale

    def forward(self, s: tuple[Tensor, ...], t: None, batch: Batch) -> Tensor:
        image, text, scale = s
        logits = clip_logits(image, text, scale.clamp(max=self.max_logit_scale))
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2

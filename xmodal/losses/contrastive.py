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


def soft_cross_entropy(target_logits: Tensor, logits: Tensor) -> Tensor:
    """``-sum softmax(target) * log_softmax(logits)`` over the last dim, averaged over rows."""
    return -(F.softmax(target_logits, -1) * F.log_softmax(logits, -1)).sum(-1).mean()


class AffinityMimicLoss(DistillLoss):
    """TinyCLIP affinity mimicking: match the student's in-batch image-text affinities to the teacher's.

    With ``A = softmax(scale * I @ T.T)`` by rows (image->text) and by columns (text->image), the loss is the
    soft cross-entropy ``-sum A_t log A_s`` averaged over both directions. Each model uses its own logit scale
    (read from its ``logit_scale`` output) unless ``temperature`` fixes one for both (``scale = 1 / temperature``).
    """

    def __init__(
        self, student_key: Keys = ("image.emb", "text.emb", "logit_scale"),
        teacher_key: Keys = ("image.emb", "text.emb", "logit_scale"), temperature: float | None = None,
        weight: float = 1.0, name: str | None = None,
    ) -> None:
        super().__init__(list(student_key), list(teacher_key), weight, name or "affinity")
        self.temperature = temperature

    def forward(self, s: tuple[Tensor, ...], t: tuple[Tensor, ...], batch: Batch) -> Tensor:
        s_scale, t_scale = (s[2], t[2]) if self.temperature is None else (1 / self.temperature,) * 2
        student = clip_logits(s[0], s[1], s_scale)
        teacher = clip_logits(t[0], t[1], t_scale)
        return (soft_cross_entropy(teacher, student) + soft_cross_entropy(teacher.t(), student.t())) / 2

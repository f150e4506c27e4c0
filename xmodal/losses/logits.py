"""Losses on class logits."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from xmodal.contracts import Batch, DistillLoss, Keys


class KLDivLoss(DistillLoss):
    """Hinton KD: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch.

    ``s``, ``t``: logits ``B x C`` (or ``B x ... x C``; leading dims are flattened into the batch).
    """

    def __init__(
        self, student_key: Keys, teacher_key: Keys, temperature: float = 1.0, weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name or "kl")
        self.temperature = temperature

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        temp = self.temperature
        s = s.float().flatten(0, -2) / temp
        t = t.float().flatten(0, -2) / temp
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
        return kl * temp**2

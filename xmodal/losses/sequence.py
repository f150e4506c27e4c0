"""Losses between sequences that run at different rates (video frames vs audio frames, text steps...)."""

from __future__ import annotations

import torch
from torch import Tensor

from xmodal.contracts import Batch, DistillLoss, Keys
from xmodal.losses.features import make_projector


def resample_to(features: Tensor, source_lengths: Tensor, target_lengths: Tensor, target_steps: int) -> Tensor:
    """Linearly resample each sequence's valid part to the target length, by centre-aligned positions.

    Args:
        features: ``B x S x D`` source features (padding beyond ``source_lengths`` is ignored).
        source_lengths: ``B`` valid source steps. target_lengths: ``B`` valid target steps.
        target_steps: ``T``, the padded target length.

    Returns:
        ``B x T x D``; step ``j < target_lengths[b]`` samples the source at ``(j + 0.5) * S_b / T_b - 0.5``.
    """
    b, _, d = features.shape
    steps = torch.arange(target_steps, device=features.device, dtype=torch.float32)[None, :]
    src = source_lengths.float().clamp(min=1)[:, None]
    tgt = target_lengths.float().clamp(min=1)[:, None]
    position = ((steps + 0.5) * src / tgt - 0.5).clamp(min=0)
    position = torch.minimum(position, src - 1)
    low = position.floor().long()
    high = torch.minimum(low + 1, (src - 1).long())
    frac = (position - low.float())[..., None]
    gather = lambda index: features.gather(1, index[..., None].expand(b, target_steps, d))  # noqa: E731
    return gather(low) * (1 - frac) + gather(high) * frac


class TimeAlignedMSELoss(DistillLoss):
    """MSE between student features and teacher features resampled to the student's time axis.

    Reads ``student_key = [features B x Ts x Ds, mask B x Ts]`` and ``teacher_key = [features B x Tt x Dt,
    mask B x Tt]`` (masks: True = valid). Student features go through a learned linear projector when
    ``student_dim != teacher_dim``. The squared error is averaged over valid student steps and channels.
    """

    def __init__(
        self, student_key: Keys = ("video.feat", "video.mask"), teacher_key: Keys = ("audio.feat", "audio.mask"),
        student_dim: int | None = None, teacher_dim: int | None = None, weight: float = 1.0, name: str | None = None,
    ) -> None:
        super().__init__(list(student_key), list(teacher_key), weight, name)
        self.projector = make_projector(student_dim, teacher_dim)

    def forward(self, s: tuple[Tensor, Tensor], t: tuple[Tensor, Tensor], batch: Batch) -> Tensor:
        (s_feat, s_mask), (t_feat, t_mask) = s, t
        s_feat = self.projector(s_feat.float())
        target = resample_to(t_feat.float(), t_mask.sum(1), s_mask.sum(1), s_feat.shape[1])
        valid = s_mask[..., None].float()
        return ((s_feat - target) ** 2 * valid).sum() / (valid.sum() * s_feat.shape[-1]).clamp(min=1)

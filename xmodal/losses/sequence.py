"""Losses between sequences that run at different rates (video frames vs audio frames, text steps...)."""

from __future__ import annotations

from torch import Tensor

from xmodal.contracts import Batch, DistillLoss, Keys
from xmodal.losses.features import make_projector
from xmodal.losses.normalize import NormOption, target_norm
from xmodal.modalities.audio import resample_to


class TimeAlignedMSELoss(DistillLoss):
    """MSE between student features and teacher features resampled to the student's time axis.

    Reads ``student_key = [features B x Ts x Ds, mask B x Ts]`` and ``teacher_key = [features B x Tt x Dt,
    mask B x Tt]`` (masks: True = valid). Student features go through a learned linear projector when
    ``student_dim != teacher_dim``. The squared error is averaged over valid student steps and channels.

    ``normalize`` (:mod:`xmodal.losses.normalize`) defaults to ``"none"``: cross-modal frame regression (e.g.
    LIBS, arXiv 1911.11502) uses raw teacher features; masked positions stay out of running statistics.
    """

    def __init__(
        self, student_key: Keys = ("video.feat", "video.mask"), teacher_key: Keys = ("audio.feat", "audio.mask"),
        student_dim: int | None = None, teacher_dim: int | None = None, weight: float = 1.0, name: str | None = None,
        normalize: NormOption = "none",
    ) -> None:
        super().__init__(list(student_key), list(teacher_key), weight, name)
        self.projector = make_projector(student_dim, teacher_dim)
        self.target_norm = target_norm(normalize, teacher_key)

    def forward(self, s: tuple[Tensor, Tensor], t: tuple[Tensor, Tensor], batch: Batch) -> Tensor:
        (s_feat, s_mask), (t_feat, t_mask) = s, t
        s_feat = self.target_norm.student(self.projector(s_feat.float()))
        t_feat = self.target_norm.teacher(t_feat.float(), t_mask)
        target = resample_to(t_feat, t_mask.sum(1), s_mask.sum(1), s_feat.shape[1])
        valid = s_mask[..., None].float()
        return ((s_feat - target) ** 2 * valid).sum() / (valid.sum() * s_feat.shape[-1]).clamp(min=1)

"""Losses on features, with an optional learned projector when student and teacher widths differ."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, DistillLoss, Keys
from xmodal.losses.normalize import NormOption, target_norm


def make_projector(student_dim: int | None, teacher_dim: int | None) -> nn.Module:
    """A learned linear map from the student's width to the teacher's, or the identity when none is needed."""
    if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
        return nn.Linear(student_dim, teacher_dim)
    return nn.Identity()


class _FeatureLoss(DistillLoss):
    def __init__(
        self, student_key: Keys, teacher_key: Keys, student_dim: int | None = None, teacher_dim: int | None = None,
        weight: float = 1.0, name: str | None = None, normalize: NormOption = "none",
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name)
        self.projector = make_projector(student_dim, teacher_dim)
        self.target_norm = target_norm(normalize, teacher_key)

    def pair(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        s = self.target_norm.student(self.projector(s.float()))
        t = self.target_norm.teacher(t.detach().float())
        if s.shape != t.shape:
            raise ValueError(
                f"loss {self.name!r}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
                "set student_dim and teacher_dim to learn a projector"
            )
        return s, t


class FeatureMSELoss(_FeatureLoss):
    """Mean squared error between (projected) student features and teacher features, any shape ``B x ... x D``.

    ``normalize`` (:mod:`xmodal.losses.normalize`) defaults to ``"none"``: FitNets (Romero et al., ICLR 2015)
    regresses raw hints; ``"layernorm"`` is feature distillation's whitening (Wei et al., arXiv 2205.14141).
    """

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        s, t = self.pair(s, t)
        return F.mse_loss(s, t)


class FeatureCosineLoss(_FeatureLoss):
    """``1 - cos(s, t)`` along the last dimension, averaged over all other positions.

    ``normalize`` defaults to ``"none"``: the cosine already ignores each vector's scale (``"l2"`` changes
    nothing); ``"standardize"`` removes the teacher's constant mean direction first.
    """

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        s, t = self.pair(s, t)
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def to_tokens(x: Tensor) -> Tensor:
    """Any feature layout as a token sequence ``B x N x D``.

    Args:
        x: vectors ``B x D`` (one token each), tokens ``B x N x D`` (unchanged) or a CNN map ``B x C x H x W``
            (``N = H * W`` tokens of width ``C``, row-major).

    Returns:
        ``B x N x D`` tokens.
    """
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    raise ValueError(f"expected B x D, B x N x D or B x C x H x W features, got shape {tuple(x.shape)}")


def pool_features(x: Tensor) -> Tensor:
    """Global average pooling of any feature layout into one ``B x D`` vector per sample (see :func:`to_tokens`)."""
    return to_tokens(x).mean(dim=1)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Pick tokens per sample: ``out[b, k] = x[b, index[b, k]]``.

    Args:
        x: tokens ``B x N x D``.
        index: LongTensor ``B x K`` of positions in ``[0, N)``.

    Returns:
        ``B x K x D``.
    """
    if index.dim() != 2 or index.shape[0] != x.shape[0]:
        raise ValueError(f"index {tuple(index.shape)} must be B x K for tokens {tuple(x.shape)}")
    return x.gather(1, index.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))

"""Linear centred kernel alignment (CKA): a similarity of representations that ignores width, rotation and scale.

Reference: Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019
(arXiv 1905.00414). OFA-KD (arXiv 2310.19444) uses it to show how far apart heterogeneous teachers and
students are.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from xmodal.contracts import Batch, DistillLoss, Keys, key_list
from xmodal.losses.features import pool_features, to_tokens
from xmodal.losses.normalize import NormOption, TargetNorm, target_norms

Flatten = Literal["features", "tokens", "pool"]


def linear_cka(x: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    """Linear CKA between two sets of features of the same ``n`` examples.

    With column-centred ``X`` (``n x p``) and ``Y`` (``n x q``)::

        CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)

    which equals ``<X X^T, Y Y^T>_F / (||X X^T||_F * ||Y Y^T||_F)``; the cheaper of the two forms is used
    (``p x q`` cross-covariance when ``p * q <= n^2``, else ``n x n`` Gram matrices). Both inputs are first
    divided by their Frobenius norm, which CKA ignores, so tiny or huge activations stay well conditioned.

    Args:
        x: ``n x p`` features.
        y: ``n x q`` features (``q`` may differ from ``p``).
        eps: guards the division when a representation is constant (CKA is then 0).

    Returns:
        Scalar in ``[0, 1]``; 1 when ``y`` is an orthogonal transform of ``x`` times a scalar. Computed in at least
        float32, with autocast off.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs n x p and n x q matrices, got {tuple(x.shape)} and {tuple(y.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):  # sums of squared products need fp32
        return _linear_cka(x, y, eps)


def _linear_cka(x: Tensor, y: Tensor, eps: float) -> Tensor:
    x = _centre_unit(x, eps)
    y = _centre_unit(y, eps)
    n = x.shape[0]
    if x.shape[1] * y.shape[1] <= n * n:
        cross = (y.T @ x).square().sum()
        xx = (x.T @ x).square().sum()
        yy = (y.T @ y).square().sum()
    else:
        gram_x, gram_y = x @ x.T, y @ y.T
        cross = (gram_x * gram_y).sum()
        xx, yy = gram_x.square().sum(), gram_y.square().sum()
    return cross / torch.sqrt(xx * yy + eps)


def _centre_unit(x: Tensor, eps: float) -> Tensor:
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    x = x - x.mean(dim=0, keepdim=True)
    return x / x.norm().clamp_min(eps)


def as_matrix(x: Tensor, flatten: Flatten = "features") -> Tensor:
    """Turn a batch of features into the ``n x p`` matrix CKA compares.

    Args:
        x: ``B x D``, tokens ``B x N x D`` or a map ``B x C x H x W``.
        flatten: ``"features"``: one row per sample, everything else flattened (``B x N*D``; works across
            layouts and token counts); ``"tokens"``: one row per token (``B*N x D``; both sides need the same
            ``N``); ``"pool"``: one row per sample after global average pooling (``B x D``).

    Returns:
        A 2-D matrix.
    """
    if flatten == "features":
        return x.flatten(1)
    if flatten == "tokens":
        return to_tokens(x).flatten(0, 1)
    if flatten == "pool":
        return pool_features(x)
    raise ValueError(f"unknown flatten {flatten!r}; use 'features', 'tokens' or 'pool'")


class CKALoss(DistillLoss):
    """``1 - CKA(student, teacher)`` with linear CKA (Kornblith et al., ICML 2019, arXiv 1905.00414).

    No projector is needed: CKA compares ``n x n`` similarity structure, so the widths (and, with
    ``flatten="features"`` or ``"pool"``, the layouts) of student and teacher may differ. With lists of keys the
    pairs are zipped and the loss is the mean over pairs. The teacher side is detached.

    Args:
        student_key: student feature key(s); ``B x D``, ``B x N x D`` or ``B x C x H x W``.
        teacher_key: teacher feature key(s), as many as ``student_key``.
        flatten: how features become a matrix, see :func:`as_matrix`.
        weight: multiplier in the total loss.
        name: log name; defaults to ``"cka"``.
        normalize: target normalisation (:mod:`xmodal.losses.normalize`, one per teacher key);
            default ``"none"``, as Kornblith et al.: CKA already ignores centring and overall scale.
    """

    batch_coupled = True  # CKA compares B x B Gram matrices of the whole batch

    def __init__(
        self, student_key: Keys, teacher_key: Keys, flatten: Flatten = "features", weight: float = 1.0,
        name: str | None = None, normalize: NormOption = "none",
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name)
        as_matrix(torch.zeros(1, 1), flatten)  # validates the choice early
        self.flatten = flatten
        self.target_norms = target_norms(normalize, key_list(teacher_key))

    def forward(self, s: Tensor | tuple[Tensor, ...], t: Tensor | tuple[Tensor, ...], batch: Batch) -> Tensor:
        pairs = _pairs(s, t, self.name)
        losses = [self.pair_loss(a, b.detach(), norm) for (a, b), norm in zip(pairs, self.target_norms, strict=True)]
        return torch.stack(losses).mean()

    def pair_loss(self, s: Tensor, t: Tensor, norm: nn.Module) -> Tensor:
        assert isinstance(norm, TargetNorm)
        return 1 - linear_cka(as_matrix(norm.student(s), self.flatten), as_matrix(norm.teacher(t), self.flatten))


def _pairs(s: Tensor | tuple[Tensor, ...], t: Tensor | tuple[Tensor, ...], name: str) -> list[tuple[Tensor, Tensor]]:
    if isinstance(s, Tensor) and isinstance(t, Tensor):
        return [(s, t)]
    if isinstance(s, tuple) and isinstance(t, tuple) and len(s) == len(t):
        return list(zip(s, t, strict=True))
    raise ValueError(f"loss {name!r}: give student_key and teacher_key both as keys or as lists of equal length")

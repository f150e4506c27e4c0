"""OFA-KD: learnable branches map student intermediate features into logit space, where any teacher can teach.

Reference: Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
Distillation", NeurIPS 2023 (arXiv 2310.19444); official code at github.com/Hao840/OFAKD.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, DistillLoss, Keys, key_list
from xmodal.losses.features import to_tokens
from xmodal.losses.nd import hard_labels

Kind = Literal["map", "tokens", "vector", "logits"]
Formulation = Literal["paper", "code"]
_T = TypeVar("_T")


def ofa_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, gamma: float = 1.0, temperature: float = 1.0,
    formulation: Formulation = "paper",
) -> Tensor:
    """The OFA loss with adaptive target enhancement, averaged over the batch.

    With ``p_s = softmax(z_s / T)``, ``p_t = softmax(z_t / T)`` and label ``y`` (the paper's equation)::

        L = -(1 + p_t[y])^gamma * log p_s[y] - sum_{c != y} p_t[c] * log p_s[c]

    With ``gamma = 1`` this is cross-entropy on the label plus KD on the teacher's soft targets; ``gamma > 1``
    boosts the target term more when the teacher is confident. ``formulation="code"`` follows the official
    implementation instead, whose weights are ``(p_t + onehot(y))^gamma - onehot(y)``: the target weight is
    ``(1 + p_t[y])^gamma - 1`` and the exponent also applies to the non-target probabilities.

    Args:
        student_logits: ``B x C``.
        teacher_logits: ``B x C``; treated as constants.
        labels: LongTensor ``B``.
        gamma: target-enhancement exponent (``--ofa-eps`` in the official code; 1 on CIFAR, 1.5 or so on ImageNet).
        temperature: ``T`` for both softmaxes.
        formulation: ``"paper"`` or ``"code"``, see above.

    Returns:
        Scalar loss.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"OFA: student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    onehot = F.one_hot(labels.long(), p_t.shape[-1]).to(p_t.dtype)
    if formulation == "paper":
        weights = p_t * (1 - onehot) + onehot * (1 + p_t) ** gamma
    elif formulation == "code":
        weights = (p_t + onehot) ** gamma - onehot
    else:
        raise ValueError(f"unknown formulation {formulation!r}; use 'paper' or 'code'")
    return -(weights * log_p_s).sum(dim=-1).mean()


class OFABranch(nn.Module):
    """A small head from one student feature to class logits, shaped by the feature's layout.

    * ``"map"`` (CNN, ``B x C x H x W``): ``depth`` stride-2 depthwise-separable conv blocks that double the
      channels (the last one ends at ``hidden_dim``; with ``depth=0`` a 1x1 conv), global average pool, linear.
    * ``"tokens"`` (``B x N x D``): linear to ``hidden_dim``, ``depth`` pre-norm transformer blocks, layer norm,
      mean over tokens, linear.
    * ``"vector"`` (``B x D``): layer norm, linear, GELU, linear (one linear with ``depth=0``).
    * ``"logits"`` (``B x num_classes``, e.g. the student's own head): identity.

    Args:
        in_dim: channels / width of the feature.
        num_classes: logit width.
        kind: feature layout, see above.
        hidden_dim: width before the classifier; default ``in_dim * 2**depth`` for maps, ``in_dim`` otherwise.
        depth: number of conv / transformer blocks.
        num_heads: attention heads of the token branch (1 if it does not divide ``hidden_dim``).
    """

    def __init__(
        self, in_dim: int, num_classes: int, kind: Kind = "map", hidden_dim: int | None = None, depth: int = 1,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.net: nn.Module
        if kind == "map":
            self.net = _map_branch(in_dim, num_classes, hidden_dim or in_dim * 2**depth, depth)
        elif kind == "tokens":
            self.net = _token_branch(in_dim, num_classes, hidden_dim or in_dim, depth, num_heads)
        elif kind == "vector":
            hidden = hidden_dim or in_dim
            layers = [nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes)]
            self.net = nn.Sequential(*layers) if depth > 0 else nn.Linear(in_dim, num_classes)
        elif kind == "logits":
            if in_dim != num_classes:
                raise ValueError(f"a 'logits' branch needs in_dim == num_classes, got {in_dim} and {num_classes}")
            self.net = nn.Identity()
        else:
            raise ValueError(f"unknown branch kind {kind!r}; use 'map', 'tokens', 'vector' or 'logits'")

    def forward(self, x: Tensor) -> Tensor:
        """``x``: the feature in the layout of ``kind``; returns logits ``B x num_classes``."""
        expected = {"map": 4, "tokens": 3, "vector": 2, "logits": 2}[self.kind]
        if x.dim() != expected:
            raise ValueError(f"OFA branch of kind {self.kind!r} expects a {expected}-D feature, got {tuple(x.shape)}")
        return self.net(x)


def _sep_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=1, groups=in_ch, bias=False), nn.BatchNorm2d(in_ch),
        nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
    )


def _map_branch(in_dim: int, num_classes: int, hidden: int, depth: int) -> nn.Sequential:
    widths = [in_dim * 2**i for i in range(depth)] + [hidden]
    blocks: list[nn.Module] = [_sep_conv(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    if depth == 0:
        blocks = [nn.Conv2d(in_dim, hidden, 1)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes))


class _MeanTokens(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return to_tokens(x).mean(dim=1)


def _token_branch(in_dim: int, num_classes: int, hidden: int, depth: int, num_heads: int) -> nn.Sequential:
    heads = num_heads if hidden % num_heads == 0 else 1
    blocks = [
        nn.TransformerEncoderLayer(
            hidden, heads, dim_feedforward=4 * hidden, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )
        for _ in range(depth)
    ]
    return nn.Sequential(
        nn.Linear(in_dim, hidden), *blocks, nn.LayerNorm(hidden), _MeanTokens(), nn.Linear(hidden, num_classes)
    )


class OFALoss(DistillLoss):
    """OFA-KD (Hao et al., NeurIPS 2023, arXiv 2310.19444): one learnable branch per student feature maps it to
    logits, and each branch's logits learn from the teacher's logits through :func:`ofa_loss`.

    The branches belong to the loss, so they train with the student and are dropped at export. As in the
    official code the per-branch losses are summed (``reduction="sum"``); to also apply the loss to the
    student's final logits, add that key with ``kind="logits"`` (or use a second ``OFALoss`` with its own weight).
    It takes no ``normalize`` (:mod:`xmodal.losses.normalize`): its targets are logits, scaled by the temperature.

    Args:
        student_key: student feature key(s), one branch each.
        teacher_key: the teacher's logits key (``B x num_classes``).
        num_classes: number of classes.
        student_dims: channel / width of each student feature (an int applies to every key).
        kinds: layout of each feature (``"map"``, ``"tokens"``, ``"vector"``, ``"logits"``), one or per key.
        gamma: target-enhancement exponent, one or per key.
        temperature: softmax temperature of both sides.
        hidden_dim: branch width, see :class:`OFABranch`.
        depth: blocks per branch, see :class:`OFABranch`.
        num_heads: attention heads of token branches.
        reduction: ``"sum"`` or ``"mean"`` over branches.
        formulation: ``"paper"`` (the paper's equation) or ``"code"`` (the official implementation), see
            :func:`ofa_loss`.
        weight: multiplier in the total loss.
        name: log name; defaults to ``"ofa"``.
    """

    def __init__(
        self, student_key: Keys, teacher_key: str, num_classes: int, student_dims: int | list[int],
        kinds: Kind | list[Kind] = "map", gamma: float | list[float] = 1.0, temperature: float = 1.0,
        hidden_dim: int | None = None, depth: int = 1, num_heads: int = 4, reduction: Literal["sum", "mean"] = "sum",
        formulation: Formulation = "paper", weight: float = 1.0, name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name)
        if not isinstance(teacher_key, str):
            raise ValueError("OFALoss reads one teacher key: the teacher's logits")
        if reduction not in ("sum", "mean") or formulation not in ("paper", "code"):
            raise ValueError(f"bad reduction {reduction!r} or formulation {formulation!r}")
        n = len(key_list(student_key))
        dims: list[int] = _per_key(student_dims, n, "student_dims")
        kind_list: list[Kind] = _per_key(kinds, n, "kinds")
        self.gammas = [float(g) for g in _per_key(gamma, n, "gamma")]
        self.branches = nn.ModuleList(
            OFABranch(d, num_classes, k, hidden_dim, depth, num_heads) for d, k in zip(dims, kind_list, strict=True)
        )
        self.num_classes, self.temperature = num_classes, temperature
        self.reduction, self.formulation = reduction, formulation

    def forward(self, s: Tensor | tuple[Tensor, ...], t: Tensor, batch: Batch) -> Tensor:
        feats = s if isinstance(s, tuple) else (s,)
        if t.shape[-1] != self.num_classes:
            raise ValueError(f"loss {self.name!r}: teacher logits have {t.shape[-1]} classes, not {self.num_classes}")
        labels = hard_labels(batch, t.shape[0], self.name)
        losses = [
            ofa_loss(branch(f.float()), t, labels, g, self.temperature, self.formulation)
            for branch, f, g in zip(self.branches, feats, self.gammas, strict=True)
        ]
        total = torch.stack(losses)
        return total.sum() if self.reduction == "sum" else total.mean()


def _per_key(value: _T | Sequence[_T], n: int, what: str) -> list[_T]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [value] * n  # type: ignore[list-item]
    if len(value) != n:
        raise ValueError(f"{what} has {len(value)} entries for {n} student keys")
    return list(value)

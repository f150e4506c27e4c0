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

    batch_coupled = True  # every sample's negatives are the other samples of the batch

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

    batch_coupled = True  # affinities are softmaxes over the other samples of the batch

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
        teacher = clip_logits(t[0], t[1], t_scale).detach()  # only read: no gradient into the teacher
        return (soft_cross_entropy(teacher, student) + soft_cross_entropy(teacher.t(), student.t())) / 2


def hard_negative_candidates(teacher_logits: Tensor, num_negatives: int) -> Tensor:
    """Per query, the positive and the teacher's ``k`` highest-scoring negatives.

    Args:
        teacher_logits: ``B x B`` scores, query ``i`` in row ``i``, its positive on the diagonal.
        num_negatives: ``k``; clamped to ``B - 1``.

    Returns:
        long ``B x (k + 1)`` column indices: column 0 is ``i`` (the positive), then the negatives by decreasing
        teacher score.
    """
    b = teacher_logits.shape[0]
    k = max(0, min(num_negatives, b - 1))
    eye = torch.eye(b, dtype=torch.bool, device=teacher_logits.device)
    negatives = teacher_logits.detach().masked_fill(eye, float("-inf")).topk(k, dim=-1).indices
    positives = torch.arange(b, device=teacher_logits.device)[:, None]
    return torch.cat([positives, negatives], dim=-1)


def dcd_terms(
    student_logits: Tensor, teacher_logits: Tensor, num_negatives: int, weight_temperature: float | None = 1.0,
    kd_temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """The two DCD terms for one retrieval direction (rows are queries); see :class:`DCDLoss` for the equations.

    Args:
        student_logits: ``B x B`` student scores (scaled similarities), positives on the diagonal.
        teacher_logits: ``B x B`` teacher scores; only read, never differentiated.
        num_negatives: ``k`` hard negatives per query, picked by the teacher.
        weight_temperature: ``tau_w`` of the dynamic weights; ``None`` gives uniform weights.
        kd_temperature: ``tau`` of the KL term.

    Returns:
        ``(weighted contrastive loss, KL term)``, two scalars.
    """
    teacher_logits = teacher_logits.detach().float()
    cand = hard_negative_candidates(teacher_logits, num_negatives)
    s = student_logits.float().gather(1, cand)  # B x (k+1), positive in column 0
    t = teacher_logits.gather(1, cand)
    student_ce = -F.log_softmax(s, -1)[:, 0]
    teacher_ce = -F.log_softmax(t, -1)[:, 0]
    if weight_temperature is None:
        weights = torch.ones_like(student_ce)
    else:
        gap = (student_ce - teacher_ce).detach()
        weights = gap.numel() * F.softmax(gap / weight_temperature, dim=0)
    contrastive = (weights * student_ce).mean()
    log_p_t = F.log_softmax(t / kd_temperature, -1)
    log_p_s = F.log_softmax(s / kd_temperature, -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * kd_temperature**2
    return contrastive, kl


class DCDLoss(DistillLoss):
    """Dynamic contrastive distillation (DCD, Rao et al., arXiv 2207.01426) for image-text retrieval.

    For each direction (image->text on the rows of ``S``/``T``, text->image on their transposes), with
    ``S = s_scale * I_s @ T_s.T`` and ``T = t_scale * I_t @ T_t.T`` (``B x B``, pair ``i`` positive):

    1. *Teacher-mined hard negatives.* ``C_i = [i] + topk_{j != i} T_ij`` (``k = num_negatives``), so the student's
       contrastive loss runs over the positive and the ``k`` negatives the teacher finds hardest.
    2. *Student contrastive loss over the candidates.* ``l^s_i = -log softmax(S_{i, C_i})_0`` and likewise the
       teacher's ``l^t_i`` on ``T``.
    3. *Dynamic weights.* A pair is weighted by how much harder it is for the student than for the teacher:
       ``w_i = B * softmax_i((l^s_i - l^t_i) / tau_w)`` (stop-gradient; mean weight 1; ``tau_w -> inf`` or
       ``weight_temperature=None`` gives uniform weights). Pairs the teacher already solves but the student does
       not get more weight; pairs that are hard for both (noisy or ambiguous) are not over-weighted.
    4. *Score distillation.* ``KL_i = tau^2 * KL(softmax(T_{i,C_i} / tau) || softmax(S_{i,C_i} / tau))`` over the
       same candidates.

    ``loss = 1/2 * sum_{directions} [ mean_i(w_i l^s_i) + kl_weight * mean_i(KL_i) ]``.

    The paper's exact weighting function is not reproduced (no public code; the formula above follows its
    description: weights from the student's difficulty relative to the teacher's). Each model uses its own logit
    scale (its ``logit_scale`` output) unless ``temperature`` fixes ``scale = 1 / temperature`` for both.

    Args:
        student_key: student's ``image.emb``, ``text.emb`` (L2-normalised ``B x D``) and ``logit_scale``.
        teacher_key: the teacher's, same layout (the embedding widths may differ from the student's).
        num_negatives: ``k`` hard negatives per query.
        weight_temperature: ``tau_w``; ``None`` turns the dynamic weights off.
        kd_temperature: ``tau`` of the KL term.
        kl_weight: weight of the KL term inside this loss.
        temperature: fixed temperature for both models instead of their logit scales.
    """

    batch_coupled = True  # in-batch contrastive terms and batch-normalised weights

    def __init__(
        self, student_key: Keys = ("image.emb", "text.emb", "logit_scale"),
        teacher_key: Keys = ("image.emb", "text.emb", "logit_scale"), num_negatives: int = 8,
        weight_temperature: float | None = 1.0, kd_temperature: float = 1.0, kl_weight: float = 1.0,
        temperature: float | None = None, max_logit_scale: float = 100.0, weight: float = 1.0, name: str | None = None,
    ) -> None:
        super().__init__(list(student_key), list(teacher_key), weight, name or "dcd")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        self.num_negatives, self.weight_temperature = num_negatives, weight_temperature
        self.kd_temperature, self.kl_weight = kd_temperature, kl_weight
        self.temperature, self.max_logit_scale = temperature, max_logit_scale

    def forward(self, s: tuple[Tensor, ...], t: tuple[Tensor, ...], batch: Batch) -> Tensor:
        s_scale: Tensor | float
        t_scale: Tensor | float
        if self.temperature is None:
            s_scale, t_scale = s[2].clamp(max=self.max_logit_scale), t[2].detach()
        else:
            s_scale = t_scale = 1 / self.temperature
        student = clip_logits(s[0], s[1], s_scale)
        teacher = clip_logits(t[0].detach(), t[1].detach(), t_scale)
        total = student.new_zeros(())
        for s_dir, t_dir in ((student, teacher), (student.t(), teacher.t())):
            con, kl = dcd_terms(s_dir, t_dir, self.num_negatives, self.weight_temperature, self.kd_temperature)
            total = total + (con + self.kl_weight * kl) / 2
        return total

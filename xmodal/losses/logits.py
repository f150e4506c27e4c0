"""Losses on class logits: forward KL (Hinton KD), reverse KL, Jensen-Shannon, DKD and the hard-label cross-entropy.

Every loss here takes logits ``B x C`` (or ``B x ... x C``: the leading dimensions are flattened into ``N`` rows),
softens them with a temperature ``T`` where it has one, and averages over the rows. The teacher's logits are always
detached, so gradients reach only the student even when a teacher tensor carries ``requires_grad``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.contracts import Batch, DistillLoss, Keys


def flat_logits(x: Tensor) -> Tensor:
    """``B x ... x C`` logits as float ``N x C`` rows."""
    return x.float().flatten(0, -2)


def soft_log_probs(s: Tensor, t: Tensor, temperature: float | Tensor) -> tuple[Tensor, Tensor]:
    """Tempered log-probabilities of student and (detached) teacher.

    Args:
        s: student logits ``B x ... x C``.
        t: teacher logits, same shape.
        temperature: softening temperature ``T > 0``, or one per row (``N``) of the flattened logits.

    Returns:
        ``log softmax(s / T)`` and ``log softmax(t / T)``, both ``N x C``; the second carries no gradient.
    """
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape")
    if isinstance(temperature, Tensor):
        temperature = temperature.to(s.device, torch.float32).reshape(-1, 1)
    log_ps = F.log_softmax(flat_logits(s) / temperature, dim=-1)
    log_pt = F.log_softmax(flat_logits(t.detach()) / temperature, dim=-1)
    return log_ps, log_pt


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` for each row of ``N x C`` log-probabilities -> ``N``."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def labels_from(batch: Batch, key: str, rows: int, loss_name: str) -> Tensor:
    """The class labels ``batch[key]`` flattened to ``N`` rows (``long``), with a clear error when absent."""
    if key not in batch:
        raise KeyError(f"loss {loss_name!r} reads class labels from batch[{key!r}], which this batch lacks")
    labels = torch.as_tensor(batch[key]).reshape(-1).long()
    if labels.numel() != rows:
        raise ValueError(f"loss {loss_name!r}: {labels.numel()} labels for {rows} rows of logits")
    return labels


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


class KLDivLoss(DistillLoss):
    """Hinton KD: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch.

    ``s``, ``t``: logits ``B x C`` (or ``B x ... x C``; leading dims are flattened into the batch).
    With ``temperature_key`` set and present in the batch (e.g. ``kd_temperature`` written by
    :class:`~xmodal.losses.augment.MixupKD`), each sample uses its own ``T_i``: ``mean_i T_i^2 KL_i`` (``B x C`` only).
    Reference: Hinton et al., "Distilling the Knowledge in a Neural Network", arXiv:1503.02531.
    """

    def __init__(
        self, student_key: Keys, teacher_key: Keys, temperature: float = 1.0, weight: float = 1.0,
        name: str | None = None, temperature_key: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name or "kl")
        _check_temperature(temperature)
        self.temperature = temperature
        self.temperature_key = temperature_key

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        temperature: float | Tensor = self.temperature
        if self.temperature_key is not None and self.temperature_key in batch:
            temperature = batch[self.temperature_key].float().to(s.device)
        log_ps, log_pt = soft_log_probs(s, t, temperature)
        return (kl_rows(log_pt, log_ps) * torch.as_tensor(temperature, device=s.device).reshape(-1) ** 2).mean()


class ReverseKLLoss(DistillLoss):
    """Reverse KD: ``T^2 * KL(softmax(s / T) || softmax(t / T))``, averaged over rows.

    Mode-seeking: the student is pushed to put its mass where the teacher has mass, and may drop teacher modes.
    ``s``, ``t``: logits ``B x ... x C``.
    Reference: MiniLLM (Gu et al.), arXiv:2306.08543; also compared in SinKD, arXiv:2402.17110.
    """

    def __init__(
        self, student_key: Keys, teacher_key: Keys, temperature: float = 1.0, weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name or "reverse_kl")
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        log_ps, log_pt = soft_log_probs(s, t, self.temperature)
        return kl_rows(log_ps, log_pt).mean() * self.temperature**2


class JSDivLoss(DistillLoss):
    """Jensen-Shannon KD: ``T^2 * (KL(p_t || m) + KL(p_s || m)) / 2`` with ``m = (p_t + p_s) / 2``.

    ``p = softmax(logits / T)``. Symmetric in student and teacher, bounded by ``T^2 log 2``, zero iff the two
    distributions agree. The ``T^2`` factor keeps gradient sizes comparable across temperatures, as in Hinton KD.
    Gradients flow through ``p_s`` in both terms (the mixture depends on the student).
    ``s``, ``t``: logits ``B x ... x C``.
    Reference: Lin, "Divergence measures based on the Shannon entropy" (1991); used for KD in DistiLLM,
    arXiv:2402.03898, and compared in SinKD, arXiv:2402.17110.
    """

    def __init__(
        self, student_key: Keys, teacher_key: Keys, temperature: float = 1.0, weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name or "js")
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        log_ps, log_pt = soft_log_probs(s, t, self.temperature)
        log_m = torch.logaddexp(log_ps, log_pt) - math.log(2.0)
        js = 0.5 * (kl_rows(log_pt, log_m) + kl_rows(log_ps, log_m))
        return js.mean() * self.temperature**2


def dkd_parts(log_ps: Tensor, log_pt: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Target-class and non-target-class KL terms of DKD, per row.

    With ``g`` the label, the binary distributions are ``b = [p_g, 1 - p_g]`` and the non-target distributions
    ``p_hat_c = p_c / (1 - p_g)`` over ``c != g``. Then ``TCKD = KL(b_t || b_s)``, ``NCKD = KL(p_hat_t || p_hat_s)``
    and ``KL(p_t || p_s) = TCKD + (1 - p_t[g]) * NCKD``.

    Args:
        log_ps: student log-probabilities ``N x C``.
        log_pt: teacher log-probabilities ``N x C``.
        labels: target classes ``N``.

    Returns:
        ``(tckd, nckd)``, each ``N``.
    """
    gt = F.one_hot(labels, log_ps.shape[-1]).bool()
    rows, classes = log_ps.shape

    def binary(log_p: Tensor) -> Tensor:  # N x 2: log p_g, log(1 - p_g) = logsumexp over the other classes
        return torch.stack([log_p[gt], log_p[~gt].view(rows, classes - 1).logsumexp(-1)], dim=-1)

    def non_target(log_p: Tensor) -> Tensor:  # N x (C - 1), renormalised over the non-target classes
        return F.log_softmax(log_p[~gt].view(rows, classes - 1), dim=-1)

    tckd = kl_rows(binary(log_pt), binary(log_ps))
    nckd = kl_rows(non_target(log_pt), non_target(log_ps))
    return tckd, nckd


class DKDLoss(DistillLoss):
    """Decoupled KD: ``warmup * T^2 * (alpha * TCKD + beta * NCKD)``, averaged over labelled rows.

    ``TCKD = KL(b_t || b_s)`` on the binary target/non-target probabilities ``b = [p_g, 1 - p_g]`` and
    ``NCKD = KL(p_hat_t || p_hat_s)`` on the distribution over the non-target classes, all from
    ``p = softmax(logits / T)`` and the label ``g = batch[label_key]`` (see :func:`dkd_parts`). Classic KD is
    ``TCKD + (1 - p_t[g]) * NCKD``; DKD frees NCKD from the teacher-confidence factor. Paper defaults: ``alpha=1``,
    ``beta=8``, ``T=4``. Rows whose label is ``ignore_index`` are left out.

    ``warmup = min(1, (n + 1) / warmup_steps)`` where ``n`` counts training forwards (``0`` disables it), the linear
    ramp mdistiller applies over its first 20 epochs; the counter is a buffer, so it is checkpointed, and advances only
    in training mode.

    ``s``, ``t``: logits ``B x ... x C``; ``batch[label_key]``: labels ``B x ...``.
    Reference: Zhao et al., "Decoupled Knowledge Distillation", arXiv:2203.08679.
    """

    step: Tensor

    def __init__(
        self, student_key: Keys, teacher_key: Keys, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
        label_key: str = "label", warmup_steps: int = 0, ignore_index: int = -100, weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name or "dkd")
        _check_temperature(temperature)
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.label_key = label_key
        self.warmup_steps = warmup_steps
        self.ignore_index = ignore_index
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def warmup_factor(self) -> Tensor:
        """The current ramp factor in ``(0, 1]``, as a 0-d tensor."""
        if self.warmup_steps <= 0:
            return torch.ones((), device=self.step.device)
        return ((self.step + 1).float() / self.warmup_steps).clamp(max=1.0)

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        log_ps, log_pt = soft_log_probs(s, t, self.temperature)
        labels = labels_from(batch, self.label_key, log_ps.shape[0], self.name).to(log_ps.device)
        keep = labels != self.ignore_index
        tckd, nckd = dkd_parts(log_ps[keep], log_pt[keep], labels[keep])
        per_row = self.alpha * tckd + self.beta * nckd
        loss = per_row.sum() / keep.sum().clamp(min=1) * self.temperature**2 * self.warmup_factor()
        if self.training:
            self.step += 1
        return loss


class HardLabelLoss(DistillLoss):
    """Cross-entropy of the student's logits against ground-truth labels, the usual CE term beside KD.

    ``loss = sum_i w_i * CE(s_i, y_i) / n`` over the ``n`` rows whose label is not ``ignore_index``, with
    ``CE`` optionally label-smoothed (``(1 - eps) * -log p_y + eps * mean_c -log p_c``) and ``w_i = 1`` unless
    ``sample_weight_key`` names per-sample weights in the batch (``B`` or ``B x ...``, e.g. written there by a
    module that computes KD/CE fusion ratios). The weights are used as given: not normalised, not detached.
    It reads no teacher output (``teacher_key`` is ``None``).

    ``s``: logits ``B x ... x C``; ``batch[label_key]``: labels ``B x ...``.
    Reference: label smoothing from Szegedy et al., arXiv:1512.00567; the CE + KD recipe from arXiv:1503.02531.
    """

    def __init__(
        self, student_key: Keys, label_key: str = "label", label_smoothing: float = 0.0,
        sample_weight_key: str | None = None, ignore_index: int = -100, weight: float = 1.0, name: str | None = None,
    ) -> None:
        super().__init__(student_key, None, weight, name or "hard_label")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_key = label_key
        self.label_smoothing = label_smoothing
        self.sample_weight_key = sample_weight_key
        self.ignore_index = ignore_index

    def forward(self, s: Tensor, t: Tensor | None, batch: Batch) -> Tensor:
        logits = flat_logits(s)
        labels = labels_from(batch, self.label_key, logits.shape[0], self.name).to(logits.device)
        ce = F.cross_entropy(
            logits, labels, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, reduction="none"
        )
        if self.sample_weight_key is not None:
            if self.sample_weight_key not in batch:
                raise KeyError(f"loss {self.name!r} reads sample weights from batch[{self.sample_weight_key!r}]")
            weights = torch.as_tensor(batch[self.sample_weight_key], device=ce.device).float().reshape(-1)
            if weights.numel() != ce.numel():
                raise ValueError(f"loss {self.name!r}: {weights.numel()} sample weights for {ce.numel()} rows")
            ce = ce * weights
        valid = (labels != self.ignore_index).sum().clamp(min=1)
        return ce.sum() / valid


class TokenCrossEntropyLoss(HardLabelLoss):
    """Cross-entropy of token logits ``B x N x V`` against targets ``B x N`` that the model itself produced
    (``-100`` ignored): ``student_key = [audio.token_logits, audio.token_targets]`` (the Whisper adaptation of
    :class:`~xmodal.students.asr.WhisperASR`)."""

    def __init__(
        self, student_key: Keys = ("audio.token_logits", "audio.token_targets"), label_smoothing: float = 0.0,
        weight: float = 1.0, name: str | None = "token_ce",
    ) -> None:
        super().__init__(list(student_key), label_key="token_targets", label_smoothing=label_smoothing,
                         weight=weight, name=name)

    def forward(self, s: tuple[Tensor, Tensor], t: Any, batch: Batch) -> Tensor:  # type: ignore[override]
        logits, targets = s
        return super().forward(logits, None, {self.label_key: targets})

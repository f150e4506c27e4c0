"""TAID: distillation towards a target that moves from the student's own distribution to the teacher's."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from xmodal.contracts import Batch, DistillLoss, Keys
from xmodal.losses.logits import flat_logits, kl_rows


class TAIDLoss(DistillLoss):
    r"""Temporally Adaptive Interpolated Distillation.

    Loss (``s``, ``t``: logits ``B x ... x C``, flattened to ``N x C``; averaged over rows)::

        p_lam = softmax(((1 - lam) * stopgrad(s) + lam * t) / T)
        loss  = T^2 * KL(p_lam || softmax(s / T))

    so at ``lam = 1`` it is Hinton KD, at ``lam = 0`` it is zero, and it is zero whenever ``s == t``. The target has no
    gradient; the student gets one only through ``softmax(s / T)``.

    The interpolation ``lam`` is state, updated once per optimizer step (after the loss of that step is computed, so
    step ``n`` uses ``lam_n``), following Algorithm 1 of the paper and the authors' code (SakanaAI/TAID)::

        J_n     = mean_rows CE(p_lam_n, p_s) = -sum_c p_lam[c] log p_s[c]      (the tracked objective, untempered scale)
        delta_n = (J_{n-1} - J_n) / (J_{n-1} + 1e-12)                         (relative improvement)
        m_n     = beta * m_{n-1} + (1 - beta) * delta_n                       (momentum)
        lam_n+1 = min(lam_end, max(lam_start + (lam_end - lam_start) * min(1, n / total_steps),
                                   lam_n + alpha * sigmoid(m_n) * (1 - lam_n)))

    The first step only records ``J_0``. The linear lower bound is dropped when ``total_steps`` is ``None``;
    with ``adaptive=False`` ``lam`` follows the linear schedule alone. The objective driving the update is the
    cross-entropy ``KL + H(p_lam)``, as in the reference code (the entropy of the target carries no gradient, so the
    training signal is the same); the returned loss is the KL itself.

    The state is made of buffers (``lam``, ``prev_objective``, ``momentum``, ``step``), so it is checkpointed, and is
    updated only in training mode: validation and testing never move it. The Distiller calls a loss once per training
    step; with gradient accumulation set ``accumulate_grad_batches`` to the trainer's value and the objective is
    averaged over the micro-batches of one optimizer step. Under DDP the objective is averaged across ranks so every
    rank holds the same ``lam``. ``current_lambda`` gives ``lam`` for logging.

    Args:
        student_key: student logits key(s).
        teacher_key: teacher logits key(s).
        lambda_start: initial interpolation ``lam_0`` in ``[0, 1)`` (paper: 0.4 by default, 0.2 in some runs).
        lambda_end: upper bound of ``lam`` (paper: 1.0).
        alpha: step size of the adaptive update (paper: 5e-4).
        beta: momentum coefficient (paper: 0.99).
        total_steps: optimizer steps of the run for the linear lower bound, or ``None`` for no bound.
        adaptive: ``False`` follows the linear schedule only (needs ``total_steps``).
        temperature: softening temperature ``T`` of both distributions (paper: 1).
        accumulate_grad_batches: training forwards per optimizer step.
        weight: multiplier in the total loss.
        name: logged name, default ``"taid"``.

    Reference: Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer
    in Language Models", arXiv:2501.16937.
    """

    lam: Tensor
    prev_objective: Tensor
    momentum: Tensor
    step: Tensor
    pending: Tensor

    def __init__(
        self, student_key: Keys, teacher_key: Keys, lambda_start: float = 0.4, lambda_end: float = 1.0,
        alpha: float = 5e-4, beta: float = 0.99, total_steps: int | None = None, adaptive: bool = True,
        temperature: float = 1.0, accumulate_grad_batches: int = 1, weight: float = 1.0, name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name or "taid")
        if not 0.0 <= lambda_start < lambda_end <= 1.0:
            raise ValueError(f"need 0 <= lambda_start < lambda_end <= 1, got {lambda_start}, {lambda_end}")
        if not adaptive and not total_steps:
            raise ValueError("adaptive=False follows the linear schedule, which needs total_steps")
        if temperature <= 0 or accumulate_grad_batches < 1:
            raise ValueError("temperature must be positive and accumulate_grad_batches at least 1")
        self.lambda_start, self.lambda_end = lambda_start, lambda_end
        self.alpha, self.beta = alpha, beta
        self.total_steps = total_steps
        self.adaptive = adaptive
        self.temperature = temperature
        self.accumulate_grad_batches = accumulate_grad_batches
        self.register_buffer("lam", torch.tensor(lambda_start))
        self.register_buffer("prev_objective", torch.tensor(float("inf")))
        self.register_buffer("momentum", torch.zeros(()))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("pending", torch.zeros(()), persistent=False)
        self._micro = 0

    @property
    def current_lambda(self) -> float:
        """The interpolation ``lam`` the next training step will use."""
        return float(self.lam)

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        if s.shape != t.shape:
            raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape")
        z_s, z_t = flat_logits(s), flat_logits(t.detach())
        lam = self.lam.to(z_s.dtype)
        log_target = F.log_softmax(((1 - lam) * z_s.detach() + lam * z_t) / self.temperature, dim=-1)
        log_ps = F.log_softmax(z_s / self.temperature, dim=-1)
        kl = kl_rows(log_target, log_ps).mean()
        if self.training:
            cross_entropy = -(log_target.exp() * log_ps.detach()).sum(-1).mean()
            self._accumulate(cross_entropy)
        return kl * self.temperature**2

    def _accumulate(self, objective: Tensor) -> None:
        self.pending += objective.detach()
        self._micro += 1
        if self._micro < self.accumulate_grad_batches:
            return
        value = self.pending / self._micro
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(value)
            value = value / dist.get_world_size()
        self.update(value)
        self.pending.zero_()
        self._micro = 0

    @torch.no_grad()
    def update(self, objective: Tensor) -> None:
        """Advance ``lam`` by one optimizer step given this step's objective ``J_n`` (see the class docstring)."""
        first = torch.isinf(self.prev_objective)
        relative = (self.prev_objective - objective) / (self.prev_objective + 1e-12)
        momentum = torch.where(first, self.momentum, self.beta * self.momentum + (1 - self.beta) * relative)
        floor = self.linear_floor()
        if self.adaptive:
            proposal = self.lam + self.alpha * torch.sigmoid(momentum) * (1 - self.lam)
            lam = torch.maximum(proposal, floor).clamp(max=self.lambda_end)
        else:
            lam = floor
        self.lam.copy_(torch.where(first, self.lam, lam))
        self.momentum.copy_(momentum)
        self.prev_objective.copy_(objective)
        self.step += 1

    def linear_floor(self) -> Tensor:
        """``lam_start + (lam_end - lam_start) * min(1, n / total_steps)`` at the current step ``n`` (``lam_start``
        when there is no ``total_steps``)."""
        if not self.total_steps:
            return torch.full_like(self.lam, self.lambda_start)
        progress = (self.step.float() / self.total_steps).clamp(max=1.0)
        return self.lambda_start + (self.lambda_end - self.lambda_start) * progress

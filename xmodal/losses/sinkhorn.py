"""SinKD: an entropic optimal-transport (Sinkhorn) distance between student and teacher distributions."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from xmodal.contracts import Batch, DistillLoss, Keys
from xmodal.losses.logits import soft_log_probs


def sinkhorn_plan(cost: Tensor, epsilon: float, iterations: int) -> Tensor:
    """Entropic transport plan between two uniform point sets, by Sinkhorn scaling in the log domain.

    Starts from the Gibbs kernel ``K = exp(-C / epsilon)`` and alternately rescales its rows and columns to the
    uniform marginals ``1 / n`` and ``1 / m``; after the last (column) step the columns are exact.

    Args:
        cost: cost matrix ``n x m``.
        epsilon: entropic regularisation (smaller is closer to exact OT, slower to converge).
        iterations: number of row + column rescalings.

    Returns:
        The plan ``P``, ``n x m``, with total mass 1.
    """
    n, m = cost.shape
    log_p = -cost / epsilon
    for _ in range(iterations):
        log_p = log_p - log_p.logsumexp(dim=1, keepdim=True) - math.log(n)
        log_p = log_p - log_p.logsumexp(dim=0, keepdim=True) - math.log(m)
    return log_p.exp()


def _logsumexp_except_self(x: Tensor) -> Tensor:
    """``y_j = log sum_{k != j} exp(x_k)`` along the last dim, in O(C) with prefix/suffix log-cumsum-exp."""
    pad = torch.full_like(x[..., :1], -math.inf)
    prefix = torch.cat([pad, torch.logcumsumexp(x, dim=-1)[..., :-1]], dim=-1)
    suffix = torch.cat([torch.logcumsumexp(x.flip(-1), dim=-1).flip(-1)[..., 1:], pad], dim=-1)
    return torch.logaddexp(prefix, suffix)


def sinkhorn_discrete(log_a: Tensor, log_b: Tensor, epsilon: float, iterations: int) -> Tensor:
    """Entropic OT cost between histograms over the same classes under the discrete metric ``c(j, k) = [j != k]``.

    The kernel ``K = exp(-c / epsilon) = k 1 1^T + (1 - k) I`` with ``k = exp(-1 / epsilon)`` has structure, so every
    Sinkhorn step (``f = log a - log K e^g``, ``g = log b - log K^T e^f``) costs O(C) instead of O(C^2). The plan is
    ``P = diag(e^f) K diag(e^g)`` and the returned cost ``<P, c>`` is the mass it moves off the diagonal; as
    ``epsilon -> 0`` it tends to the total-variation distance ``0.5 * |a - b|_1``.

    Args:
        log_a: log of the row marginals, ``N x C`` (each row sums to 1 in probability space).
        log_b: log of the column marginals, ``N x C``.
        epsilon: entropic regularisation.
        iterations: number of Sinkhorn steps.

    Returns:
        ``<P_i, c>`` for each row ``i``, shape ``N``.
    """
    log_k = -1.0 / epsilon
    log_1mk = math.log1p(-math.exp(log_k))

    def log_kernel_apply(x: Tensor) -> Tensor:  # log(K e^x); K is symmetric
        return torch.logaddexp(log_k + x.logsumexp(-1, keepdim=True), log_1mk + x)

    g = torch.zeros_like(log_b)
    f = log_a
    for _ in range(iterations):
        f = log_a - log_kernel_apply(g)
        g = log_b - log_kernel_apply(f)
    return (f + log_k + _logsumexp_except_self(g)).exp().sum(-1)


class SinkhornLoss(DistillLoss):
    """SinKD: entropic optimal-transport (Sinkhorn) distance between teacher and student distributions.

    With ``p = softmax(logits / T)`` (``s``, ``t``: logits ``B x ... x C``, flattened to ``N x C`` rows):

    ``mode="batch"`` (the paper's batch-wise form, default): the ``N`` student distributions and the ``N`` teacher
    distributions are two point sets with uniform weights ``1 / N``. The cost is the L1 distance
    ``C_ij = |p_s[i] - p_t[j]|_1`` (``N x N``), the plan ``P`` comes from ``iterations`` Sinkhorn rescalings of
    ``exp(-C / epsilon)`` (:func:`sinkhorn_plan`) and the loss is ``<P, C> = sum_ij P_ij C_ij``. The authors' code
    normalises rows and columns to sum to 1 instead of ``1 / N``, i.e. its value is ``N`` times this one. Quadratic
    in ``N``: for token-level logits every token is a point.

    ``mode="sample"``: one OT problem per row, between the class histograms ``p_t[i]`` and ``p_s[i]`` under the
    discrete ground metric ``[j != k]`` (classes carry no geometry here), see :func:`sinkhorn_discrete`; averaged over
    rows. As ``epsilon -> 0`` it tends to the total-variation distance.

    Neither form is exactly zero when ``s == t`` at ``epsilon > 0`` (the entropic plan spreads some mass off the
    matching); both tend to zero as ``epsilon -> 0`` with enough iterations. The teacher is detached, gradients
    reach the student through the cost and, unrolled, through the Sinkhorn iterations.

    Args:
        student_key: student logits key(s).
        teacher_key: teacher logits key(s).
        epsilon: entropic regularisation (authors' code: 0.1).
        iterations: Sinkhorn iterations (authors' code: 20).
        temperature: softening temperature ``T`` (authors' code: 2).
        mode: ``"batch"`` or ``"sample"``.
        weight: multiplier in the total loss.
        name: logged name, default ``"sinkhorn"``.

    Reference: Cui et al., "Sinkhorn Distance Minimization for Knowledge Distillation", arXiv:2402.17110;
    Cuturi, "Sinkhorn Distances", arXiv:1306.0895.
    """

    batch_coupled = True  # mode="batch" transports between the samples of the batch

    def __init__(
        self, student_key: Keys, teacher_key: Keys, epsilon: float = 0.1, iterations: int = 20,
        temperature: float = 2.0, mode: Literal["batch", "sample"] = "batch", weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name or "sinkhorn")
        if epsilon <= 0 or iterations < 1 or temperature <= 0:
            raise ValueError("epsilon and temperature must be positive and iterations at least 1")
        if mode not in ("batch", "sample"):
            raise ValueError(f"mode must be 'batch' or 'sample', got {mode!r}")
        self.epsilon = epsilon
        self.iterations = iterations
        self.temperature = temperature
        self.mode = mode
        self.batch_coupled = mode == "batch"  # mode="sample" solves one problem per row

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        log_ps, log_pt = soft_log_probs(s, t, self.temperature)
        if self.mode == "sample":
            return sinkhorn_discrete(log_pt, log_ps, self.epsilon, self.iterations).mean()
        p_s, p_t = log_ps.exp(), log_pt.exp()
        cost = torch.cdist(p_s, p_t, p=1)
        plan = sinkhorn_plan(cost, self.epsilon, self.iterations)
        return (plan * cost).sum()


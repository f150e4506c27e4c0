"""The Lagrangian sparsity constraint of CoFi / TinyCLIP automatic weight inheritance.

With ``s`` the student's expected kept fraction of its prunable parameters (``sparsity.expected``, emitted by
:class:`~xmodal.students.autoinherit.MaskedCLIP`) and ``t`` the target kept fraction::

    L = lambda1 (s - t) + lambda2 (s - t)^2

The multipliers ``lambda1, lambda2`` are learnable and *maximised* while everything else minimises ``L``: they pass
through a gradient-reversal function, so one ordinary optimizer does the min-max (CoFi uses a second optimizer with a
negative learning rate instead). Keep weight decay off them in practice if you want pure ascent.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from xmodal.contracts import Batch, DistillLoss


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


def grad_reverse(x: Tensor) -> Tensor:
    """Identity in the forward pass, ``-grad`` in the backward pass."""
    out: Tensor = _GradReverse.apply(x)
    return out


class SparsityLagrangianLoss(DistillLoss):
    """``lambda1 (s - t) + lambda2 (s - t)^2`` with learnable, maximised multipliers.

    Args:
        target: the target kept fraction ``t`` of the prunable parameters (0.5 keeps half).
        warmup_steps: the target moves linearly from 1 (nothing pruned, i.e. sparsity 0) to ``target`` over this
            many training steps (counted by training-mode calls); 0 uses ``target`` from the start.
        student_key: the expected kept fraction's output key.
        weight, name: as every :class:`DistillLoss`.
    """

    def __init__(self, target: float, warmup_steps: int = 0, student_key: str = "sparsity.expected",
                 weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(student_key, None, weight, name)
        if not 0 < target <= 1:
            raise ValueError(f"target kept fraction must be in (0, 1], got {target}")
        self.target = target
        self.warmup_steps = warmup_steps
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        self.step: Tensor
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def current_target(self) -> float:
        """The warmed-up target at the current step."""
        if not self.warmup_steps:
            return self.target
        progress = min(1.0, int(self.step) / self.warmup_steps)
        return 1.0 + (self.target - 1.0) * progress

    def forward(self, s: Tensor, t: Any, batch: Batch) -> Tensor:
        target = self.current_target()
        gap = s - target
        self.last_metrics = {"expected_kept": s.detach(), "target_kept": target}  # logged by the Distiller
        if self.training:
            self.step.add_(1)
        return grad_reverse(self.lambda1) * gap + grad_reverse(self.lambda2) * gap**2

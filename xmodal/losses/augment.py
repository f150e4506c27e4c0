"""Data-side KD tools: device-side batch transforms (mixup, CutMix) and a learned adversarial augmenter (HARD).

Teacher and student read the same ``batch["image"]``, so a transform applied to the batch before the training
step is seen by both, as in MIX-KD. Plug the transforms into training with :class:`xmodal.callbacks.AugmentBatch`
(a Lightning callback that runs them on the device batch), and HARD with :class:`xmodal.callbacks.HARDCallback`.

Keys written by :class:`MixupKD` / :class:`CutMixKD` (``B`` samples)::

    image        mixed images (float)                 label_b      the partner's label, LongTensor B
    mix_lambda   weight of the sample's own label, B  label_soft   lambda * onehot(y) + (1 - lambda) * onehot(y_b),
    kd_temperature  per-sample KD temperature, B      B x C (only with num_classes)
                    (only with temperature)

``label`` is kept, so hard-label losses can use ``lambda * CE(y) + (1 - lambda) * CE(y_b)`` (see
:func:`mixed_cross_entropy`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, to_float_image

LogitsOf = Callable[[Tensor], Tensor]


class _Mix:
    """Shared logic of :class:`MixupKD` and :class:`CutMixKD`: partner choice, partial mixing, label keys."""

    def __init__(
        self, alpha: float = 1.0, fraction: float = 1.0, num_classes: int | None = None,
        temperature: float | None = None, mixed_temperature: float | None = None, image_key: str = "image",
        label_key: str = "label", seed: int | None = None,
    ) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        self.alpha = alpha
        self.fraction = fraction
        self.num_classes = num_classes
        self.temperature = temperature
        self.mixed_temperature = mixed_temperature
        self.image_key = image_key
        self.label_key = label_key
        self.rng = random.Random(seed)

    def sample_lambda(self) -> float:
        """``lambda ~ Beta(alpha, alpha)``; 1 (no mixing) when ``alpha <= 0``."""
        return self.rng.betavariate(self.alpha, self.alpha) if self.alpha > 0 else 1.0

    def plan(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """A random partner permutation (``n``) and the mask of the ``round(fraction * n)`` samples to mix."""
        perm = torch.tensor(self.rng.sample(range(n), n), device=device, dtype=torch.long)
        chosen = self.rng.sample(range(n), round(self.fraction * n))
        mixed = torch.zeros(n, dtype=torch.bool, device=device)
        mixed[torch.tensor(chosen, dtype=torch.long, device=device)] = True
        return perm, mixed

    def write_labels(self, batch: Batch, perm: Tensor, lam: Tensor, mixed: Tensor) -> None:
        batch["mix_lambda"] = lam
        if self.label_key in batch:
            labels = batch[self.label_key]
            batch["label_b"] = labels[perm]
            if self.num_classes is not None:
                own = F.one_hot(labels, self.num_classes).float()
                batch["label_soft"] = lam[:, None] * own + (1 - lam[:, None]) * own[perm]
        if self.temperature is not None:
            hot = self.mixed_temperature if self.mixed_temperature is not None else self.temperature
            base = torch.full_like(lam, self.temperature)
            batch["kd_temperature"] = torch.where(mixed, torch.full_like(lam, hot), base)


class MixupKD(_Mix):
    """Mixup for distillation: ``x = lambda x_i + (1 - lambda) x_perm(i)`` seen by teacher and student alike.

    MIX-KD's findings are options: ``fraction < 1`` mixes only part of the batch (partial mixup keeps some clean
    samples, since mixup and KD both smooth the targets and too much smoothness hurts the student), and
    ``temperature`` / ``mixed_temperature`` write a per-sample ``kd_temperature`` so that a KD loss can use a lower
    temperature on mixed samples (the teacher's outputs on mixed inputs are already smooth).

    Reference: Choi, Kim, Kim, "Understanding the Role of Mixup in Knowledge Distillation: An Empirical Study",
    WACV 2023 (mixup: Zhang et al., ICLR 2018).

    Args:
        alpha: ``Beta(alpha, alpha)`` parameter of ``lambda`` (one ``lambda`` per batch).
        fraction: share of the batch that is mixed; the others keep ``mix_lambda = 1``.
        num_classes: also write ``label_soft`` (``B x C``) when given.
        temperature: KD temperature of clean samples; with it, ``kd_temperature`` is written.
        mixed_temperature: KD temperature of mixed samples (defaults to ``temperature``).
        image_key, label_key: batch keys of the ``B x C x H x W`` images and ``B`` labels.
        seed: seed of the transform's own random generator (``None``: nondeterministic).
    """

    def __call__(self, batch: Batch) -> Batch:
        x = to_float_image(batch[self.image_key])
        perm, mixed = self.plan(len(x), x.device)
        lam = torch.where(mixed, self.sample_lambda(), 1.0).to(x.dtype)
        batch[self.image_key] = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[perm]
        self.write_labels(batch, perm, lam, mixed)
        return batch


class CutMixKD(_Mix):
    """CutMix for distillation: paste a random box of the partner image; ``lambda`` = the kept area share.

    One box per batch, of area ``(1 - lambda) H W`` for ``lambda ~ Beta(alpha, alpha)``, centred uniformly and
    clipped to the image; ``mix_lambda`` is then recomputed from the clipped box's exact area. Options as in
    :class:`MixupKD`.

    Reference: Choi, Kim, Kim, "Understanding the Role of Mixup in Knowledge Distillation: An Empirical Study",
    WACV 2023 (CutMix: Yun et al., ICCV 2019).
    """

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` of the pasted box."""
        cut = math.sqrt(1.0 - self.sample_lambda())
        h, w = int(height * cut), int(width * cut)
        cy, cx = self.rng.randrange(height), self.rng.randrange(width)
        return max(cy - h // 2, 0), min(cy + h // 2, height), max(cx - w // 2, 0), min(cx + w // 2, width)

    def __call__(self, batch: Batch) -> Batch:
        x = to_float_image(batch[self.image_key])
        perm, mixed = self.plan(len(x), x.device)
        top, bottom, left, right = self.box(x.shape[-2], x.shape[-1])
        inside = torch.zeros(x.shape[-2:], dtype=torch.bool, device=x.device)
        inside[top:bottom, left:right] = True
        paste = mixed[:, None, None, None] & inside
        batch[self.image_key] = torch.where(paste, x[perm], x)
        kept = 1.0 - (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
        lam = torch.where(mixed, kept, 1.0).to(x.dtype)
        self.write_labels(batch, perm, lam, mixed)
        return batch


def mixed_cross_entropy(logits: Tensor, batch: Batch, label_key: str = "label") -> Tensor:
    """``mean_i [lambda_i CE(z_i, y_i) + (1 - lambda_i) CE(z_i, y_b,i)]``; plain CE on unmixed batches."""
    own = F.cross_entropy(logits, batch[label_key], reduction="none")
    if "mix_lambda" not in batch:
        return own.mean()
    lam = batch["mix_lambda"]
    return (lam * own + (1 - lam) * F.cross_entropy(logits, batch["label_b"], reduction="none")).mean()


class HARDAugmenter(nn.Module):
    """The spatial-transformer augmenter of HARD: predicts a per-sample affine warp of the input images.

    A small network reads an average-pooled thumbnail (``pool_size``) of each image plus Gaussian noise
    (``noise_dim``, so the same image can be warped differently) and outputs ``theta = I + strength *
    tanh(raw)`` (``2 x 3``); the warp is applied with ``affine_grid`` / ``grid_sample``. The output layer starts
    at zero, so the augmenter starts as the identity.

    Reference: Nix, Burg, Sinz, Bethge, "HARD: Hard Augmentations for Robust Distillation", arXiv:2305.14890, 2023.

    Args:
        in_channels: image channels.
        hidden_dim: hidden width of the parameter network.
        noise_dim: width of the noise input.
        pool_size: side of the thumbnail the network reads.
        strength: bound on each entry's deviation from the identity.
        padding_mode: ``grid_sample`` padding (``"zeros"``, ``"border"``, ``"reflection"``).
    """

    identity: Tensor

    def __init__(
        self, in_channels: int = 3, hidden_dim: int = 32, noise_dim: int = 8, pool_size: int = 8,
        strength: float = 0.5, padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.strength = strength
        self.padding_mode = padding_mode
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.body = nn.Sequential(nn.Linear(in_channels * pool_size**2 + noise_dim, hidden_dim), nn.ReLU())
        self.head = nn.Linear(hidden_dim, 6)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("identity", torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))

    def theta(self, images: Tensor) -> Tensor:
        """Affine matrices ``B x 2 x 3`` for ``B x C x H x W`` images."""
        noise = torch.randn(len(images), self.noise_dim, device=images.device, dtype=images.dtype)
        raw = self.head(self.body(torch.cat([self.pool(images).flatten(1), noise], dim=1)))
        return self.identity + self.strength * torch.tanh(raw).view(-1, 2, 3)

    def warp(self, images: Tensor, theta: Tensor) -> Tensor:
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, padding_mode=self.padding_mode, align_corners=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.warp(images, self.theta(images))


def disagreement(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))``, averaged over the batch."""
    log_t = F.log_softmax(teacher_logits.float() / temperature, -1)
    log_s = F.log_softmax(student_logits.float() / temperature, -1)
    return temperature**2 * (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def hard_augmenter_loss(
    augmenter: HARDAugmenter, images: Tensor, teacher: LogitsOf, student: LogitsOf, temperature: float = 1.0,
    teacher_consistency: float = 0.0, identity_weight: float = 0.0,
) -> Tensor:
    """The augmenter's objective (minimised): ``-D(x~) + c * KL(T(x) || T(x~)) + w * ||theta - I||^2``.

    ``D(x~)`` is the teacher-student :func:`disagreement` on the warped images ``x~``. The optional second term
    keeps warps under which the teacher's own prediction stays put (so the augmenter cannot win by destroying
    the image); the third keeps warps near the identity. Gradients reach the augmenter through the student and,
    when the teacher is differentiable, through the teacher.
    """
    theta = augmenter.theta(images)
    warped = augmenter.warp(images, theta)
    t_warped = teacher(warped)
    loss = -disagreement(t_warped, student(warped), temperature)
    if teacher_consistency:
        with torch.no_grad():
            t_clean = teacher(images)
        loss = loss + teacher_consistency * disagreement(t_clean, t_warped, temperature)
    if identity_weight:
        loss = loss + identity_weight * (theta - augmenter.identity).pow(2).sum((1, 2)).mean()
    return loss


def hard_update(
    augmenter: HARDAugmenter, optimizer: torch.optim.Optimizer, images: Tensor, teacher: LogitsOf,
    student: LogitsOf, **loss_kwargs: float,
) -> float:
    """One augmenter step on :func:`hard_augmenter_loss`; only the augmenter's parameters get gradients.

    Returns:
        The augmenter loss before the step (minus the disagreement, plus regularisers).
    """
    loss = hard_augmenter_loss(augmenter, images, teacher, student, **loss_kwargs)
    params = [p for p in augmenter.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

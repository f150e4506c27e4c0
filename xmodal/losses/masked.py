"""DMAE-style masked feature distillation: match teacher features on the few patches the student saw.

Reference: Bai et al., "Masked Autoencoders Enable Efficient Knowledge Distillers", CVPR 2023
(arXiv 2208.12256); official code at github.com/UCSC-VLAA/DMAE.

A loss only sees outputs, so DMAE is assembled from pieces a recipe (student / teacher wrapper) uses:

1. :func:`random_patch_mask` draws the visible patch indices (``B x N_vis``) for a batch;
2. the student embeds all patches, keeps the visible ones with :func:`~xmodal.losses.features.gather_tokens`,
   runs its encoder (and optionally an MAE decoder over all patches), and returns ``<m>.tokens``,
   ``<m>.visible_index`` and optionally ``<m>.recon``;
3. the teacher runs only its first few blocks with :func:`partial_forward`, either on all patches (the loss then
   gathers the visible tokens) or, cheaper and as in DMAE, on the same visible patches
   (``teacher_visible_only=True``);
4. :class:`MaskedFeatureLoss` compares the two, and adds pixel reconstruction on the masked patches when the
   student returns ``<m>.recon``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, DistillLoss, Keys, to_float_image
from xmodal.losses.features import gather_tokens, make_projector
from xmodal.losses.normalize import NormMode, NormOption, TargetNorm, target_norm


def random_patch_mask(
    batch_size: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw, per sample, which patches stay visible.

    Args:
        batch_size: ``B``.
        num_patches: ``N`` patches per sample.
        mask_ratio: fraction of patches hidden, in ``[0, 1)``; ``N_vis = max(1, round(N * (1 - mask_ratio)))``
            (so 98% of 196 patches leaves the paper's four).
        generator: optional RNG for reproducible masks.
        device: where the result goes.

    Returns:
        LongTensor ``B x N_vis`` of distinct visible patch indices, sorted ascending in each row.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = max(1, round(num_patches * (1.0 - mask_ratio)))
    rng_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, num_patches, generator=generator, device=rng_device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values.to(device or noise.device)


def visible_mask(visible_index: Tensor, num_patches: int) -> Tensor:
    """Bool ``B x N``, True at the visible patches given by ``visible_index`` (``B x N_vis``)."""
    mask = torch.zeros(visible_index.shape[0], num_patches, dtype=torch.bool, device=visible_index.device)
    return mask.scatter_(1, visible_index.long(), True)


def partial_forward(blocks: Iterable[nn.Module], x: Tensor, depth: int) -> Tensor:
    """Run only the first ``depth`` blocks of a stack (e.g. a ViT teacher's ``blocks``), as DMAE does.

    Args:
        blocks: an ``nn.ModuleList`` / ``nn.Sequential`` / list of blocks, each ``Tensor -> Tensor``.
        x: input of the first block, e.g. tokens ``B x N x D``.
        depth: how many blocks to run, ``0 <= depth <= len(blocks)``.

    Returns:
        The output of block ``depth - 1`` (``x`` itself when ``depth == 0``).
    """
    if depth < 0 or (isinstance(blocks, Sized) and depth > len(blocks)):
        raise ValueError(f"depth {depth} is outside the {len(blocks) if isinstance(blocks, Sized) else '?'} blocks")
    for i, block in enumerate(blocks):
        if i >= depth:
            break
        x = block(x)
    return x


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images ``B x C x H x W`` into ``B x N x (p*p*C)`` patches, row-major over the grid, ``(p, p, C)`` inside
    a patch (the MAE layout), ``N = (H / p) * (W / p)``."""
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not divisible into {patch_size}-pixel patches")
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch_size) * (w // patch_size), patch_size**2 * c)


def reconstruction_loss(pred: Tensor, target: Tensor, visible_index: Tensor, norm_pix: bool = False) -> Tensor:
    """MAE pixel loss: mean over *masked* patches of the per-patch mean squared error.

    Args:
        pred: decoder output for every patch, ``B x N x P``.
        target: patchified pixels ``B x N x P`` (see :func:`patchify`).
        visible_index: ``B x N_vis`` patches the encoder saw (excluded from the loss).
        norm_pix: normalise each target patch to zero mean and unit variance first (MAE's ``norm_pix_loss``).
    """
    if norm_pix:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred.float() - target.float()).square().mean(dim=-1)
    masked = (~visible_mask(visible_index, pred.shape[1])).to(per_patch.dtype)
    return (per_patch * masked).sum() / masked.sum().clamp_min(1.0)


class MaskedFeatureLoss(DistillLoss):
    """DMAE feature distillation (Bai et al., CVPR 2023, arXiv 2208.12256) on the visible tokens, plus optional MAE
    pixel reconstruction::

        L = beta * mean_{visible tokens} ||proj(f_s) - f_t||^2  +  recon_weight * L_pixel(masked patches)

    Student keys, in this order: ``<m>.tokens`` (``B x (P + N_vis) x D_s``: ``P = num_prefix_tokens`` class /
    register tokens first, then the visible patch tokens in the order of the index), ``<m>.visible_index``
    (LongTensor ``B x N_vis``) and, optionally, ``<m>.recon`` (``B x N x p*p*C``, the decoder's prediction for
    every patch; its target is ``batch[image_key]`` cut into ``patch_size`` patches).

    The teacher key gives tokens ``B x (P + N) x D_t`` for all patches (gathered here at the visible indices) or,
    with ``teacher_visible_only=True``, ``B x (P + N_vis) x D_t`` computed on the same visible patches in the same
    order. The learned projector (``student_dim -> teacher_dim``) belongs to the loss; the teacher is detached.

    Args:
        student_key: ``[tokens, visible_index]`` or ``[tokens, visible_index, recon]``.
        teacher_key: teacher token key.
        student_dim: student token width (a linear projector is added when it differs from ``teacher_dim``).
        teacher_dim: teacher token width.
        num_prefix_tokens: leading non-patch tokens on both sides (compared one to one).
        teacher_visible_only: the teacher already ran on the visible patches only.
        normalize: target normalisation (:mod:`xmodal.losses.normalize`) of the gathered tokens; ``True`` is
            ``"l2"``, both sides per token (DMAE does this when it uses projection heads); default ``False``
            (``"none"``): DMAE regresses raw teacher features otherwise.
        criterion: ``"mse"`` or ``"l1"`` for the feature term.
        beta: weight of the feature term.
        recon_weight: weight of the pixel term (used only with a ``recon`` key).
        patch_size: pixel patch size, needed for the pixel term.
        image_key: batch key of the images for the pixel term.
        norm_pix: per-patch normalised pixel targets.
        weight: multiplier in the total loss.
        name: log name; defaults to ``"masked_feature"``.
    """

    def __init__(
        self, student_key: Keys, teacher_key: str, student_dim: int | None = None, teacher_dim: int | None = None,
        num_prefix_tokens: int = 0, teacher_visible_only: bool = False,
        normalize: bool | NormMode | TargetNorm = False,
        criterion: Literal["mse", "l1"] = "mse", beta: float = 1.0, recon_weight: float = 1.0,
        patch_size: int | None = None, image_key: str = "image", norm_pix: bool = False, weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(student_key, teacher_key, weight, name)
        if isinstance(student_key, str) or len(student_key) not in (2, 3):
            raise ValueError("MaskedFeatureLoss needs student_key = [tokens, visible_index] or [..., recon]")
        if criterion not in ("mse", "l1"):
            raise ValueError(f"unknown criterion {criterion!r}; use 'mse' or 'l1'")
        if len(student_key) == 3 and patch_size is None:
            raise ValueError("a recon key needs patch_size for the pixel target")
        self.projector = make_projector(student_dim, teacher_dim)
        self.num_prefix_tokens, self.teacher_visible_only = num_prefix_tokens, teacher_visible_only
        option: NormOption = ("l2" if normalize else "none") if isinstance(normalize, bool) else normalize
        self.target_norm = target_norm(option, teacher_key)
        self.criterion, self.beta = criterion, beta
        self.recon_weight, self.patch_size, self.norm_pix = recon_weight, patch_size, norm_pix
        self.image_key = image_key

    def forward(self, s: tuple[Tensor, ...], t: Tensor, batch: Batch) -> Tensor:
        tokens, index = s[0], s[1].long()
        pred, target = self.projector(tokens.float()), self.teacher_targets(t.detach().float(), index)
        if pred.shape != target.shape:
            raise ValueError(
                f"loss {self.name!r}: student tokens {tuple(pred.shape)} vs teacher {tuple(target.shape)} after "
                "gathering; check num_prefix_tokens, teacher_visible_only, student_dim and teacher_dim"
            )
        pred, target = self.target_norm.student(pred), self.target_norm.teacher(target)
        distance = F.mse_loss if self.criterion == "mse" else F.l1_loss
        loss = self.beta * distance(pred, target)
        if len(s) == 3:
            assert self.patch_size is not None
            pixels = patchify(to_float_image(batch[self.image_key]).float(), self.patch_size)
            loss = loss + self.recon_weight * reconstruction_loss(s[2], pixels, index, self.norm_pix)
        return loss

    def teacher_targets(self, t: Tensor, index: Tensor) -> Tensor:
        """Teacher tokens at the student's positions: prefix tokens, then the visible patches, ``B x (P+N_vis) x D``."""
        if self.teacher_visible_only:
            return t
        prefix, patches = t[:, : self.num_prefix_tokens], t[:, self.num_prefix_tokens :]
        return torch.cat([prefix, gather_tokens(patches, index)], dim=1)

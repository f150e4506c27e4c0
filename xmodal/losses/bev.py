"""BEV detection losses: the CenterPoint task loss and UniDistill's three keypoint distillation losses.

:class:`BEVDetectionLoss` is the detector's own supervised term (no teacher key): a focal loss on class heatmaps
against Gaussians drawn at the ground-truth centres, plus L1 on the 8 regression channels at the centre cells.

UniDistill (Zhou et al., CVPR 2023, arXiv:2303.15083) distils only at 9 BEV keypoints per ground-truth box (the
centre, the 4 corners and the 4 edge midpoints, rotated by the yaw), where both maps are sampled bilinearly:

* :class:`UniDistillFeatureLoss`: squared error of the features at the keypoints;
* :class:`UniDistillRelationLoss`: L1 between the 9 x 9 cosine-similarity matrices of an object's keypoints;
* :class:`UniDistillResponseLoss`: L1 between the heatmap probabilities and between the regression outputs there.

Each is a mean over objects of a mean over that object's 9 keypoints, so every object weighs the same whatever its
size. Boxes come from the batch (``boxes``, ``box_counts``, ``box_labels``); boxes whose centre lies outside the
grid are ignored, keypoints past the border read the border cells. A batch without boxes gives a zero loss that
is still connected to the student's graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, DistillLoss, Keys
from xmodal.losses.normalize import NormOption, target_norm
from xmodal.modalities.bev_nets import REG_CHANNELS, BEVGrid

HEAD_KEYS = ("bev.heatmap", "bev.reg")
# (along the length axis, across it) in half-lengths and half-widths: centre, 4 corners, 4 edge midpoints
KEYPOINT_OFFSETS = ((0, 0), (1, 1), (1, -1), (-1, -1), (-1, 1), (1, 0), (0, -1), (-1, 0), (0, 1))


def valid_boxes(batch: Batch, grid: BEVGrid) -> tuple[Tensor, Tensor, Tensor]:
    """``boxes`` ``B x M x 9``, ``box_labels`` ``B x M`` and a bool ``B x M`` mask of the real boxes (not padding,
    a known class, centre inside the grid)."""
    boxes, labels = batch["boxes"].float(), batch["box_labels"]
    m = boxes.shape[1]
    valid = torch.arange(m, device=boxes.device) < batch["box_counts"].to(boxes.device)[:, None]
    valid &= (labels >= 0) & (labels < grid.num_classes)
    x, y = boxes[..., 0], boxes[..., 1]
    valid &= (x >= grid.x_range[0]) & (x < grid.x_range[1]) & (y >= grid.y_range[0]) & (y < grid.y_range[1])
    return boxes, labels, valid


# --- detection targets and task loss -------------------------------------------------------------------------


def gaussian_radius(length: Tensor, width: Tensor, min_overlap: float = 0.1) -> Tensor:
    """CornerNet's heatmap radius (as CenterPoint uses it): the smallest of three radii by which the corners of a
    ``length x width`` box (in cells) may move while the moved box keeps IoU >= ``min_overlap``."""
    o = min_overlap
    b1 = length + width
    r1 = (b1 + torch.sqrt(b1**2 - 4 * length * width * (1 - o) / (1 + o))) / 2
    b2 = 2 * (length + width)
    r2 = (b2 + torch.sqrt(b2**2 - 16 * (1 - o) * length * width)) / 2
    b3 = -2 * o * (length + width)
    r3 = (b3 + torch.sqrt(b3**2 - 16 * o * (o - 1) * length * width)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


@dataclass
class DetectionTargets:
    """CenterPoint targets: ``heatmap`` ``B x K x H x W`` (Gaussian peaks of exactly 1 at centre cells), ``index``
    ``B x M`` flat centre cell (``row * W + col``), ``mask`` ``B x M`` real boxes, ``reg`` ``B x M x 8``."""

    heatmap: Tensor
    index: Tensor
    mask: Tensor
    reg: Tensor


def encode_targets(batch: Batch, grid: BEVGrid, min_overlap: float = 0.1, min_radius: int = 2) -> DetectionTargets:
    """Heatmap and regression targets on the head's grid from the batch's boxes (vectorised over all boxes)."""
    boxes, labels, mask = valid_boxes(batch, grid)
    b, m = mask.shape
    h, w = grid.out_size
    centre = grid.to_cells(boxes[..., :2], grid.out_cell)  # (col, row), continuous
    cell = torch.floor(centre).long().clamp(min=0)
    cell = torch.minimum(cell, cell.new_tensor([w - 1, h - 1]))
    size = boxes[..., 3:6].clamp(min=1e-3)
    yaw = boxes[..., 6]
    reg = torch.cat([centre - cell, boxes[..., 2:3], size.log(), yaw.sin()[..., None], yaw.cos()[..., None]], -1)
    index = cell[..., 1] * w + cell[..., 0]

    radius = gaussian_radius(size[..., 1] / grid.out_cell, size[..., 0] / grid.out_cell, min_overlap)
    radius = radius.floor().clamp(min=min_radius)[mask]  # N
    sigma = (2 * radius + 1) / 6
    col, row = cell[mask][:, 0], cell[mask][:, 1]
    dcol = torch.arange(w, device=col.device)[None] - col[:, None]  # N x W
    drow = torch.arange(h, device=row.device)[None] - row[:, None]  # N x H
    dist2 = (drow**2)[:, :, None] + (dcol**2)[:, None, :]  # N x H x W
    inside = (drow.abs()[:, :, None] <= radius[:, None, None]) & (dcol.abs()[:, None, :] <= radius[:, None, None])
    peaks = torch.exp(-dist2 / (2 * sigma[:, None, None] ** 2)) * inside
    k = grid.num_classes
    channel = (torch.arange(b, device=mask.device)[:, None] * k + labels.clamp(min=0))[mask]
    heatmap = boxes.new_zeros(b * k, h * w)
    heatmap = heatmap.scatter_reduce(0, channel[:, None].expand(-1, h * w), peaks.flatten(1), "amax")
    return DetectionTargets(heatmap.view(b, k, h, w), index, mask, reg)


def focal_heatmap_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """CenterNet's penalty-reduced focal loss, summed over cells and divided by the number of peaks (at least 1):
    ``-(1 - p)^a log p`` where the target is 1, ``-(1 - t)^b p^a log(1 - p)`` elsewhere."""
    logits = logits.float()
    p = logits.sigmoid()
    pos = target.eq(1).to(p.dtype)
    pos_loss = -F.logsigmoid(logits) * (1 - p) ** alpha * pos
    neg_loss = -F.logsigmoid(-logits) * p**alpha * (1 - target) ** beta * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


class BEVDetectionLoss(DistillLoss):
    """The detector's own CenterPoint loss: ``focal(heatmap) + reg_weight * L1(reg at centre cells)``.

    The L1 is summed over the 8 channels and averaged over boxes. Reads ``student_key = [bev.heatmap, bev.reg]`` and
    the batch's boxes; no teacher. Both parts are logged (``<name>/heatmap``, ``<name>/reg``).

    Args:
        grid: the BEV grid of the student (the same YAML anchor as the model's).
        reg_weight: weight of the regression term (CenterPoint uses 0.25).
        min_overlap, min_radius: Gaussian radius rule (see :func:`gaussian_radius`; radius in output cells).
    """

    def __init__(
        self, grid: BEVGrid | None = None, student_key: Keys = HEAD_KEYS, reg_weight: float = 0.25,
        min_overlap: float = 0.1, min_radius: int = 2, weight: float = 1.0, name: str | None = "detection",
    ) -> None:
        super().__init__(list(student_key), None, weight, name)
        self.grid = BEVGrid.of(grid)
        self.reg_weight = reg_weight
        self.min_overlap, self.min_radius = min_overlap, min_radius
        self.last_metrics: dict[str, Tensor] = {}

    def forward(self, s: tuple[Tensor, Tensor], t: Any, batch: Batch) -> Tensor:
        heatmap, reg = s
        targets = encode_targets(batch, self.grid, self.min_overlap, self.min_radius)
        focal = focal_heatmap_loss(heatmap, targets.heatmap)
        flat = reg.float().flatten(2)  # B x 8 x HW
        pred = flat.gather(2, targets.index[:, None].expand(-1, flat.shape[1], -1)).transpose(1, 2)  # B x M x 8
        l1 = ((pred - targets.reg).abs().sum(-1) * targets.mask).sum() / targets.mask.sum().clamp(min=1)
        self.last_metrics = {"heatmap": focal.detach(), "reg": l1.detach()}
        return focal + self.reg_weight * l1


# --- UniDistill ------------------------------------------------------------------------------------------------


def box_keypoints(boxes: Tensor) -> Tensor:
    """The 9 BEV keypoints of boxes ``... x >=7`` (x, y, z, w, l, h, yaw): ``... x 9 x 2`` metric (x, y).

    Order: centre; corners front-left, front-right, back-right, back-left; then the midpoints of the front, right,
    back and left edges ("front" is +l/2 along the yaw direction, "left" is +w/2 across it).
    """
    offsets = boxes.new_tensor(KEYPOINT_OFFSETS)  # 9 x 2
    along = offsets[:, 0] * boxes[..., 4:5] / 2  # ... x 9
    across = offsets[:, 1] * boxes[..., 3:4] / 2
    cos, sin = boxes[..., 6:7].cos(), boxes[..., 6:7].sin()
    x = boxes[..., 0:1] + along * cos - across * sin
    y = boxes[..., 1:2] + along * sin + across * cos
    return torch.stack([x, y], dim=-1)


def sample_keypoints(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear samples of ``B x C x H x W`` maps at normalised ``B x M x 9 x 2`` points -> ``B x M x 9 x C``.

    Border padding: bilinear weights always sum to 1, so a 1x1 conv commutes with the sampling.
    """
    out = F.grid_sample(maps.float(), points.to(maps.device, torch.float32), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)


class _KeypointLoss(DistillLoss):
    """Shared by the UniDistill losses: the grid and the objects' keypoints in map coordinates."""

    def __init__(self, student_key: Keys, teacher_key: Keys | None, grid: BEVGrid | None, weight: float,
                 name: str | None) -> None:
        super().__init__(student_key, teacher_key if teacher_key is not None else student_key, weight, name)
        self.grid = BEVGrid.of(grid)

    def keypoints(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Normalised keypoints ``B x M x 9 x 2`` of every box slot and the bool ``B x M`` mask of real objects."""
        boxes, _, valid = valid_boxes(batch, self.grid)
        return self.grid.to_normalized(box_keypoints(boxes)), valid

    def pair(self, s: Tensor, t: Tensor, batch: Batch) -> tuple[Tensor, Tensor] | None:
        """Student and teacher samples ``N x 9 x C`` over the ``N`` real objects, or ``None`` when there are none."""
        points, valid = self.keypoints(batch)
        if not bool(valid.any()):
            return None
        return sample_keypoints(s, points)[valid], sample_keypoints(t.detach(), points)[valid]


def _zero(*tensors: Tensor) -> Tensor:
    """A zero that keeps the student's graph (for batches without boxes)."""
    return sum((x.float().sum() * 0.0 for x in tensors), torch.zeros((), device=tensors[0].device))


class UniDistillFeatureLoss(_KeypointLoss):
    """UniDistill feature distillation: mean squared error of BEV features at the 9 keypoints of every object.

    ``loss = mean_objects mean_keypoints mean_channels (A s - t)^2``, with ``A`` the identity or, when
    ``student_channels != teacher_channels``, a learned 1x1 adapter (a linear map on the sampled features, the same
    as a 1x1 conv on the map before sampling, since bilinear weights sum to 1).

    Args:
        student_key, teacher_key: the BEV feature maps (``B x C x H x W``, any resolution over the same grid extent).
        grid: the BEV grid (extent used to place the keypoints).
        student_channels, teacher_channels: set both, when they differ, to learn the adapter.
        normalize: normalisation of the teacher's keypoint features (:mod:`xmodal.losses.normalize`); default
            ``"none"``, as UniDistill's code, which regresses raw BEV features.
    """

    def __init__(
        self, grid: BEVGrid | None = None, student_key: Keys = "bev.feat", teacher_key: Keys | None = None,
        student_channels: int | None = None, teacher_channels: int | None = None, weight: float = 1.0,
        name: str | None = "unidistill_feature", normalize: NormOption = "none",
    ) -> None:
        super().__init__(student_key, teacher_key, grid, weight, name)
        self.target_norm = target_norm(normalize, self.teacher_key)
        self.adapter: nn.Module = nn.Identity()
        if student_channels is not None and teacher_channels is not None and student_channels != teacher_channels:
            self.adapter = nn.Linear(student_channels, teacher_channels)

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        pair = self.pair(s, t, batch)
        if pair is None:
            return _zero(s, *self.adapter.parameters())
        s_pts, t_pts = pair
        s_pts, t_pts = self.target_norm.student(self.adapter(s_pts)), self.target_norm.teacher(t_pts)
        if s_pts.shape != t_pts.shape:
            raise ValueError(f"loss {self.name!r}: student features {s.shape[1]} channels vs teacher {t.shape[1]}; "
                             "set student_channels and teacher_channels to learn a 1x1 adapter")
        return F.mse_loss(s_pts, t_pts)


def keypoint_relations(points: Tensor) -> Tensor:
    """Cosine similarities among each object's keypoint features: ``N x 9 x C`` -> ``N x 9 x 9``."""
    unit = F.normalize(points, dim=-1, eps=1e-6)
    return unit @ unit.transpose(1, 2)


class UniDistillRelationLoss(_KeypointLoss):
    """UniDistill relation distillation: ``mean |R_s - R_t|`` over objects and the 9 x 9 entries, where ``R`` is the
    cosine-similarity matrix among an object's keypoint features. Needs no adapter: ``R`` is 9 x 9 whatever the
    channel counts. ``normalize`` (:mod:`xmodal.losses.normalize`, on the teacher's keypoint features) defaults to
    ``"none"``, as UniDistill: cosines ignore scale (``"l2"`` changes nothing), ``"standardize"`` centres channels.
    """

    def __init__(
        self, grid: BEVGrid | None = None, student_key: Keys = "bev.feat", teacher_key: Keys | None = None,
        weight: float = 1.0, name: str | None = "unidistill_relation", normalize: NormOption = "none",
    ) -> None:
        super().__init__(student_key, teacher_key, grid, weight, name)
        self.target_norm = target_norm(normalize, self.teacher_key)

    def forward(self, s: Tensor, t: Tensor, batch: Batch) -> Tensor:
        pair = self.pair(s, t, batch)
        if pair is None:
            return _zero(s)
        s_pts, t_pts = self.target_norm.student(pair[0]), self.target_norm.teacher(pair[1])
        return F.l1_loss(keypoint_relations(s_pts), keypoint_relations(t_pts))


class UniDistillResponseLoss(_KeypointLoss):
    """UniDistill response distillation: at the keypoints, ``heatmap_weight * mean |sigmoid(H_s) - sigmoid(H_t)|
    + reg_weight * mean |B_s - B_t|`` over objects, keypoints and channels (heatmaps compared as probabilities, so
    confident logits of either sign cannot dominate). Both parts are logged (``<name>/heatmap``, ``<name>/reg``).

    Reads ``[bev.heatmap, bev.reg]`` from both models (same classes and regression layout). It has no
    ``normalize``: its targets are predictions (probabilities and box parameters), not features.
    """

    def __init__(
        self, grid: BEVGrid | None = None, student_key: Keys = HEAD_KEYS, teacher_key: Keys | None = None,
        heatmap_weight: float = 1.0, reg_weight: float = 1.0, weight: float = 1.0,
        name: str | None = "unidistill_response",
    ) -> None:
        super().__init__(list(student_key), list(teacher_key) if teacher_key is not None else None, grid, weight, name)
        self.heatmap_weight, self.reg_weight = heatmap_weight, reg_weight
        self.last_metrics: dict[str, Tensor] = {}

    def forward(self, s: tuple[Tensor, Tensor], t: tuple[Tensor, Tensor], batch: Batch) -> Tensor:
        if s[1].shape[1] != REG_CHANNELS or s[0].shape[1] != t[0].shape[1]:
            raise ValueError(f"loss {self.name!r}: student and teacher heads differ: {s[0].shape[1]} vs "
                             f"{t[0].shape[1]} classes, {s[1].shape[1]} vs {t[1].shape[1]} regression channels")
        pair = self.pair(torch.cat(s, dim=1), torch.cat(t, dim=1), batch)  # one sampling pass for both heads
        if pair is None:
            return _zero(*s)
        k = s[0].shape[1]
        (s_heat, s_reg), (t_heat, t_reg) = (x.split([k, REG_CHANNELS], dim=-1) for x in pair)
        heat_l1 = F.l1_loss(s_heat.sigmoid(), t_heat.sigmoid())
        reg_l1 = F.l1_loss(s_reg, t_reg)
        self.last_metrics = {"heatmap": heat_l1.detach(), "reg": reg_l1.detach()}
        return self.heatmap_weight * heat_l1 + self.reg_weight * reg_l1

"""BEV detection losses: the CenterPoint task loss and UniDistill's three distillation losses.

:class:`BEVDetectionLoss` is the detector's own supervised term (no teacher key): a focal loss on class heatmaps
against Gaussians drawn at the ground-truth centres, plus L1 on the 8 regression channels at the centre cells.

UniDistill (Zhou et al., CVPR 2023, arXiv:2303.15083; forms as in the authors' code, megvii-research/
CVPR2023-UniDistill) distils features at 9 BEV keypoints per ground-truth box (the centre, the 4 corners and the 4
edge midpoints, rotated by the yaw), where both maps are sampled bilinearly, and responses around box centres:

* :class:`UniDistillFeatureLoss`: L1 (or squared) error of the features at the keypoints;
* :class:`UniDistillRelationLoss`: L1 between the 9 x 9 cosine-similarity matrices of an object's keypoints;
* :class:`UniDistillResponseLoss`: L1 between the heatmap probabilities and between the regression outputs, under
  a Gaussian mask around the box centres (or, as an option, at the keypoints).

The keypoint terms are a mean over objects of a mean over that object's 9 keypoints, so every object weighs the
same whatever its size. Boxes come from the batch (``boxes``, ``box_counts``, ``box_labels``); boxes whose centre
lies outside the grid are ignored, keypoints past the border read the border cells. A batch without boxes gives a
zero loss that is still connected to the student's graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, DistillLoss, Keys
from xmodal.losses.normalize import NormOption, target_norm
from xmodal.modalities.bev_nets import REG_CHANNELS, BEVGrid

HEAD_KEYS = ("bev.heatmap", "bev.reg")
Distance = Literal["l1", "mse"]
DISTANCES = {"l1": F.l1_loss, "mse": F.mse_loss}
Region = Literal["gaussian", "keypoints"]
PROB_EPS = 1e-4
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


def centre_cells(boxes: Tensor, grid: BEVGrid) -> tuple[Tensor, Tensor]:
    """Continuous ``(col, row)`` centres of boxes ``... x >=2`` on the head's grid, and the cells holding them
    (floored, clamped to the map)."""
    h, w = grid.out_size
    centre = grid.to_cells(boxes[..., :2], grid.out_cell)
    cell = torch.floor(centre).long().clamp(min=0)
    return centre, torch.minimum(cell, cell.new_tensor([w - 1, h - 1]))


def gaussian_peaks(cells: Tensor, radius: Tensor, size: tuple[int, int]) -> Tensor:
    """One Gaussian per ``(col, row)`` cell of ``cells`` ``N x 2`` on an ``H x W`` map: ``N x H x W``, exactly 1 at
    the cell, ``sigma = (2 radius + 1) / 6``, zero outside the ``(2 radius + 1)``-cell square around it."""
    h, w = size
    sigma = (2 * radius + 1) / 6
    dcol = torch.arange(w, device=cells.device)[None] - cells[:, 0, None]  # N x W
    drow = torch.arange(h, device=cells.device)[None] - cells[:, 1, None]  # N x H
    dist2 = (drow**2)[:, :, None] + (dcol**2)[:, None, :]  # N x H x W
    inside = (drow.abs()[:, :, None] <= radius[:, None, None]) & (dcol.abs()[:, None, :] <= radius[:, None, None])
    return torch.exp(-dist2 / (2 * sigma[:, None, None] ** 2)) * inside


def box_radius(boxes: Tensor, grid: BEVGrid, min_overlap: float, min_radius: int) -> Tensor:
    """Whole-cell Gaussian radius of each box on the head's grid (:func:`gaussian_radius` floored, at least
    ``min_radius``)."""
    size = boxes[..., 3:5].clamp(min=1e-3) / grid.out_cell
    return gaussian_radius(size[..., 1], size[..., 0], min_overlap).floor().clamp(min=min_radius)


def encode_targets(batch: Batch, grid: BEVGrid, min_overlap: float = 0.1, min_radius: int = 2) -> DetectionTargets:
    """Heatmap and regression targets on the head's grid from the batch's boxes (vectorised over all boxes)."""
    boxes, labels, mask = valid_boxes(batch, grid)
    b, m = mask.shape
    h, w = grid.out_size
    centre, cell = centre_cells(boxes, grid)
    size = boxes[..., 3:6].clamp(min=1e-3)
    yaw = boxes[..., 6]
    reg = torch.cat([centre - cell, boxes[..., 2:3], size.log(), yaw.sin()[..., None], yaw.cos()[..., None]], -1)
    index = cell[..., 1] * w + cell[..., 0]

    peaks = gaussian_peaks(cell[mask], box_radius(boxes, grid, min_overlap, min_radius)[mask], (h, w))
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
    """UniDistill feature distillation: the distance between BEV features at the 9 keypoints of every object.

    ``loss = mean_objects mean_keypoints mean_channels d(A s, t)``, with ``d`` the absolute difference
    (``distance="l1"``, UniDistill's code) or the squared one (``"mse"``), and ``A`` the identity or, when
    ``student_channels != teacher_channels``, a learned 1x1 adapter (a linear map on the sampled features, the same
    as a 1x1 conv on the map before sampling, since bilinear weights sum to 1).

    Args:
        student_key, teacher_key: the BEV feature maps (``B x C x H x W``, any resolution over the same grid extent);
            UniDistill distils the map before the BEV backbone (``bev.pre_backbone``).
        grid: the BEV grid (extent used to place the keypoints).
        student_channels, teacher_channels: set both, when they differ, to learn the adapter.
        distance: ``"l1"`` or ``"mse"``.
        normalize: normalisation of the teacher's keypoint features (:mod:`xmodal.losses.normalize`); default
            ``"none"``, as UniDistill's code, which regresses raw BEV features.
    """

    def __init__(
        self, grid: BEVGrid | None = None, student_key: Keys = "bev.feat", teacher_key: Keys | None = None,
        student_channels: int | None = None, teacher_channels: int | None = None, weight: float = 1.0,
        name: str | None = "unidistill_feature", normalize: NormOption = "none", distance: Distance = "l1",
    ) -> None:
        super().__init__(student_key, teacher_key, grid, weight, name)
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {sorted(DISTANCES)}, got {distance!r}")
        self.distance = DISTANCES[distance]
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
        return self.distance(s_pts, t_pts)


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


def box_gaussian_mask(batch: Batch, grid: BEVGrid, min_overlap: float = 0.7, min_radius: int = 0) -> Tensor:
    """Class-agnostic ``B x H x W`` mask on the head's grid: a Gaussian around each real box's centre cell (see
    :func:`gaussian_peaks`, radius from :func:`box_radius`), the maximum where they overlap, 0 away from boxes."""
    boxes, _, valid = valid_boxes(batch, grid)
    _, cell = centre_cells(boxes, grid)
    peaks = gaussian_peaks(cell[valid], box_radius(boxes, grid, min_overlap, min_radius)[valid], grid.out_size)
    sample = torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)[valid]
    mask = boxes.new_zeros(valid.shape[0], peaks.shape[1] * peaks.shape[2])
    mask = mask.scatter_reduce(0, sample[:, None].expand(-1, mask.shape[1]), peaks.flatten(1), "amax")
    return mask.view(valid.shape[0], *grid.out_size)


def clamped_sigmoid(logits: Tensor) -> Tensor:
    """Heatmap probabilities kept in ``[1e-4, 1 - 1e-4]``, as CenterPoint-style heads clamp them."""
    return logits.float().sigmoid().clamp(PROB_EPS, 1 - PROB_EPS)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``sum(values * mask) / sum(mask)`` (values and mask ``B x H x W``)."""
    return (values * mask).sum() / mask.sum()


class UniDistillResponseLoss(_KeypointLoss):
    """UniDistill response distillation: ``heatmap_weight * L1(heatmaps) + reg_weight * L1(regression)`` between
    student and teacher heads, over one of two regions. Both parts are logged (``<name>/heatmap``, ``<name>/reg``).

    ``region="gaussian"`` (UniDistill's code): every cell of the head's maps, weighted by a Gaussian around each
    ground-truth box centre (:func:`box_gaussian_mask`, built from the batch's boxes with CornerNet's radius rule at
    ``min_overlap``, no minimum radius): ``sum(mask * d) / sum(mask)``. The heatmap ``d`` is the absolute difference
    of the highest class probability at each cell (the student's ``sigmoid(H_s)``, the teacher's softened
    ``sigmoid(H_t / teacher_temperature)``, both clamped to ``[1e-4, 1 - 1e-4]``); the regression ``d`` is the mean
    over channels of ``|B_s - B_t|``.

    ``region="keypoints"``: the 9 keypoints of every object (sampled as the other UniDistill losses), per class
    probabilities and per channel, each a mean over objects, keypoints and channels. At corners and edge midpoints
    the regression outputs are never supervised, so their teacher values are arbitrary.

    Reads ``[bev.heatmap, bev.reg]`` from both models (same classes and regression layout). It has no
    ``normalize``: its targets are predictions (probabilities and box parameters), not features.
    """

    def __init__(
        self, grid: BEVGrid | None = None, student_key: Keys = HEAD_KEYS, teacher_key: Keys | None = None,
        heatmap_weight: float = 1.0, reg_weight: float = 1.0, weight: float = 1.0,
        name: str | None = "unidistill_response", region: Region = "gaussian", teacher_temperature: float = 2.0,
        min_overlap: float = 0.7,
    ) -> None:
        super().__init__(list(student_key), list(teacher_key) if teacher_key is not None else None, grid, weight, name)
        if region not in ("gaussian", "keypoints"):
            raise ValueError(f"region must be 'gaussian' or 'keypoints', got {region!r}")
        if teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}")
        self.heatmap_weight, self.reg_weight = heatmap_weight, reg_weight
        self.region, self.teacher_temperature, self.min_overlap = region, teacher_temperature, min_overlap
        self.last_metrics: dict[str, Tensor] = {}

    def forward(self, s: tuple[Tensor, Tensor], t: tuple[Tensor, Tensor], batch: Batch) -> Tensor:
        if s[1].shape[1] != REG_CHANNELS or s[0].shape[1] != t[0].shape[1]:
            raise ValueError(f"loss {self.name!r}: student and teacher heads differ: {s[0].shape[1]} vs "
                             f"{t[0].shape[1]} classes, {s[1].shape[1]} vs {t[1].shape[1]} regression channels")
        t = (t[0].detach() / self.teacher_temperature, t[1].detach())
        parts = self.gaussian_parts(s, t, batch) if self.region == "gaussian" else self.keypoint_parts(s, t, batch)
        if parts is None:
            return _zero(*s)
        heat_l1, reg_l1 = parts
        self.last_metrics = {"heatmap": heat_l1.detach(), "reg": reg_l1.detach()}
        return self.heatmap_weight * heat_l1 + self.reg_weight * reg_l1

    def gaussian_parts(self, s: tuple[Tensor, Tensor], t: tuple[Tensor, Tensor],
                       batch: Batch) -> tuple[Tensor, Tensor] | None:
        if s[0].shape[-2:] != self.grid.out_size or t[0].shape[-2:] != self.grid.out_size:
            raise ValueError(f"loss {self.name!r}: heads of {tuple(s[0].shape[-2:])} (student) and "
                             f"{tuple(t[0].shape[-2:])} (teacher) cells, the grid's head has {self.grid.out_size}")
        mask = box_gaussian_mask(batch, self.grid, self.min_overlap).to(s[0].device)
        if not bool(mask.any()):
            return None
        heat = (clamped_sigmoid(s[0]).amax(1) - clamped_sigmoid(t[0]).amax(1)).abs()
        reg = (s[1].float() - t[1].float()).abs().mean(1)
        return masked_mean(heat, mask), masked_mean(reg, mask)

    def keypoint_parts(self, s: tuple[Tensor, Tensor], t: tuple[Tensor, Tensor],
                       batch: Batch) -> tuple[Tensor, Tensor] | None:
        pair = self.pair(torch.cat(s, dim=1), torch.cat(t, dim=1), batch)  # one sampling pass for both heads
        if pair is None:
            return None
        k = s[0].shape[1]
        (s_heat, s_reg), (t_heat, t_reg) = (x.split([k, REG_CHANNELS], dim=-1) for x in pair)
        return F.l1_loss(s_heat.sigmoid(), t_heat.sigmoid()), F.l1_loss(s_reg, t_reg)

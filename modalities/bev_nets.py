"""BEV towers: the grid, a pillar (LiDAR) encoder, a lift-splat (camera) encoder, a BEV backbone and a centre head.

All maps use the ego frame of ``runs/BEV_CONTRACT.md`` (x forward, y left, metres) and are laid out
``B x C x H x W`` with rows along y and columns along x: cell ``(row i, col j)`` covers
``x in [x_min + j * cell, x_min + (j + 1) * cell)`` and ``y in [y_min + i * cell, ...)``. The encoders write the
input grid (``grid.cell``); the backbone and head run at ``grid.stride`` times coarser cells (``grid.out_cell``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.modalities.blocks import conv_bn

DEFAULT_CLASSES = ("car", "truck", "pedestrian", "cyclist")
REG_CHANNELS = 8  # dx, dy (cells), z, log w, log l, log h, sin yaw, cos yaw


@dataclass(frozen=True)
class BEVGrid:
    """The BEV grid every BEV model, target and loss of a recipe shares (set once in YAML, with an anchor).

    Args:
        x_range, y_range, z_range: metric extent ``(min, max)`` in the ego frame; points outside are dropped.
        cell: input cell size in metres (pillars and the camera splat).
        stride: the backbone's downsampling; the head's maps have cells of ``cell * stride`` metres.
        classes: detection classes; a box's label indexes this tuple (as in
            :class:`~xmodal.modalities.bev.BEVModality`).
    """

    x_range: tuple[float, float] = (-32.0, 32.0)
    y_range: tuple[float, float] = (-32.0, 32.0)
    z_range: tuple[float, float] = (-1.0, 4.0)
    cell: float = 0.5
    stride: int = 2
    classes: tuple[str, ...] = DEFAULT_CLASSES

    def __post_init__(self) -> None:
        for name in ("x_range", "y_range", "z_range"):
            low, high = (float(v) for v in getattr(self, name))
            if high <= low:
                raise ValueError(f"BEVGrid.{name} must be (min, max) with min < max, got {(low, high)}")
            object.__setattr__(self, name, (low, high))
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.stride < 1 or self.stride & (self.stride - 1):
            raise ValueError(f"BEVGrid.stride must be a power of two, got {self.stride}")
        for name, extent in (("x", self.x_range), ("y", self.y_range)):
            cells = (extent[1] - extent[0]) / (self.cell * self.stride)
            if abs(cells - round(cells)) > 1e-6:
                raise ValueError(f"BEVGrid: the {name} extent {extent} is not a whole number of output cells")

    @classmethod
    def of(cls, grid: BEVGrid | Mapping[str, Any] | None) -> BEVGrid:
        """A grid from itself, a plain mapping (a checkpoint's ``init_args``) or ``None`` (the defaults)."""
        if grid is None:
            return cls()
        return grid if isinstance(grid, BEVGrid) else cls(**grid)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def nx(self) -> int:
        return round((self.x_range[1] - self.x_range[0]) / self.cell)

    @property
    def ny(self) -> int:
        return round((self.y_range[1] - self.y_range[0]) / self.cell)

    @property
    def out_cell(self) -> float:
        return self.cell * self.stride

    @property
    def out_size(self) -> tuple[int, int]:
        """``(H, W)`` of the head's maps."""
        return self.ny // self.stride, self.nx // self.stride

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_cells(self, xy: Tensor, cell: float) -> Tensor:
        """Metric ``... x 2`` (x, y) -> continuous cell coordinates (column, row) for cells of ``cell`` metres."""
        origin = xy.new_tensor([self.x_range[0], self.y_range[0]])
        return (xy - origin) / cell

    def to_normalized(self, xy: Tensor) -> Tensor:
        """Metric ``... x 2`` -> ``grid_sample`` coordinates in [-1, 1] (``align_corners=False``), any resolution."""
        low = xy.new_tensor([self.x_range[0], self.y_range[0]])
        size = xy.new_tensor([self.x_range[1] - self.x_range[0], self.y_range[1] - self.y_range[0]])
        return 2 * (xy - low) / size - 1

    def flat_index(self, xyz: Tensor) -> tuple[Tensor, Tensor]:
        """Input-grid cell of each point: flat ``row * nx + col`` (int64) and a bool mask of points inside the grid.

        ``xyz``: ``... x 3`` metric points (extra columns ignored); both outputs are ``...``.
        """
        cells = torch.floor(self.to_cells(xyz[..., :2], self.cell)).long()
        col, row = cells[..., 0], cells[..., 1]
        z = xyz[..., 2]
        inside = (col >= 0) & (col < self.nx) & (row >= 0) & (row < self.ny)
        inside &= (z >= self.z_range[0]) & (z < self.z_range[1])
        return (row * self.nx + col).clamp(0, self.nx * self.ny - 1), inside


class PillarEncoder(nn.Module):
    """PointPillars-style encoder: points -> per-point PointNet -> max per pillar -> ``B x C x ny x nx`` canvas.

    Each point's features are (x, y, z, intensity), its offset from the mean of its pillar's points, and its
    (x, y) offset from the pillar centre (9 values). Pillar statistics and the max use index ops over all points
    of the batch at once.
    """

    def __init__(self, grid: BEVGrid, channels: int) -> None:
        super().__init__()
        self.grid = grid
        self.channels = channels
        self.linear = nn.Linear(9, channels, bias=False)
        self.norm = nn.BatchNorm1d(channels)

    def forward(self, points: Tensor, counts: Tensor) -> Tensor:
        """``points`` float ``B x N x 4`` (zero-padded), ``counts`` int ``B`` -> ``B x C x ny x nx``."""
        b, n, _ = points.shape
        grid, cells = self.grid, self.grid.nx * self.grid.ny
        index, inside = grid.flat_index(points)
        valid = inside & (torch.arange(n, device=points.device) < counts.to(points.device)[:, None])
        pillar = (index + torch.arange(b, device=points.device)[:, None] * cells)[valid]
        pts = points[valid].float()
        canvas = pts.new_zeros(b * cells, self.channels)
        if len(pts):
            ones = pts.new_ones(len(pts))
            count = pts.new_zeros(b * cells).index_add_(0, pillar, ones)
            mean = pts.new_zeros(b * cells, 3).index_add_(0, pillar, pts[:, :3])[pillar] / count[pillar, None]
            col_row = torch.stack([pillar % grid.nx, (pillar // grid.nx) % grid.ny], dim=1).to(pts.dtype)
            centre = col_row.add_(0.5).mul_(grid.cell) + pts.new_tensor([grid.x_range[0], grid.y_range[0]])
            feats = torch.cat([pts, pts[:, :3] - mean, pts[:, :2] - centre], dim=1)
            hidden = F.relu(self.norm(self.linear(feats)))
            # ReLU outputs are >= 0, so the zero-initialised canvas does not change the max of non-empty pillars
            canvas = canvas.scatter_reduce(0, pillar[:, None].expand_as(hidden), hidden, "amax")
        return canvas.view(b, grid.ny, grid.nx, self.channels).permute(0, 3, 1, 2).contiguous()


def splat(feats: Tensor, points: Tensor, grid: BEVGrid) -> Tensor:
    """Sum-pool features onto the input grid ("splat"): ``B x P x C`` at metric ``B x P x 3`` -> ``B x C x ny x nx``.

    Points outside the grid (x, y or z) are dropped.
    """
    b, _, c = feats.shape
    cells = grid.nx * grid.ny
    index, inside = grid.flat_index(points)
    flat = (index + torch.arange(b, device=feats.device)[:, None] * cells)[inside]
    canvas = feats.new_zeros(b * cells, c).index_add_(0, flat, feats[inside])
    return canvas.view(b, grid.ny, grid.nx, c).permute(0, 3, 1, 2).contiguous()


def frustum_points(intrinsics: Tensor, extrinsics: Tensor, depths: Tensor, image_hw: tuple[int, int],
                   feat_hw: tuple[int, int]) -> Tensor:
    """Ego-frame positions of a camera frustum: every feature pixel at every depth.

    Image pixel ``(u, v)`` covers ``[u, u + 1) x [v, v + 1)`` (the corpus's convention, under which resizing scales
    ``K`` exactly), so feature pixel ``(i, j)`` of an ``h x w`` map over an ``H x W`` image is centred at
    ``u = (j + 0.5) * W / w``, likewise ``v``; at depth ``d`` (along the optical axis) its camera point is
    ``d * inv(K) @ [u, v, 1]`` and its ego point ``E @ [p, 1]``.

    Args:
        intrinsics: ``B x V x 3 x 3`` (for the ``H x W`` images).
        extrinsics: ``B x V x 4 x 4`` camera-to-ego.
        depths: ``D`` depth bin centres in metres.
        image_hw: ``(H, W)``. feat_hw: ``(h, w)``.

    Returns:
        ``B x V x D x h x w x 3`` ego points.
    """
    (height, width), (h, w) = image_hw, feat_hw
    device, dtype = intrinsics.device, intrinsics.dtype
    v = (torch.arange(h, device=device, dtype=dtype) + 0.5) * (height / h)
    u = (torch.arange(w, device=device, dtype=dtype) + 0.5) * (width / w)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    pixels = torch.stack([uu, vv, torch.ones_like(uu)], dim=-1).reshape(-1, 3)  # hw x 3
    rays = torch.einsum("bvij,pj->bvpi", torch.linalg.inv(intrinsics), pixels)
    rays = torch.einsum("bvij,bvpj->bvpi", extrinsics[..., :3, :3], rays)  # camera-to-ego rotation
    points = depths.to(dtype)[None, None, :, None, None] * rays[:, :, None]  # B x V x D x hw x 3
    points = points + extrinsics[:, :, None, None, :3, 3]
    b, nv = intrinsics.shape[:2]
    return points.reshape(b, nv, len(depths), h, w, 3)


class LiftSplat(nn.Module):
    """Lift-Splat-Shoot camera encoder: ``B x V x 3 x H x W`` views -> ``B x C x ny x nx`` BEV features.

    A small CNN (shared by all views, stride ``image_stride``) predicts per pixel a softmax over ``depth_bins``
    depths (bin centres evenly over ``depth_range``) and a ``channels``-wide context; their outer product is placed
    at the frustum points (:func:`frustum_points`) and sum-pooled onto the grid (:func:`splat`).
    """

    def __init__(self, grid: BEVGrid, channels: int, depth_bins: int, depth_range: tuple[float, float],
                 image_stride: int = 8, width: int = 32) -> None:
        super().__init__()
        if image_stride < 2 or image_stride & (image_stride - 1):
            raise ValueError(f"image_stride must be a power of two >= 2, got {image_stride}")
        self.grid = grid
        self.channels = channels
        self.depth_bins = depth_bins
        layers, cin = [], 3
        for k in range(int(math.log2(image_stride))):
            cout = min(2 * width, (width // 2) << k)
            layers.append(conv_bn(cin, cout, stride=2))
            cin = cout
        self.encoder = nn.Sequential(*layers, conv_bn(cin, 2 * width), nn.Conv2d(2 * width, depth_bins + channels, 1))
        self.depths: Tensor
        self.register_buffer("depths", torch.linspace(*depth_range, depth_bins), persistent=False)

    def forward(self, images: Tensor, intrinsics: Tensor, extrinsics: Tensor) -> Tensor:
        b, nv, _, height, width = images.shape
        x = self.encoder((images.flatten(0, 1).float() - 0.5) / 0.25)
        h, w = x.shape[-2:]
        depth = x[:, : self.depth_bins].softmax(dim=1)
        context = x[:, self.depth_bins :]
        lifted = depth[:, :, None] * context[:, None]  # BV x D x C x h x w
        lifted = lifted.view(b, nv, self.depth_bins, self.channels, h, w).permute(0, 1, 2, 4, 5, 3)
        points = frustum_points(intrinsics.float(), extrinsics.float(), self.depths, (height, width), (h, w))
        return splat(lifted.reshape(b, -1, self.channels), points.reshape(b, -1, 3), self.grid)


class BEVBackbone(nn.Module):
    """Two-scale BEV CNN (SECOND/FPN-like): input grid -> ``grid.stride`` -> ``2 x grid.stride``, fused back.

    ``B x cin x ny x nx -> B x channels x ny/stride x nx/stride``.
    """

    def __init__(self, cin: int, channels: int, stride: int) -> None:
        super().__init__()
        down = [conv_bn(cin if k == 0 else channels, channels, stride=2) for k in range(int(math.log2(stride)))]
        self.block1 = nn.Sequential(*(down or [conv_bn(cin, channels)]), conv_bn(channels, channels))
        self.block2 = nn.Sequential(conv_bn(channels, 2 * channels, stride=2), conv_bn(2 * channels, 2 * channels))
        self.up = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 2, stride=2, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.fuse = conv_bn(2 * channels, channels, kernel=1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.block1(x)
        return self.fuse(torch.cat([x1, self.up(self.block2(x1))], dim=1))


class CenterHead(nn.Module):
    """CenterPoint-style head: a shared 3x3 conv, then class heatmap logits ``B x K x H x W`` and the 8 regression
    channels ``B x 8 x H x W`` (dx, dy, z, log w, log l, log h, sin yaw, cos yaw). Returns ``(shared, heatmap, reg)``.
    """

    def __init__(self, channels: int, num_classes: int, prior: float = 0.1) -> None:
        super().__init__()
        self.shared = conv_bn(channels, channels)
        self.heatmap = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.reg = nn.Conv2d(channels, REG_CHANNELS, 3, padding=1)
        assert self.heatmap.bias is not None
        nn.init.constant_(self.heatmap.bias, -math.log((1 - prior) / prior))  # start near the background rate

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shared = self.shared(x)
        return shared, self.heatmap(shared), self.reg(shared)

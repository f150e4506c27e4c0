"""BEV 3D detectors for the UniDistill recipe: one class, three input families, trained as a student and, frozen
(:class:`~xmodal.teachers.bev.BEVTeacher`), used as the teacher of another.

:class:`BEVDetector` with ``inputs="lidar"`` is a PointPillars encoder, ``"camera"`` a lift-splat encoder over all
views, ``"fusion"`` both, concatenated in BEV and mixed by a 1x1 conv. All three share the BEV backbone and the
CenterPoint head of :mod:`xmodal.modalities.bev_nets`, so any of them can teach any other (the four UniDistill
paths). Train one with ``Distiller(student=BEVDetector(...), losses=[BEVDetectionLoss(...)])``; export it with
:class:`~xmodal.callbacks.ExportStudent` and load it frozen with :class:`~xmodal.teachers.bev.BEVTeacher`.

Outputs (``Hb x Wb`` = ``grid.out_size``): ``bev.feat`` (the layer named by ``feat_layer``), ``bev.heatmap``
``B x K x Hb x Wb`` logits, ``bev.reg`` ``B x 8 x Hb x Wb`` (dx, dy in cells, z, log w, log l, log h, sin yaw,
cos yaw), and every layer a loss may pick by name whatever ``feat_layer`` is: ``bev.pre_backbone`` (the sensors'
BEV map on the input grid, before the backbone) and ``bev.neck`` (the backbone's output).
:meth:`BEVDetector.predict` decodes boxes per sample (``boxes`` ``K x 7``, ``scores``, ``labels``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, Outputs
from xmodal.modalities.bev_nets import BEVBackbone, BEVGrid, CenterHead, LiftSplat, PillarEncoder
from xmodal.modalities.blocks import conv_bn
from xmodal.zoo.hub import HubMixin

Inputs = Literal["lidar", "camera", "fusion"]
FeatLayer = Literal["encoder", "neck", "head"]
MAX_LOG_SIZE = 4.0  # exp(4) = 55 m: keeps an untrained head's sizes finite


def decode_boxes(heatmap: Tensor, reg: Tensor, grid: BEVGrid, top_k: int = 100, score_threshold: float = 0.1,
                 kernel: int = 3) -> list[dict[str, Tensor]]:
    """Boxes from head maps: max-pool NMS (a cell is kept if it is the max of its ``kernel`` neighbourhood), top-k
    over all classes and cells, then a score threshold.

    Args:
        heatmap: logits ``B x K x H x W``. reg: ``B x 8 x H x W``.
        grid: the grid the maps cover.

    Returns:
        per sample ``{"boxes": N x 7 (x, y, z, w, l, h, yaw), "scores": N, "labels": N int64}``, by decreasing score.
    """
    b, k, h, w = heatmap.shape
    scores = heatmap.float().sigmoid()
    peaks = scores * (F.max_pool2d(scores, kernel, stride=1, padding=kernel // 2) == scores)
    top, index = peaks.flatten(1).topk(min(top_k, k * h * w), dim=1)  # B x T
    labels, cell = index // (h * w), index % (h * w)
    r = reg.float().flatten(2).gather(2, cell[:, None].expand(-1, reg.shape[1], -1))  # B x 8 x T
    col = (cell % w).to(r.dtype) + r[:, 0]
    row = (cell // w).to(r.dtype) + r[:, 1]
    x = grid.x_range[0] + col * grid.out_cell
    y = grid.y_range[0] + row * grid.out_cell
    size = r[:, 3:6].clamp(max=MAX_LOG_SIZE).exp()
    yaw = torch.atan2(r[:, 6], r[:, 7])
    boxes = torch.stack([x, y, r[:, 2], size[:, 0], size[:, 1], size[:, 2], yaw], dim=-1)  # B x T x 7
    keep = top > score_threshold
    return [{"boxes": boxes[i][keep[i]], "scores": top[i][keep[i]], "labels": labels[i][keep[i]]} for i in range(b)]


class BEVDetector(nn.Module, HubMixin):
    """LiDAR, camera or fusion BEV detector (see the module docstring).

    Args:
        inputs: ``"lidar"`` (reads ``lidar``, ``lidar_counts``), ``"camera"`` (``camera``, ``intrinsics``,
            ``extrinsics``) or ``"fusion"`` (all of them).
        grid: the shared BEV grid (a :class:`BEVGrid` or its fields).
        channels: backbone and head width (``bev.feat`` has ``channels`` channels unless ``feat_layer="encoder"``).
        pillar_channels: width of the pillar features.
        camera_channels: width of the lifted camera features.
        depth_bins: depth bins of the camera's per-pixel distribution. depth_range: their centres' span in metres.
        image_stride: downsampling of the camera CNN. image_width: its width.
        feat_layer: the map returned as ``bev.feat``: ``"encoder"`` (the BEV input to the backbone, on the input
            grid), ``"neck"`` (the backbone's output) or ``"head"`` (the head's shared conv).
        top_k: most boxes :meth:`predict` keeps per sample. score_threshold: its minimum score.
    """

    output_keys = ("bev.feat", "bev.heatmap", "bev.reg", "bev.pre_backbone", "bev.neck")

    def __init__(
        self, inputs: Inputs = "lidar", grid: BEVGrid | Mapping[str, Any] | None = None, channels: int = 64,
        pillar_channels: int = 32, camera_channels: int = 32, depth_bins: int = 32,
        depth_range: tuple[float, float] = (1.0, 40.0), image_stride: int = 8, image_width: int = 32,
        feat_layer: FeatLayer = "neck", top_k: int = 100, score_threshold: float = 0.1,
    ) -> None:
        super().__init__()
        if inputs not in ("lidar", "camera", "fusion"):
            raise ValueError(f"inputs must be 'lidar', 'camera' or 'fusion', got {inputs!r}")
        if feat_layer not in ("encoder", "neck", "head"):
            raise ValueError(f"feat_layer must be 'encoder', 'neck' or 'head', got {feat_layer!r}")
        self.grid = BEVGrid.of(grid)
        self.inputs = inputs
        self.feat_layer = feat_layer
        self.top_k, self.score_threshold = top_k, score_threshold
        self.init_args: dict[str, Any] = {
            "inputs": inputs, "grid": self.grid.as_dict(), "channels": channels, "pillar_channels": pillar_channels,
            "camera_channels": camera_channels, "depth_bins": depth_bins, "depth_range": list(depth_range),
            "image_stride": image_stride, "image_width": image_width, "feat_layer": feat_layer, "top_k": top_k,
            "score_threshold": score_threshold,
        }
        self.pillars = PillarEncoder(self.grid, pillar_channels) if inputs != "camera" else None
        self.camera = (
            LiftSplat(self.grid, camera_channels, depth_bins, (float(depth_range[0]), float(depth_range[1])),
                      image_stride, image_width)
            if inputs != "lidar" else None
        )
        if inputs == "fusion":
            self.fuse: nn.Module = conv_bn(pillar_channels + camera_channels, channels, kernel=1)
            cin = channels
        else:
            self.fuse = nn.Identity()
            cin = pillar_channels if inputs == "lidar" else camera_channels
        self.backbone = BEVBackbone(cin, channels, self.grid.stride)
        self.head = CenterHead(channels, self.grid.num_classes)

    def encode(self, batch: Batch) -> Tensor:
        """The BEV map on the input grid, ``B x C x ny x nx``, from the sensors this detector reads."""
        maps = []
        if self.pillars is not None:
            maps.append(self.pillars(batch["lidar"], batch["lidar_counts"]))
        if self.camera is not None:
            maps.append(self.camera(batch["camera"], batch["intrinsics"], batch["extrinsics"]))
        return self.fuse(torch.cat(maps, dim=1))

    def forward(self, batch: Batch) -> Outputs:
        encoded = self.encode(batch)
        neck = self.backbone(encoded)
        shared, heatmap, reg = self.head(neck)
        feat = {"encoder": encoded, "neck": neck, "head": shared}[self.feat_layer]
        return {"bev.feat": feat, "bev.heatmap": heatmap, "bev.reg": reg, "bev.pre_backbone": encoded, "bev.neck": neck}

    @torch.no_grad()
    def predict(self, batch: Batch, top_k: int | None = None,
                score_threshold: float | None = None) -> list[dict[str, Tensor]]:
        """Decoded boxes per sample (eval mode for the call; see :func:`decode_boxes`)."""
        was_training = self.training
        self.eval()
        try:
            out = self(batch)
        finally:
            self.train(was_training)
        return decode_boxes(
            out["bev.heatmap"], out["bev.reg"], self.grid, top_k if top_k is not None else self.top_k,
            score_threshold if score_threshold is not None else self.score_threshold,
        )

"""BEV modality (batch fields only; the BEV towers come later): LiDAR points, camera views and 3D boxes.

Shard fields of one sample:

``npy`` (or ``lidar.npy``)
    float ``N x C`` points, ``C >= 3``: x, y, z (metres, ego/LiDAR frame), intensity (0 when ``C == 3``);
    extra columns are dropped.
``json``
    ``{"cameras": [{"name": "cam0", "intrinsics": 3x3, "extrinsics": 4x4}, ...], "boxes": [...]}``.
    ``extrinsics`` is the camera-to-ego transform (the camera's pose in the ego frame, as nuScenes'
    ``calibrated_sensor`` gives it); an ego point ``p`` projects with ``K @ (inv(E) @ [p, 1])[:3]``.
    Each box is nuScenes style: ``translation`` [x, y, z] (centre), ``size`` [w, l, h], ``rotation`` (a yaw in
    radians or a quaternion [w, x, y, z]), optional ``velocity`` [vx, vy], and ``class`` (a name, or an int
    label); ``category_name`` is accepted for ``class``.
``<name>.jpg`` / ``<name>.png`` (``cam0.jpg``, ``cam1.jpg``... when cameras have no name)
    one image per camera, in the order of ``cameras``.

Batch fields:

``lidar`` float32 ``B x N x 4`` (zero-padded) with ``lidar_counts`` int64 ``B``;
``camera`` uint8 ``B x V x 3 x H x W`` (float in [0, 1] after ``on_device``) with ``intrinsics`` float32
``B x V x 3 x 3`` (scaled to the resized images) and ``extrinsics`` float32 ``B x V x 4 x 4``;
``boxes`` float32 ``B x M x 9`` (x, y, z, w, l, h, yaw, vx, vy; zero-padded) with ``box_counts`` int64 ``B``
and ``box_labels`` int64 ``B x M`` (-1 at padding), ``box_points`` int64 ``B x M`` (LiDAR points in each box, from
``num_lidar_pts``; -1 where unknown or padding).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from xmodal.contracts import Batch, Modality, to_float_image
from xmodal.data.decoders import load_npy

POINT_FIELDS = ("npy", "lidar.npy")
BOX_DIM = 9


def decode_points(data: bytes, max_points: int | None = None) -> Tensor:
    """``npy`` bytes -> float32 ``N x 4``; more than ``max_points`` points are thinned with an even stride."""
    points = load_npy(data)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be N x (>=3), got shape {points.shape}")
    points = points[:, :4].astype(np.float32)
    if points.shape[1] == 3:
        points = np.concatenate([points, np.zeros_like(points[:, :1])], axis=1)
    if max_points is not None and len(points) > max_points:
        points = points[np.linspace(0, len(points) - 1, max_points).astype(np.int64)]
    return torch.from_numpy(np.ascontiguousarray(points))


def yaw_of(rotation: float | Sequence[float]) -> float:
    """A yaw in radians, or the yaw (about z) of a quaternion ``[w, x, y, z]`` of any non-zero norm."""
    if isinstance(rotation, int | float):
        return float(rotation)
    w, x, y, z = (float(v) for v in rotation)
    norm_sq = w * w + x * x + y * y + z * z
    if not norm_sq > 0:
        raise ValueError(f"rotation quaternion {list(rotation)} has zero norm")
    # divided by the squared norm, so a quaternion rounded to a few decimals gives the yaw of its unit version
    return math.atan2(2.0 * (w * z + x * y), norm_sq - 2.0 * (y * y + z * z))


def decode_boxes(
    boxes: Sequence[Mapping[str, Any]], classes: Sequence[str] | None, min_points: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """nuScenes-style box dicts -> float32 ``M x 9``, int64 ``M`` labels and int64 ``M`` LiDAR point counts.

    Named classes map to their index in ``classes``; boxes of other classes are dropped. Int classes are kept.
    A box's point count is its ``num_lidar_pts`` (-1 when absent); boxes with a known count below ``min_points``
    are dropped (nuScenes annotates boxes that no LiDAR point hits, and does not score them).
    """
    rows, labels, points = [], [], []
    for box in boxes:
        count = int(box.get("num_lidar_pts", -1))
        if 0 <= count < min_points:
            continue
        name = box.get("class", box.get("category_name"))
        if isinstance(name, str):
            if classes is None:
                raise ValueError(f"box class {name!r} is a name, but the modality has no class list")
            if name not in classes:
                continue
            label = list(classes).index(name)
        else:
            label = int(name)
        vx, vy = box.get("velocity", (0.0, 0.0))[:2]
        rows.append([*box["translation"], *box["size"], yaw_of(box["rotation"]), vx, vy])
        labels.append(label)
        points.append(count)
    return (
        torch.tensor(rows, dtype=torch.float32).reshape(-1, BOX_DIM),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(points, dtype=torch.int64),
    )


def decode_view(data: bytes, image_size: tuple[int, int] | None, intrinsics: Tensor) -> tuple[Tensor, Tensor]:
    """Image bytes -> uint8 ``3 x H x W`` resized to ``image_size`` (H, W), and the intrinsics scaled to match."""
    with Image.open(io.BytesIO(data)) as file:
        img = file.convert("RGB")
    k = intrinsics.clone()
    if image_size is not None and (img.height, img.width) != tuple(image_size):
        k[0] *= image_size[1] / img.width
        k[1] *= image_size[0] / img.height
        img = img.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), k


class BEVModality(Modality):
    """Decode LiDAR points, camera views with calibration, and 3D boxes (fields in the module docstring).

    Args:
        classes: box class names; a box's label is its index here, and boxes of other classes are dropped.
        max_points: most points kept per sweep (even-stride thinning; ``None`` keeps all).
        image_size: ``(H, W)`` the camera images are resized to (``None`` keeps them; then all must match).
        cameras: decode camera images and calibration (turn off for LiDAR-only recipes).
        min_points: drop boxes that fewer LiDAR points hit (where the json gives ``num_lidar_pts``); 1 drops the
            boxes no sensor could see, which nuScenes annotates but does not score.
    """

    name = "bev"
    fields = ("lidar", "lidar_counts", "camera", "intrinsics", "extrinsics", "boxes", "box_counts", "box_labels",
              "box_points")

    def __init__(
        self, classes: Sequence[str] | None = None, max_points: int | None = None,
        image_size: tuple[int, int] | None = None, cameras: bool = True, min_points: int = 0,
    ) -> None:
        self.min_points = min_points
        self.classes = list(classes) if classes is not None else None
        self.max_points = max_points
        self.image_size = (int(image_size[0]), int(image_size[1])) if image_size is not None else None
        self.cameras = cameras

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        key = sample.get("__key__")
        field = next((f for f in POINT_FIELDS if f in sample), None)
        if field is None or "json" not in sample:
            raise KeyError(f"sample {key!r} needs {' or '.join(POINT_FIELDS)} and json fields")
        meta = sample["json"]
        meta = json.loads(meta) if isinstance(meta, bytes | str) else meta
        boxes, labels, points = decode_boxes(meta.get("boxes", []), self.classes, self.min_points)
        out = {"lidar": decode_points(sample[field], self.max_points), "boxes": boxes, "box_labels": labels,
               "box_points": points}
        if self.cameras:
            out.update(self.decode_cameras(sample, meta.get("cameras", [])))
        return out

    def decode_cameras(self, sample: Mapping[str, Any], cameras: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not cameras:
            raise KeyError(f"sample {sample.get('__key__')!r} has no cameras in its json")
        images, ks, es = [], [], []
        for i, cam in enumerate(cameras):
            name = cam.get("name", f"cam{i}")
            # WebDataset lower-cases field names when it reads a tar: nuScenes' CAM_FRONT arrives as cam_front
            field = next((f"{n}.{ext}" for n in (name, name.lower()) for ext in ("jpg", "jpeg", "png")
                          if f"{n}.{ext}" in sample), None)
            if field is None:
                raise KeyError(f"sample {sample.get('__key__')!r} has no image for camera {name!r}")
            image, k = decode_view(sample[field], self.image_size, torch.tensor(cam["intrinsics"], dtype=torch.float32))
            images.append(image)
            ks.append(k)
            es.append(torch.tensor(cam["extrinsics"], dtype=torch.float32))
        return {"camera": torch.stack(images), "intrinsics": torch.stack(ks), "extrinsics": torch.stack(es)}

    def collate(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        boxes = [item["boxes"] for item in items]
        batch: Batch = {
            "lidar": pad_sequence([item["lidar"] for item in items], batch_first=True),
            "lidar_counts": torch.tensor([len(item["lidar"]) for item in items], dtype=torch.int64),
            "boxes": pad_sequence(boxes, batch_first=True),
            "box_counts": torch.tensor([len(b) for b in boxes], dtype=torch.int64),
            "box_labels": pad_sequence([item["box_labels"] for item in items], batch_first=True, padding_value=-1),
            "box_points": pad_sequence([item["box_points"] for item in items], batch_first=True, padding_value=-1),
        }
        if "camera" in items[0]:
            for name in ("camera", "intrinsics", "extrinsics"):
                batch[name] = torch.stack([item[name] for item in items])
        return batch

    def on_device(self, batch: Batch, train: bool) -> Batch:
        if "camera" in batch:
            batch["camera"] = to_float_image(batch["camera"])
        return batch

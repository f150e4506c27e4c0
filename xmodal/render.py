"""Pictures of evaluation: BEV detection scenes from above (PNG) and lip-reading video->audio alignment heat maps.

* :func:`render_bev` draws one BEV sample: LiDAR points coloured by height and intensity, ground-truth boxes in
  green with their class, predictions in red with a heading tick, their class and score, and a legend of these
  colours; :class:`BEVRenders` renders the first samples of an evaluation (``xmodal eval bev --render N``).
* :func:`alignment_maps` takes, for the first utterances, the learned video-frame -> audio-frame attention of a
  recipe's :class:`~xmodal.losses.libs.LIBSFrameLoss`; :func:`plot_alignments` draws them as heat maps with the
  linear-time diagonal overlaid (``xmodal eval asr --plot``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from xmodal.contracts import CACHE_PREFIX, Batch
from xmodal.eval.bev import Detections, as_array, box_array

DEFAULT_GRID_RANGE: tuple[float, float, float, float] = (-32.0, -32.0, 32.0, 32.0)  # x_min, y_min, x_max, y_max
GT_COLOUR = (60, 220, 90)
PRED_COLOUR = (255, 70, 50)
RING_COLOUR = (70, 70, 84)
TEXT_COLOUR = (230, 230, 230)
BACKGROUND = (16, 16, 22)
# height colour ramp for points: ground blue -> cyan -> yellow -> red at 3 m
HEIGHT_STOPS = np.array([-0.5, 0.5, 1.5, 3.0])
HEIGHT_COLOURS = np.array([[40, 90, 255], [0, 220, 230], [250, 230, 40], [255, 60, 40]], dtype=np.float64)

# --------------------------------------------------------------------------------------------------- BEV scenes


def bev_corners(box: np.ndarray) -> np.ndarray:
    """The 4 BEV corners (front-left, front-right, back-right, back-left) of an ``(x, y, z, w, l, h, yaw)`` box."""
    x, y, _, w, length, _, yaw = box[:7]
    along = np.array([math.cos(yaw), math.sin(yaw)]) * length / 2
    across = np.array([-math.sin(yaw), math.cos(yaw)]) * w / 2
    centre = np.array([x, y])
    return np.stack([centre + along + across, centre + along - across, centre - along - across,
                     centre - along + across])


def point_colours(points: np.ndarray) -> np.ndarray:
    """uint8 ``N x 3``: hue from height, brightness from intensity (column 3, in [0, 1])."""
    rgb = np.stack([np.interp(points[:, 2], HEIGHT_STOPS, HEIGHT_COLOURS[:, c]) for c in range(3)], axis=1)
    intensity = np.clip(points[:, 3], 0.0, 1.0) if points.shape[1] > 3 else np.ones(len(points))
    return (rgb * (0.45 + 0.55 * intensity)[:, None]).astype(np.uint8)


def draw_legend(draw: ImageDraw.ImageDraw, score_threshold: float) -> None:
    """Top left: what the box colours mean, and the points' height colour ramp."""
    x, y = 6, 6
    entries = ((GT_COLOUR, "ground truth: class"), (PRED_COLOUR, f"prediction: class score (>= {score_threshold:g})"))
    for colour, text in entries:
        draw.rectangle([x, y + 2, x + 9, y + 9], outline=colour, width=2)
        draw.text((x + 14, y), text, fill=TEXT_COLOUR)
        y += 13
    for i, z in enumerate(np.linspace(HEIGHT_STOPS[0], HEIGHT_STOPS[-1], 40)):
        shade = tuple(int(np.interp(z, HEIGHT_STOPS, HEIGHT_COLOURS[:, c])) for c in range(3))
        draw.line([(x + i, y + 2), (x + i, y + 9)], fill=shade)
    draw.text((x + 46, y), f"points: height {HEIGHT_STOPS[0]:g} to {HEIGHT_STOPS[-1]:g} m", fill=TEXT_COLOUR)


def class_name(label: int, classes: Sequence[str] | None) -> str:
    return classes[label] if classes is not None and 0 <= label < len(classes) else f"class {label}"


def render_bev(
    points: Any, gt: Detections | None, pred: Detections | None, grid_range: Sequence[float], path: str | Path,
    *, score_threshold: float = 0.3, pixels_per_metre: float = 8.0, ring_step: float = 10.0,
    classes: Sequence[str] | None = None,
) -> Path:
    """Draw one sample from above as a PNG: x (forward) points up, y (left) points left, the ego at the origin.

    Args:
        points: ``N x (>=3)`` LiDAR points (x, y, z, [intensity]); ``None`` or empty draws none.
        gt: ground truth ``{"boxes", "labels"}`` drawn in green, or ``None``.
        pred: predictions ``{"boxes", "scores", "labels"}`` with a score of at least ``score_threshold``, drawn
            in red with a heading tick (centre to front edge), or ``None``.
        grid_range: ``(x_min, y_min, x_max, y_max)`` or ``(x_min, y_min, z_min, x_max, y_max, z_max)`` in metres.
        path: the PNG to write.
        pixels_per_metre: scale; the image is ``(y_max - y_min) * ppm`` wide and ``(x_max - x_min) * ppm`` high.
        ring_step: metres between range rings (and the length of the scale bar).
        classes: class names in label order, written beside each box (``class <label>`` without them).
    """
    if len(grid_range) not in (4, 6):
        raise ValueError(f"grid_range needs 4 or 6 numbers, got {list(grid_range)}")
    half = len(grid_range) // 2
    x_min, y_min, x_max, y_max = grid_range[0], grid_range[1], grid_range[half], grid_range[half + 1]
    ppm = pixels_per_metre
    width, height = round((y_max - y_min) * ppm), round((x_max - x_min) * ppm)

    def pixel(xy: np.ndarray) -> np.ndarray:  # ... x 2 metres -> ... x 2 (column, row)
        return np.stack([(y_max - xy[..., 1]) * ppm, (x_max - xy[..., 0]) * ppm], axis=-1)

    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    ego = pixel(np.zeros(2))
    radius = ring_step
    while radius < math.hypot(max(abs(x_min), abs(x_max)), max(abs(y_min), abs(y_max))):
        r = radius * ppm
        draw.ellipse([ego[0] - r, ego[1] - r, ego[0] + r, ego[1] + r], outline=RING_COLOUR)
        radius += ring_step

    if points is not None and len(points):
        pts = as_array(points)
        cols, rows = np.floor(pixel(pts[:, :2])).astype(np.int64).T
        inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
        canvas = np.array(image)
        canvas[rows[inside], cols[inside]] = point_colours(pts[inside])
        image = Image.fromarray(canvas)
        draw = ImageDraw.Draw(image)

    for det, colour, tick in ((gt, GT_COLOUR, False), (pred, PRED_COLOUR, True)):
        if det is None or not len(det["boxes"]):
            continue
        boxes = box_array(det["boxes"])
        scores = as_array(det["scores"]).reshape(-1) if "scores" in det else None
        labels = as_array(det["labels"]).reshape(-1).astype(np.int64) if "labels" in det else np.zeros(len(boxes), int)
        for i, box in enumerate(boxes):
            if tick and scores is not None and scores[i] < score_threshold:
                continue
            corners = pixel(bev_corners(box))
            draw.polygon([tuple(c) for c in corners], outline=colour, width=2)
            if tick:
                front = corners[:2].mean(axis=0)
                draw.line([tuple(pixel(box[:2])), tuple(front)], fill=colour, width=2)
            text = class_name(int(labels[i]), classes) + (f" {scores[i]:.2f}" if tick and scores is not None else "")
            # predictions labelled above their box, ground truth below its box, so a matched pair shows both
            row = float(corners[:, 1].min()) - 11 if tick else float(corners[:, 1].max()) + 1
            draw.text((float(corners[:, 0].max()) + 2, row), text, fill=colour)

    # the ego: a white triangle pointing forward (+x, up)
    size = max(3.0, 1.2 * ppm)
    draw.polygon([(ego[0], ego[1] - size), (ego[0] - size / 2, ego[1] + size / 2),
                  (ego[0] + size / 2, ego[1] + size / 2)], fill=(255, 255, 255))
    bar = ring_step * ppm
    draw.line([(8, height - 10), (8 + bar, height - 10)], fill=TEXT_COLOUR, width=2)
    draw.text((8, height - 24), f"{ring_step:g} m", fill=TEXT_COLOUR)
    draw_legend(draw, score_threshold)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out


def render_name(token: str) -> str:
    """The PNG file name of a sample token (characters unsafe in file names become ``_``)."""
    return re.sub(r"[^\w.-]", "_", token) + ".png"


class BEVRenders:
    """Renders the first ``count`` samples of a BEV evaluation into ``folder`` (one PNG per sample token).

    Pass it as ``on_batch`` of :func:`~xmodal.eval.loops.evaluate_bev` or :func:`~xmodal.eval.loops.evaluate_results`;
    ``paths`` lists the PNGs written.
    """

    def __init__(self, count: int, folder: str | Path, grid_range: Sequence[float] = DEFAULT_GRID_RANGE,
                 score_threshold: float = 0.3, classes: Sequence[str] | None = None) -> None:
        self.count, self.folder = count, Path(folder)
        self.grid_range, self.score_threshold, self.classes = grid_range, score_threshold, classes
        self.paths: list[str] = []

    def __call__(self, batch: Batch, preds: Sequence[Detections], truths: Sequence[Detections],
                 tokens: Sequence[str]) -> None:
        for i, (pred, gt) in enumerate(zip(preds, truths, strict=True)):
            if len(self.paths) >= self.count:
                return
            points = batch["lidar"][i, : int(batch["lidar_counts"][i])] if "lidar" in batch else None
            path = render_bev(points, gt, pred, self.grid_range, self.folder / render_name(tokens[i]),
                              score_threshold=self.score_threshold, classes=self.classes)
            self.paths.append(str(path))


# ---------------------------------------------------------------------------------------------- ASR alignments


def alignment_maps(distiller: nn.Module, batch: Batch, count: int) -> list[Tensor]:
    """The recipe's learned video->audio attention for the first ``count`` clips: ``Tv_i x Ta_i`` each (CPU)."""
    from xmodal.losses.libs import LIBSFrameLoss

    frame_losses = [loss for loss in getattr(distiller, "terms", []) if isinstance(loss, LIBSFrameLoss)]
    teacher = getattr(distiller, "teacher", None)
    if not frame_losses or teacher is None:
        raise ValueError("alignment plots need a recipe with a LIBSFrameLoss and a teacher (--config)")
    loss = frame_losses[0]
    if getattr(teacher, "cache_manifest", None) is not None and not any(k.startswith(CACHE_PREFIX) for k in batch):
        raise ValueError("the recipe's teacher is a CachedTeacher and these shards carry no cached outputs: plot "
                         "with the live teacher (the CachedTeacher's `teacher:` as the recipe's teacher)")
    with torch.no_grad():
        s_out, t_out = distiller.student(batch), teacher(batch)  # type: ignore[operator]
        (s, s_mask), t_all = loss.select(s_out, t_out)
        t, t_mask = t_all[0], t_all[1]
        weights = loss.attention(s, s_mask, t, t_mask).cpu()
    tv, ta = s_mask.sum(1).tolist(), t_mask.sum(1).tolist()
    return [weights[i, : int(tv[i]), : int(ta[i])] for i in range(min(count, weights.shape[0]))]


def plot_alignments(maps: Sequence[Tensor], titles: Sequence[str], path: str | Path) -> Path:
    """Heat maps (video frames down, audio frames across) with the linear-time diagonal overlaid, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 3.6), squeeze=False)
    for ax, weights, title in zip(axes[0], maps, titles, strict=True):
        tv, ta = weights.shape
        ax.imshow(weights.numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        rows = torch.arange(tv).float()
        ax.plot((rows + 0.5) * ta / tv - 0.5, rows.numpy(), "w--", linewidth=1, label="linear time")
        ax.set_xlabel(f"audio frame ({ta})")
        ax.set_ylabel(f"video frame ({tv})")
        ax.set_title(title[:40], fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

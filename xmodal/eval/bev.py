"""BEV 3D detection evaluation: the nuScenes detection protocol (AP, TP errors, NDS), results JSON and BEV renders.

The command is ``xmodal eval bev`` (:mod:`xmodal.commands.eval_bev`).

Boxes of one sample (predictions and ground truth alike) are a dict with ``boxes`` float ``K x 7`` (x, y, z, w, l,
h, yaw: ego frame, metres, centre; yaw is the angle of the length axis from +x toward +y), ``labels`` int ``K``
(indices into ``classes``) and, for predictions, ``scores`` float ``K`` (positive, e.g. sigmoid probabilities: a
score of 0 reads as "recall not reached", as in the devkit). Ground truth may also carry ``num_points`` ``M``.

Protocol (nuScenes detection, re-implemented here; all numbers below are the defaults):

* **Matching**, per class and distance threshold (0.5, 1, 2, 4 m): the predictions of every sample, sorted by
  score (descending; of equal scores, the later in input order first, as in the devkit), are matched greedily to
  the nearest still-unmatched ground-truth box of the same class in the same sample, by 2D centre distance in BEV;
  a match needs a distance strictly below the threshold. Unmatched predictions are false positives.
* **AP**: precision and recall after each prediction; precision is linearly interpolated (``np.interp``, no
  monotone envelope, 0 beyond the highest recall reached) at the 101 recall points 0, 0.01, ..., 1. AP is the mean
  over the recall points above ``min_recall`` (0.1) of ``max(0, precision - min_precision) / (1 - min_precision)``
  (``min_precision`` 0.1). mAP is the mean over classes and thresholds.
* **TP errors**, at the 2 m threshold, for every match: ATE, the centre distance in BEV (m); ASE, ``1 - IoU`` of
  the two boxes once their centres and orientations are aligned (a size-only 3D IoU); AOE, the smallest yaw
  difference (radians, in [0, pi]). Yaw is 2 pi-periodic for every class unless ``orientation_periods`` says
  otherwise; by default, as in the devkit, ``barrier`` has period pi and ``traffic_cone`` has no AOE (its
  orientation is undefined: its AOE is ``None`` and it is left out of mAOE). Each error is
  averaged cumulatively over the matches in score order, resampled at the recall points through the confidence,
  and averaged from just above ``min_recall`` up to the highest recall reached; a class that never gets past
  ``min_recall`` (no TP at all, for instance) gets error 1. mATE, mASE and mAOE are the means over classes.
* **NDS**: there is no velocity and no attribute, so AVE and AAE are omitted and NDS is the nuScenes formula over
  the three TP errors that exist: ``NDS = (5 mAP + sum over ATE, ASE, AOE of (1 - min(1, mE))) / (5 + 3)``. The
  official NDS divides by 5 + 5 over five errors, so the two are not comparable number for number.
* **Filtering** (the devkit's ``filter_eval_boxes``): ``max_range`` drops ground truth and predictions whose centre
  is not nearer to the ego (in BEV) than the class's range (the devkit's ``class_range``; default: no limit), and
  ground truth with fewer than ``min_gt_points`` LiDAR points is dropped when it carries ``num_points`` (the devkit
  drops boxes with no LiDAR or radar point).
* **Classes without ground truth**: the devkit scores them AP 0 and TP errors 1 (as if nothing had been predicted).
  By default they are left out of mAP, the mean errors and NDS here instead (their predictions are not scored),
  listed under ``classes_without_gt`` with ``None`` values; ``ignore_empty_classes=False`` gives the devkit's.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from tqdm.auto import tqdm

from xmodal.contracts import Batch, Modality
from xmodal.eval.zeroshot import evaluating

if TYPE_CHECKING:
    from xmodal.data.wds import CountedBatches

DIST_THRESHOLDS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
TP_THRESHOLD = 2.0
TP_ERRORS: tuple[str, ...] = ("ATE", "ASE", "AOE")
DEFAULT_ORIENTATION_PERIODS: dict[str, float] = {"barrier": math.pi}
NO_ORIENTATION_CLASSES: tuple[str, ...] = ("traffic_cone",)
MAP_WEIGHT = 5.0
RECALL = np.linspace(0.0, 1.0, 101)
DEFAULT_CLASSES: tuple[str, ...] = ("car", "truck", "pedestrian", "cyclist")
DEFAULT_GRID_RANGE: tuple[float, float, float, float] = (-32.0, -32.0, 32.0, 32.0)  # x_min, y_min, x_max, y_max
NUSCENES_META = {"use_camera": False, "use_lidar": False, "use_radar": False, "use_map": False,
                 "use_external": False}

Detections = Mapping[str, Any]  # "boxes", "labels", ["scores"], ["num_points"]: tensors or arrays


class Detector(Protocol):
    """What evaluation needs of a detector (see ``runs/BEV_CONTRACT.md``)."""

    def predict(self, batch: Batch) -> list[dict[str, Tensor]]: ...


def as_array(value: Any, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def box_array(value: Any) -> np.ndarray:
    """``K x 7`` float64 boxes from a ``K x (>=7)`` tensor or array (empty ones of any shape give ``0 x 7``)."""
    boxes = as_array(value)
    return boxes.reshape(len(boxes), -1)[:, :7] if boxes.size else np.zeros((0, 7))


# ----------------------------------------------------------------------------------------------------- geometry


def centre_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``len(a) x len(b)`` BEV (x, y) distances between box centres."""
    return np.linalg.norm(a[:, None, :2] - b[None, :, :2], axis=-1)


def size_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes with sizes ``a`` and ``b`` (``... x 3``) once their centres and orientations are aligned."""
    inter = np.prod(np.clip(np.minimum(a, b), 0.0, None), axis=-1)
    union = np.prod(a, axis=-1) + np.prod(b, axis=-1) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def yaw_difference(a: Any, b: Any, period: float = 2 * math.pi) -> np.ndarray:
    """Smallest absolute difference of two yaws modulo ``period`` (in (0, 2 pi]), in [0, period / 2]."""
    if not 0 < period <= 2 * math.pi:
        raise ValueError(f"orientation period must be in (0, 2 pi], got {period}")
    diff = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64) + period / 2) % period - period / 2
    return np.abs(diff)


def bev_corners(box: np.ndarray) -> np.ndarray:
    """The 4 BEV corners (front-left, front-right, back-right, back-left) of an ``(x, y, z, w, l, h, yaw)`` box."""
    x, y, _, w, length, _, yaw = box[:7]
    along = np.array([math.cos(yaw), math.sin(yaw)]) * length / 2
    across = np.array([-math.sin(yaw), math.cos(yaw)]) * w / 2
    centre = np.array([x, y])
    return np.stack([centre + along + across, centre + along - across, centre - along - across,
                     centre - along + across])


# ------------------------------------------------------------------------------------------------------ metrics


@dataclass
class Curve:
    """One class at one distance threshold, resampled at the 101 recall points of :data:`RECALL`."""

    precision: np.ndarray
    confidence: np.ndarray
    errors: dict[str, np.ndarray]

    @classmethod
    def empty(cls) -> Curve:
        """No true positive: precision 0 everywhere, recall never reached, errors 1."""
        zeros = np.zeros_like(RECALL)
        return cls(zeros, zeros.copy(), {name: np.ones_like(RECALL) for name in TP_ERRORS})


def accumulate(
    pred_boxes: Sequence[np.ndarray], pred_scores: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray],
    threshold: float, period: float = 2 * math.pi,
) -> Curve:
    """Match one class's predictions to its ground truth over all samples (lists aligned by sample) at a threshold.

    Boxes are ``K_i x 7`` / ``M_i x 7`` arrays per sample, scores ``K_i``. See the module docstring for the rules.
    """
    n_gt = sum(len(g) for g in gt_boxes)
    if n_gt == 0:
        return Curve.empty()
    sample = np.repeat(np.arange(len(pred_scores)), [len(s) for s in pred_scores])
    index = np.concatenate([np.arange(len(s)) for s in pred_scores]) if pred_scores else np.zeros(0, np.int64)
    scores = np.concatenate(pred_scores) if pred_scores else np.zeros(0)
    order = np.argsort(scores, kind="stable")[::-1]  # descending; equal scores: the later one first, as the devkit
    dists = [centre_distances(p, g) for p, g in zip(pred_boxes, gt_boxes, strict=True)]
    taken = [np.zeros(len(g), dtype=bool) for g in gt_boxes]
    tp = np.zeros(len(order), dtype=bool)
    errors: list[tuple[float, float, float]] = []
    for rank, i in enumerate(order):
        s, k = sample[i], index[i]
        d = np.where(taken[s], np.inf, dists[s][k])
        if d.size == 0:  # no ground truth of this class in the sample: a false positive
            continue
        j = int(np.argmin(d))
        if d[j] < threshold:
            taken[s][j] = True
            tp[rank] = True
            pred, gt = pred_boxes[s][k], gt_boxes[s][j]
            errors.append((float(d[j]), float(1.0 - size_iou(gt[3:6], pred[3:6])),
                           float(yaw_difference(gt[6], pred[6], period))))
    if not errors:
        return Curve.empty()
    conf = scores[order]
    tps, fps = np.cumsum(tp), np.cumsum(~tp)
    # recall repeats across false positives; np.interp then takes the last of equal x, as the devkit relies on
    precision = np.interp(RECALL, tps / n_gt, tps / (tps + fps), right=0.0)
    confidence = np.interp(RECALL, tps / n_gt, conf, right=0.0)
    running = np.cumsum(errors, axis=0) / np.arange(1, len(errors) + 1)[:, None]
    match_conf = conf[tp]
    # the running mean error at each recall point is looked up through its confidence (np.interp wants increasing x)
    resampled = {name: np.interp(confidence[::-1], match_conf[::-1], running[::-1, c])[::-1]
                 for c, name in enumerate(TP_ERRORS)}
    return Curve(precision, confidence, resampled)


def first_recall_index(min_recall: float) -> int:
    """Index of the first recall point strictly above ``min_recall``."""
    return round((len(RECALL) - 1) * min_recall) + 1


def average_precision(curve: Curve, min_recall: float = 0.1, min_precision: float = 0.1) -> float:
    """nuScenes AP: mean of ``max(0, precision - min_precision)`` above ``min_recall``, over ``1 - min_precision``."""
    if not (0 <= min_precision < 1 and 0 <= min_recall <= 1):
        raise ValueError(f"need 0 <= min_precision < 1 and 0 <= min_recall <= 1, got {min_precision}, {min_recall}")
    clipped = np.clip(curve.precision[first_recall_index(min_recall):] - min_precision, 0.0, None)
    return float(clipped.mean()) / (1.0 - min_precision) if clipped.size else 0.0


def tp_error(curve: Curve, name: str, min_recall: float = 0.1) -> float:
    """Mean of an error over the recall points from just above ``min_recall`` to the highest recall reached (else 1)."""
    first = first_recall_index(min_recall)
    reached = np.nonzero(curve.confidence)[0]
    last = int(reached[-1]) if len(reached) else 0
    return 1.0 if last < first else float(curve.errors[name][first : last + 1].mean())


def nd_score(mean_ap: float, errors: Mapping[str, float]) -> float:
    """``(5 mAP + sum(1 - min(1, error))) / (5 + len(errors))``: nuScenes' NDS over the given TP errors."""
    scores = [1.0 - min(1.0, e) for e in errors.values()]
    return (MAP_WEIGHT * mean_ap + sum(scores)) / (MAP_WEIGHT + len(scores))


def select(det: Detections, label: int, limit: float | None, min_points: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One class's boxes (``K x 7``) and scores (ones for ground truth) of a sample, after the range/point filters."""
    boxes = box_array(det["boxes"])
    keep = as_array(det["labels"], np.int64).reshape(-1) == label
    if limit is not None:
        keep &= np.linalg.norm(boxes[:, :2], axis=1) < limit
    if min_points > 0 and "num_points" in det:
        keep &= as_array(det["num_points"], np.int64).reshape(-1) >= min_points
    scores = as_array(det["scores"]).reshape(-1) if "scores" in det else np.ones(len(boxes))
    return boxes[keep], scores[keep]


def class_range(max_range: float | Mapping[str, float] | None, name: str) -> float | None:
    if max_range is None or isinstance(max_range, int | float):
        return max_range
    return max_range.get(name)


def detection_metrics(
    predictions: Sequence[Detections],
    ground_truth: Sequence[Detections],
    classes: Sequence[str],
    *,
    dist_thresholds: Sequence[float] = DIST_THRESHOLDS,
    tp_threshold: float = TP_THRESHOLD,
    min_recall: float = 0.1,
    min_precision: float = 0.1,
    max_range: float | Mapping[str, float] | None = None,
    min_gt_points: int = 1,
    orientation_periods: Mapping[str, float] | None = None,
    no_orientation: Sequence[str] = NO_ORIENTATION_CLASSES,
    ignore_empty_classes: bool = True,
) -> dict[str, Any]:
    """nuScenes-style detection metrics (the protocol is in the module docstring).

    Args:
        predictions: per sample, ``{"boxes": K x 7, "scores": K, "labels": K}``.
        ground_truth: per sample (aligned with ``predictions``), ``{"boxes": M x 7, "labels": M}`` and optionally
            ``"num_points": M``.
        classes: class names in label order.
        dist_thresholds: centre-distance thresholds (m) for AP.
        tp_threshold: the threshold at which TP errors are measured.
        min_recall, min_precision: the AP and TP-error clipping of nuScenes.
        max_range: keep only boxes (both sides) whose BEV centre is nearer to the ego; a float or per-class map.
        min_gt_points: drop ground truth with fewer LiDAR points (only where it carries ``num_points``).
        orientation_periods: per class, the yaw period for AOE (default 2 pi; ``barrier`` pi unless given here).
        no_orientation: classes without AOE (default ``traffic_cone``, as in the devkit).
        ignore_empty_classes: leave classes without ground truth out of the means (else AP 0 and errors 1).

    Returns:
        ``{"mAP", "NDS", "mATE", "mASE", "mAOE", "AP@0.5", ..., "nds_tp_errors": ["ATE", "ASE", "AOE"],
        "nds_formula", "classes_without_gt", "samples", "per_class": {name: {"gt", "pred", "AP@0.5", ..., "AP",
        "ATE", "ASE", "AOE"}}, "protocol": {...}}``; the ``AP@t`` at the top level are means over classes.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} prediction samples but {len(ground_truth)} ground-truth samples")
    periods = {**DEFAULT_ORIENTATION_PERIODS, **(orientation_periods or {})}
    ap_keys = [f"AP@{t:g}" for t in dist_thresholds]
    per_class: dict[str, dict[str, Any]] = {}
    empty: list[str] = []
    for label, name in enumerate(classes):
        limit = class_range(max_range, name)
        preds = [select(p, label, limit) for p in predictions]
        gts = [select(g, label, limit, min_gt_points)[0] for g in ground_truth]
        row: dict[str, Any] = {"gt": sum(len(g) for g in gts), "pred": sum(len(b) for b, _ in preds)}
        if row["gt"] == 0:
            empty.append(name)
            if ignore_empty_classes:
                per_class[name] = {**row, **dict.fromkeys([*ap_keys, "AP", *TP_ERRORS])}
                continue
        pred_boxes, pred_scores = [b for b, _ in preds], [s for _, s in preds]
        period = periods.get(name, 2 * math.pi)
        curves = {t: accumulate(pred_boxes, pred_scores, gts, t, period) for t in {*dist_thresholds, tp_threshold}}
        aps = [average_precision(curves[t], min_recall, min_precision) for t in dist_thresholds]
        row.update(zip(ap_keys, aps, strict=True))
        row["AP"] = float(np.mean(aps))
        row.update({e: tp_error(curves[tp_threshold], e, min_recall) for e in TP_ERRORS})
        if name in no_orientation:
            row["AOE"] = None
        per_class[name] = row

    scored = [row for row in per_class.values() if row["AP"] is not None]
    mean_ap = float(np.mean([row["AP"] for row in scored])) if scored else 0.0
    errors = {e: mean_error([row[e] for row in scored]) for e in TP_ERRORS}
    return {
        "mAP": mean_ap,
        "NDS": nd_score(mean_ap, errors),
        **{f"m{e}": v for e, v in errors.items()},
        **{k: float(np.mean([row[k] for row in scored])) if scored else 0.0 for k in ap_keys},
        "nds_tp_errors": list(TP_ERRORS),
        "nds_formula": "(5 * mAP + sum(1 - min(1, mE) for E in ATE, ASE, AOE)) / 8 (no AVE/AAE: no velocity, "
                       "no attributes)",
        "classes_without_gt": empty,
        "samples": len(ground_truth),
        "per_class": per_class,
        "protocol": {"dist_thresholds": list(dist_thresholds), "tp_threshold": tp_threshold,
                     "min_recall": min_recall, "min_precision": min_precision, "max_range": max_range,
                     "min_gt_points": min_gt_points, "ignore_empty_classes": ignore_empty_classes,
                     "orientation_periods": periods, "no_orientation": list(no_orientation)},
    }


def mean_error(values: Sequence[float | None]) -> float:
    """Mean over the classes that have the error (``None``: undefined for the class); 1 when none has it."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else 1.0


# ------------------------------------------------------------------------------------------ nuScenes results JSON


def yaw_to_quaternion(yaw: float) -> list[float]:
    """``[w, x, y, z]`` of a rotation by ``yaw`` about +z."""
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def write_results(
    path: str | Path, predictions: Sequence[Detections], sample_tokens: Sequence[str], classes: Sequence[str],
    meta: Mapping[str, bool] | None = None,
) -> Path:
    """Write predictions in the nuScenes detection submission format (boxes in the ego frame, velocity 0).

    Args:
        path: the JSON file to write.
        predictions: per sample, ``{"boxes": K x 7, "scores": K, "labels": K}``; labels outside ``classes`` are
            skipped.
        sample_tokens: one per sample (the shards' ``__key__``), unique.
        classes: class names in label order (the ``detection_name`` values).
        meta: overrides of ``{"use_camera", "use_lidar", "use_radar", "use_map", "use_external"}`` (all False).
    """
    if len(predictions) != len(sample_tokens):
        raise ValueError(f"{len(predictions)} prediction samples but {len(sample_tokens)} sample tokens")
    if len(set(sample_tokens)) != len(sample_tokens):
        raise ValueError("sample tokens are not unique")
    results: dict[str, list[dict[str, Any]]] = {}
    for token, det in zip(sample_tokens, predictions, strict=True):
        boxes = box_array(det["boxes"])
        scores = as_array(det["scores"]).reshape(-1)
        labels = as_array(det["labels"], np.int64).reshape(-1)
        results[token] = [
            {"sample_token": token, "translation": box[:3].tolist(), "size": box[3:6].tolist(),
             "rotation": yaw_to_quaternion(float(box[6])), "velocity": [0.0, 0.0],
             "detection_name": classes[label], "detection_score": float(score), "attribute_name": ""}
            for box, score, label in zip(boxes, scores, labels, strict=True) if 0 <= label < len(classes)
        ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": {**NUSCENES_META, **(meta or {})}, "results": results}) + "\n")
    return out


def read_results(path: str | Path, classes: Sequence[str]) -> dict[str, dict[str, Tensor]]:
    """Predictions of a nuScenes results JSON, keyed by sample token: ``{"boxes" K x 7, "scores", "labels"}``.

    Boxes of a ``detection_name`` not in ``classes`` are dropped; ``rotation`` may be a quaternion or a yaw.
    """
    from xmodal.modalities.bev import yaw_of

    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path}: not a nuScenes results file (needs a 'results' object keyed by sample token)")
    index = {name: i for i, name in enumerate(classes)}
    out = {}
    for token, boxes in data["results"].items():
        try:
            kept = [b for b in boxes if b["detection_name"] in index]
            rows = [[*b["translation"], *b["size"], yaw_of(b["rotation"])] for b in kept]
            scores = [float(b["detection_score"]) for b in kept]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: sample {token!r} has a malformed box ({error!r})") from error
        out[token] = {"boxes": torch.tensor(rows, dtype=torch.float64).reshape(-1, 7),
                      "scores": torch.tensor(scores, dtype=torch.float64),
                      "labels": torch.tensor([index[b["detection_name"]] for b in kept], dtype=torch.int64)}
    return out


# --------------------------------------------------------------------------------------------------- BEV render

GT_COLOUR = (60, 220, 90)
PRED_COLOUR = (255, 70, 50)
RING_COLOUR = (70, 70, 84)
BACKGROUND = (16, 16, 22)
# height colour ramp for points: ground blue -> cyan -> yellow -> red at 3 m
HEIGHT_STOPS = np.array([-0.5, 0.5, 1.5, 3.0])
HEIGHT_COLOURS = np.array([[40, 90, 255], [0, 220, 230], [250, 230, 40], [255, 60, 40]], dtype=np.float64)


def point_colours(points: np.ndarray) -> np.ndarray:
    """uint8 ``N x 3``: hue from height, brightness from intensity (column 3, in [0, 1])."""
    rgb = np.stack([np.interp(points[:, 2], HEIGHT_STOPS, HEIGHT_COLOURS[:, c]) for c in range(3)], axis=1)
    intensity = np.clip(points[:, 3], 0.0, 1.0) if points.shape[1] > 3 else np.ones(len(points))
    return (rgb * (0.45 + 0.55 * intensity)[:, None]).astype(np.uint8)


def render_bev(
    points: Any, gt: Detections | None, pred: Detections | None, grid_range: Sequence[float], path: str | Path,
    *, score_threshold: float = 0.3, pixels_per_metre: float = 8.0, ring_step: float = 10.0,
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
        scores = as_array(det["scores"]).reshape(-1) if "scores" in det else np.ones(len(boxes))
        for box in boxes[scores >= score_threshold] if tick else boxes:
            corners = pixel(bev_corners(box))
            draw.polygon([tuple(c) for c in corners], outline=colour, width=2)
            if tick:
                front = corners[:2].mean(axis=0)
                draw.line([tuple(pixel(box[:2])), tuple(front)], fill=colour, width=2)

    # the ego: a white triangle pointing forward (+x, up)
    size = max(3.0, 1.2 * ppm)
    draw.polygon([(ego[0], ego[1] - size), (ego[0] - size / 2, ego[1] + size / 2),
                  (ego[0] + size / 2, ego[1] + size / 2)], fill=(255, 255, 255))
    bar = ring_step * ppm
    draw.line([(8, height - 10), (8 + bar, height - 10)], fill=(230, 230, 230), width=2)
    draw.text((8, height - 24), f"{ring_step:g} m", fill=(230, 230, 230))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out


# ---------------------------------------------------------------------------------------------------- evaluation


def batch_ground_truth(batch: Batch) -> list[dict[str, Tensor]]:
    """Per-sample ground truth ``{"boxes" M x 7, "labels" M, ["num_points" M]}`` of a BEV batch (CPU tensors)."""
    out = []
    for i, n in enumerate(batch["box_counts"].tolist()):
        gt = {"boxes": batch["boxes"][i, :n, :7].cpu(), "labels": batch["box_labels"][i, :n].cpu()}
        if "box_points" in batch:
            gt["num_points"] = batch["box_points"][i, :n].cpu()
        out.append(gt)
    return out


def render_name(token: str) -> str:
    return re.sub(r"[^\w.-]", "_", token) + ".png"


def collect(
    batches: Iterable[Batch], predict: Callable[[Batch], Sequence[Detections]], render: int = 0,
    render_dir: str | Path | None = None, grid_range: Sequence[float] = DEFAULT_GRID_RANGE,
    score_threshold: float = 0.3,
) -> tuple[list[Detections], list[Detections], list[str], list[str]]:
    """Predictions, ground truth, sample tokens and the renders of the first ``render`` samples, over ``batches``."""
    if render > 0 and render_dir is None:
        raise ValueError("render_dir is needed to render samples")
    preds: list[Detections] = []
    truths: list[Detections] = []
    tokens: list[str] = []
    renders: list[str] = []
    for batch in tqdm(batches, desc="bev eval", unit="batch", disable=None):
        gts = batch_ground_truth(batch)
        keys = list(batch.get("__key__") or [f"sample{len(tokens) + i}" for i in range(len(gts))])
        detections = list(predict(batch))
        if len(detections) != len(gts):
            raise ValueError(f"the detector returned {len(detections)} predictions for a batch of {len(gts)}")
        for i, (det, gt) in enumerate(zip(detections, gts, strict=True)):
            if len(renders) < render:
                points = batch["lidar"][i, : int(batch["lidar_counts"][i])] if "lidar" in batch else None
                path = Path(cast(str | Path, render_dir)) / render_name(keys[i])
                renders.append(str(render_bev(points, gt, det, grid_range, path, score_threshold=score_threshold)))
        preds += detections
        truths += gts
        tokens += keys
    return preds, truths, tokens, renders


def evaluate_bev(
    model: Detector,
    loader: Iterable[Batch],
    classes: Sequence[str],
    *,
    device: str | torch.device | None = None,
    modalities: Sequence[Modality] = (),
    results_path: str | Path | None = None,
    results_meta: Mapping[str, bool] | None = None,
    render: int = 0,
    render_dir: str | Path | None = None,
    grid_range: Sequence[float] = DEFAULT_GRID_RANGE,
    score_threshold: float = 0.3,
    **metric_options: Any,
) -> dict[str, Any]:
    """nuScenes-style metrics of a detector (``model.predict(batch)``, see :class:`Detector`) over a BEV loader.

    Args:
        model: an ``nn.Module`` is put in eval mode (and moved to ``device``) for the run, then restored.
        loader: yields BEV batches (:class:`~xmodal.modalities.bev.BEVModality` fields and ``__key__``).
        classes: class names in label order.
        device: where to run; ``None`` keeps the model where it is.
        modalities: plug-ins whose ``on_device`` runs on each batch after the move (uint8 camera -> float).
        results_path: also write the predictions there as a nuScenes results JSON (``results_meta`` its meta).
        render: render the first ``render`` samples as PNG into ``render_dir`` (see :func:`render_bev`).
        grid_range, score_threshold: the renders' extent and the lowest score of a drawn prediction.
        metric_options: keyword arguments of :func:`detection_metrics`.

    Returns:
        :func:`detection_metrics`' dict, plus ``results_json`` and ``renders`` (paths) when written.
    """
    from xmodal.data.wds import move_batch, prepare_on_device

    with evaluating(cast(Any, model), device) as dev, torch.inference_mode():

        def predict(batch: Batch) -> list[Detections]:
            outputs = model.predict(prepare_on_device(move_batch(batch, dev), modalities, train=False))
            return [{k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in det.items()} for det in outputs]

        preds, truths, tokens, renders = collect(loader, predict, render, render_dir, grid_range, score_threshold)
    metrics = detection_metrics(preds, truths, classes, **metric_options)
    if results_path is not None:
        metrics["results_json"] = str(write_results(results_path, preds, tokens, classes, results_meta))
    if renders:
        metrics["renders"] = renders
    return metrics


def evaluate_results(
    results: Mapping[str, Detections],
    loader: Iterable[Batch],
    classes: Sequence[str],
    *,
    render: int = 0,
    render_dir: str | Path | None = None,
    grid_range: Sequence[float] = DEFAULT_GRID_RANGE,
    score_threshold: float = 0.3,
    **metric_options: Any,
) -> dict[str, Any]:
    """Metrics of stored predictions (:func:`read_results`' dict) against the ground truth of a BEV loader.

    Samples missing from ``results`` count as having no prediction (``samples_without_results`` says how many);
    results for a sample token the loader does not have raise ``ValueError`` (a wrong split, most likely).
    """
    empty = {"boxes": torch.zeros(0, 7), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}

    def predict(batch: Batch) -> list[Detections]:
        return [results.get(key, empty) for key in batch["__key__"]]

    preds, truths, tokens, renders = collect(loader, predict, render, render_dir, grid_range, score_threshold)
    unknown = sorted(set(results) - set(tokens))
    if unknown:
        raise ValueError(f"{len(unknown)} sample tokens of the results are not in the ground truth, e.g. "
                         f"{unknown[:3]}")
    metrics = detection_metrics(preds, truths, classes, **metric_options)
    metrics["samples_without_results"] = sum(token not in results for token in tokens)
    if renders:
        metrics["renders"] = renders
    return metrics


# ------------------------------------------------------------------------------------------- recipes and loaders


def recipe_bev_args(config: str | Path) -> dict[str, Any]:
    """``init_args`` of the BEVModality in a recipe's ``data.modalities`` (empty when there is none)."""
    import yaml

    data = yaml.safe_load(Path(config).read_text()) or {}
    for entry in (data.get("data") or {}).get("modalities") or []:
        if isinstance(entry, dict) and str(entry.get("class_path", "")).endswith("BEVModality"):
            return dict(entry.get("init_args") or {})
    return {}


def detector_traits(model: Any) -> tuple[list[str] | None, list[float] | None, list[str]]:
    """Class names, BEV extent and sensors of a detector that says them (``grid.classes``, ``grid.x_range``,
    ``grid.y_range``, ``inputs`` as :class:`~xmodal.students.bev.BEVDetector` has); ``None`` / ``[]`` otherwise."""
    net = getattr(model, "detector", model)  # a BEVTeacher wraps its detector
    inputs, grid = getattr(net, "inputs", None), getattr(net, "grid", None)
    classes = getattr(grid, "classes", None)
    x, y = getattr(grid, "x_range", None), getattr(grid, "y_range", None)
    extent = [float(x[0]), float(y[0]), float(x[1]), float(y[1])] if x is not None and y is not None else None
    sensors = {"lidar": ["lidar"], "camera": ["camera"], "fusion": ["camera", "lidar"]}.get(str(inputs), [])
    return (list(classes) if classes is not None else None), extent, sensors


def bev_loader(pattern: str, modality: Modality, batch_size: int, num_workers: int) -> CountedBatches:
    """An in-order loader of BEV batches from shards (corrupt samples skipped and counted)."""
    from torch.utils.data import DataLoader

    from xmodal.data.wds import CountedBatches, make_pipeline

    pipeline = make_pipeline(pattern, [modality], batch_size, train=False)
    return CountedBatches(DataLoader(pipeline, batch_size=None, num_workers=num_workers), pattern)


def format_bev_table(results: Mapping[str, Any]) -> str:
    """The summary numbers, then one row per class."""
    metrics = results["metrics"]
    ap_keys = [f"AP@{t:g}" for t in metrics["protocol"]["dist_thresholds"]]
    lines = [f"bev  model={results['model']}  data={results['dataset']}  samples={metrics['samples']}"]
    lines += [f"  {key:<6} {metrics[key]:.4f}" for key in ("mAP", "NDS", *[f"m{e}" for e in TP_ERRORS])]
    columns = ["gt", "pred", *ap_keys, *TP_ERRORS]
    lines.append(f"  {'class':<12}" + "".join(f"{c:>8}" for c in columns))
    for name, row in metrics["per_class"].items():
        cells = [f"{row[c]:>8}" if isinstance(row[c], int) else f"{row[c]:>8.3f}" if row[c] is not None
                 else f"{'-':>8}" for c in columns]
        lines.append(f"  {name:<12}" + "".join(cells))
    return "\n".join(lines)

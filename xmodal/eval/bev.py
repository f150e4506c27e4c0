"""BEV 3D detection evaluation: the nuScenes detection protocol (AP, TP errors, NDS) and its results JSON.

The metric is :class:`xmodal.eval.metrics.DetectionMAP`, the loops :func:`xmodal.eval.loops.evaluate_bev` and
:func:`~xmodal.eval.loops.evaluate_results`, the renders :mod:`xmodal.render`; the command is ``xmodal eval bev``
(:mod:`xmodal.commands.eval_bev`).

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from xmodal.contracts import Batch

DIST_THRESHOLDS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
TP_THRESHOLD = 2.0
TP_ERRORS: tuple[str, ...] = ("ATE", "ASE", "AOE")
DEFAULT_ORIENTATION_PERIODS: dict[str, float] = {"barrier": math.pi}
NO_ORIENTATION_CLASSES: tuple[str, ...] = ("traffic_cone",)
MAP_WEIGHT = 5.0
RECALL = np.linspace(0.0, 1.0, 101)
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


# ------------------------------------------------------------------------------------------------ ground truth


def batch_ground_truth(batch: Batch) -> list[dict[str, Tensor]]:
    """Per-sample ground truth ``{"boxes" M x 7, "labels" M, ["num_points" M]}`` of a BEV batch (CPU tensors)."""
    out = []
    for i, n in enumerate(batch["box_counts"].tolist()):
        gt = {"boxes": batch["boxes"][i, :n, :7].cpu(), "labels": batch["box_labels"][i, :n].cpu()}
        if "box_points" in batch:
            gt["num_points"] = batch["box_points"][i, :n].cpu()
        out.append(gt)
    return out

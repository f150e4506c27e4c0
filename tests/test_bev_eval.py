"""``xmodal.eval.bev``: nuScenes-style AP / TP errors / NDS on hand-made boxes, results JSON, renders and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.commands import eval_bev
from xmodal.commands.eval import eval_main
from xmodal.data.shards import write_shards
from xmodal.eval import bev
from xmodal.eval.bev import accumulate, detection_metrics, read_results, size_iou, write_results, yaw_difference
from xmodal.render import BACKGROUND, GT_COLOUR, PRED_COLOUR, render_bev

CLASSES = ["car", "pedestrian"]


def box(x: float, y: float, w: float = 2.0, length: float = 4.0, h: float = 1.5, yaw: float = 0.0) -> list[float]:
    return [x, y, h / 2, w, length, h, yaw]


def dets(boxes: list[list[float]], labels: list[int] | None = None, scores: list[float] | None = None) -> dict:
    out = {"boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 7),
           "labels": torch.tensor(labels if labels is not None else [0] * len(boxes), dtype=torch.int64)}
    if scores is not None:
        out["scores"] = torch.tensor(scores, dtype=torch.float64)
    return out


def one_class(preds: list[list[float]], scores: list[float], gts: list[list[float]], **options: Any) -> dict:
    return detection_metrics([dets(preds, scores=scores)], [dets(gts)], ["car"], **options)


def test_perfect_predictions_score_one() -> None:
    gts = [dets([box(0, 0), box(10, 5, yaw=1.0), box(-3, 8, 0.6, 0.8, 1.7)], [0, 0, 1]), dets([box(20, -4)], [0])]
    preds = [{**g, "scores": torch.linspace(0.9, 0.5, len(g["labels"]))} for g in gts]
    metrics = detection_metrics(preds, gts, CLASSES)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["NDS"] == pytest.approx(1.0)
    assert all(metrics[f"AP@{t}"] == pytest.approx(1.0) for t in ("0.5", "1", "2", "4"))
    assert [metrics[k] for k in ("mATE", "mASE", "mAOE")] == pytest.approx([0, 0, 0], abs=1e-9)
    assert metrics["nds_tp_errors"] == ["ATE", "ASE", "AOE"] and metrics["samples"] == 2
    assert metrics["per_class"]["car"]["gt"] == 3 and metrics["per_class"]["pedestrian"]["pred"] == 1


def test_ap_by_hand_with_interpolation() -> None:
    # 2 GT; in score order: TP, FP, TP -> (recall, precision) = (.5, 1), (.5, .5), (1, 2/3)
    metrics = one_class([box(0, 0), box(-10, 0), box(10, 0)], [0.9, 0.8, 0.7], [box(0, 0), box(10, 0)])
    curve = accumulate([np.array([box(0, 0), box(-10, 0), box(10, 0)])], [np.array([0.9, 0.8, 0.7])],
                       [np.array([box(0, 0), box(10, 0)])], threshold=2.0)
    # precision at the 101 recall points: 1 below recall .5, .5 at .5, then linear up to 2/3 at recall 1
    assert curve.precision[[30, 50, 80, 100]] == pytest.approx([1.0, 0.5, 0.6, 2 / 3])
    # mean over recall .11 ... 1 of (precision - .1), over .9: 39 points at .9, one at .4, and
    # sum_{k=51..100} (.4 + (k/100 - .5) / 3) = 20 + 4.25
    expected = (39 * 0.9 + 0.4 + 24.25) / 90 / 0.9
    assert metrics["per_class"]["car"]["AP@2"] == pytest.approx(expected)
    assert metrics["mAP"] == pytest.approx(expected)


def test_precision_below_min_precision_gives_zero_ap() -> None:
    # 19 false positives outrank the only true positive: precision never exceeds 1/20 < 0.1
    preds = [box(30 + 5 * i, 0) for i in range(19)] + [box(0, 0)]
    scores = [0.99 - 0.01 * i for i in range(19)] + [0.5]
    metrics = one_class(preds, scores, [box(0, 0)])
    car = metrics["per_class"]["car"]
    assert car["AP"] == 0.0 and metrics["mAP"] == 0.0
    assert car["ATE"] == pytest.approx(0.0)  # recall 1 is reached: the TP errors still count


def test_recall_at_most_min_recall_gives_zero_ap_and_unit_errors() -> None:
    gts = [box(10 * i, 0) for i in range(10)]
    metrics = one_class([box(0, 0)], [0.9], gts)  # recall 0.1 exactly: nothing above min_recall
    car = metrics["per_class"]["car"]
    assert car["AP"] == 0.0 and [car[e] for e in ("ATE", "ASE", "AOE")] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("offset, hits", [(1.5, [0, 0, 1, 1]), (1.0, [0, 0, 1, 1]), (0.3, [1, 1, 1, 1])])
def test_distance_thresholds(offset: float, hits: list[int]) -> None:
    metrics = one_class([box(5, 5 + offset)], [0.8], [box(5, 5)])
    car = metrics["per_class"]["car"]
    assert [car[f"AP@{t}"] for t in ("0.5", "1", "2", "4")] == pytest.approx(hits)  # a match needs distance < t
    assert car["ATE"] == pytest.approx(offset)


def test_nds_formula_clips_errors_at_one() -> None:
    metrics = one_class([box(1.5, 0)], [0.8], [box(0, 0)])  # AP 0,0,1,1 -> mAP .5; ATE 1.5 -> score 0
    assert metrics["mAP"] == pytest.approx(0.5) and metrics["mATE"] == pytest.approx(1.5)
    assert metrics["NDS"] == pytest.approx((5 * 0.5 + 0 + 1 + 1) / 8)
    assert bev.nd_score(0.4, {"ATE": 0.2, "ASE": 0.3, "AOE": 2.0}) == pytest.approx((2.0 + 0.8 + 0.7 + 0) / 8)


def test_tp_errors_are_cumulative_means_over_recall() -> None:
    # 2 TPs: ATE 0 at score .9 (recall .5), ATE 1 at score .8 (recall 1). Between them the running mean (0, then .5)
    # is interpolated through the confidence: error(recall .5 + t/2) = t/2, so the mean over recall .11 ... 1 is
    # sum_{j=1..50} j/100 / 90.
    metrics = one_class([box(0, 0), box(11, 0)], [0.9, 0.8], [box(0, 0), box(10, 0)])
    assert metrics["per_class"]["car"]["ATE"] == pytest.approx(12.75 / 90)


def test_ase_for_a_known_size_mismatch() -> None:
    assert size_iou(np.array([2.0, 4.0, 1.0]), np.array([1.0, 5.0, 1.0])) == pytest.approx(4 / 9)
    metrics = one_class([box(0, 0, 2, 4, 3)], [0.9], [box(0, 0, 2, 4, 1.5)])  # IoU 12 / 24
    assert metrics["per_class"]["car"]["ASE"] == pytest.approx(0.5)


def test_aoe_wraps_around() -> None:
    assert yaw_difference(3.1, -3.1) == pytest.approx(2 * math.pi - 6.2)
    assert yaw_difference(0.0, math.pi, period=math.pi) == pytest.approx(0.0)
    assert yaw_difference(0.0, math.pi) == pytest.approx(math.pi)
    metrics = one_class([box(0, 0, yaw=-3.1)], [0.9], [box(0, 0, yaw=3.1)])
    assert metrics["mAOE"] == pytest.approx(2 * math.pi - 6.2)
    flipped = one_class([box(0, 0, yaw=0.2 + math.pi)], [0.9], [box(0, 0, yaw=0.2)],
                        orientation_periods={"car": math.pi})
    assert flipped["mAOE"] == pytest.approx(0.0, abs=1e-9)


def test_devkit_orientation_defaults_for_barrier_and_traffic_cone() -> None:
    classes = ["barrier", "traffic_cone", "car"]
    gts = [dets([box(0, 0, yaw=0.2), box(5, 5, yaw=0.0), box(-6, 3, yaw=0.3)], [0, 1, 2])]
    preds = [dets([box(0, 0, yaw=0.2 + math.pi), box(5, 5, yaw=2.0), box(-6, 3, yaw=0.8)], [0, 1, 2],
                  [0.9, 0.9, 0.9])]
    metrics = detection_metrics(preds, gts, classes)
    per_class = metrics["per_class"]
    assert per_class["barrier"]["AOE"] == pytest.approx(0.0, abs=1e-9)  # a barrier looks the same turned by pi
    assert per_class["traffic_cone"]["AOE"] is None  # a cone has no orientation
    assert metrics["mAOE"] == pytest.approx((0.0 + 0.5) / 2)  # the mean over the two classes that have AOE
    full_turn = detection_metrics(preds, gts, classes, orientation_periods={"barrier": 2 * math.pi},
                                  no_orientation=())
    assert full_turn["per_class"]["barrier"]["AOE"] == pytest.approx(math.pi)
    assert full_turn["per_class"]["traffic_cone"]["AOE"] == pytest.approx(2.0)


def test_yaw_of_normalises_quaternions() -> None:
    from xmodal.modalities.bev import yaw_of

    for yaw in (-2.9, -0.4, 0.0, 1.3, 3.0):
        w, z = math.cos(yaw / 2), math.sin(yaw / 2)
        assert yaw_of([round(w, 6), 0.0, 0.0, round(z, 6)]) == pytest.approx(math.atan2(round(z, 6), round(w, 6)) * 2,
                                                                             abs=1e-12)
        assert yaw_of([2.5 * w, 0.0, 0.0, 2.5 * z]) == pytest.approx(yaw, abs=1e-12)
    with pytest.raises(ValueError, match="zero norm"):
        yaw_of([0.0, 0.0, 0.0, 0.0])


def test_no_predictions() -> None:
    metrics = detection_metrics([dets([], scores=[])], [dets([box(0, 0)])], ["car"])
    assert metrics["mAP"] == 0.0 and metrics["NDS"] == 0.0
    assert [metrics[k] for k in ("mATE", "mASE", "mAOE")] == [1.0, 1.0, 1.0]


def test_classes_without_ground_truth() -> None:
    gts = [dets([box(0, 0)], [0])]
    preds = [dets([box(0, 0), box(9, 9)], [0, 1], [0.9, 0.9])]  # a pedestrian where there is none
    skipped = detection_metrics(preds, gts, CLASSES)
    assert skipped["classes_without_gt"] == ["pedestrian"] and skipped["mAP"] == pytest.approx(1.0)
    assert skipped["per_class"]["pedestrian"]["AP"] is None and skipped["per_class"]["pedestrian"]["pred"] == 1
    devkit = detection_metrics(preds, gts, CLASSES, ignore_empty_classes=False)
    assert devkit["mAP"] == pytest.approx(0.5) and devkit["mATE"] == pytest.approx(0.5)
    nothing = detection_metrics([dets([], scores=[])], [dets([])], CLASSES)
    assert nothing["mAP"] == 0.0 and nothing["NDS"] == 0.0


def test_range_and_point_filters() -> None:
    gts = [dets([box(0, 0), box(45, 0)])]
    preds = [dets([box(0, 0)], scores=[0.9])]
    assert detection_metrics(preds, gts, ["car"])["per_class"]["car"]["gt"] == 2
    near = detection_metrics(preds, gts, ["car"], max_range={"car": 40.0})
    assert near["per_class"]["car"]["gt"] == 1 and near["mAP"] == pytest.approx(1.0)
    gts[0]["num_points"] = torch.tensor([12, 0])
    assert detection_metrics(preds, gts, ["car"])["mAP"] == pytest.approx(1.0)
    assert detection_metrics(preds, gts, ["car"], min_gt_points=0)["per_class"]["car"]["gt"] == 2


def test_results_json_round_trip(tmp_path: Path) -> None:
    preds = [dets([box(1, 2, yaw=0.5), box(-3, 4, 0.7, 0.9, 1.8, yaw=-2.5)], [0, 1], [0.9, 0.4]), dets([], scores=[])]
    path = write_results(tmp_path / "results.json", preds, ["tok0", "tok1"], CLASSES, meta={"use_lidar": True})
    data = json.loads(path.read_text())
    assert data["meta"] == {"use_camera": False, "use_lidar": True, "use_radar": False, "use_map": False,
                            "use_external": False}
    first = data["results"]["tok0"][0]
    assert set(first) == {"sample_token", "translation", "size", "rotation", "velocity", "detection_name",
                          "detection_score", "attribute_name"}
    assert first["rotation"] == pytest.approx([math.cos(0.25), 0, 0, math.sin(0.25)])
    assert first["size"] == [2.0, 4.0, 1.5] and first["velocity"] == [0.0, 0.0] and first["attribute_name"] == ""
    assert data["results"]["tok1"] == []
    back = read_results(path, CLASSES)
    assert back["tok0"]["boxes"].dtype == torch.float64 and back["tok0"]["scores"].dtype == torch.float64
    for token, pred in zip(["tok0", "tok1"], preds, strict=True):
        assert torch.allclose(back[token]["boxes"].double(), pred["boxes"], atol=1e-6)
        assert torch.allclose(back[token]["scores"].double(), pred["scores"], atol=1e-6)
        assert torch.equal(back[token]["labels"], pred["labels"])
    only_peds = read_results(path, ["pedestrian"])["tok0"]
    assert only_peds["labels"].tolist() == [0] and only_peds["boxes"][0, 0] == pytest.approx(-3)
    (tmp_path / "bad.json").write_text('{"meta": {}}')
    with pytest.raises(ValueError, match="results"):
        read_results(tmp_path / "bad.json", CLASSES)


def test_render_draws_gt_predictions_and_points(tmp_path: Path) -> None:
    points = torch.tensor([[-5.0, -5.0, 0.0, 1.0]])
    gt = dets([box(5, 2)])  # length along x: front edge at x = 7, y in [1, 3]
    pred = dets([box(-5, 5), box(-5, -2)], scores=[0.9, 0.1])  # the second is below the score threshold
    path = render_bev(points, gt, pred, (-10, -10, 10, 10), tmp_path / "bev.png", pixels_per_metre=10)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (200, 200, 3)  # (x_max - x_min) * 10 rows, (y_max - y_min) * 10 columns

    def has(colour: tuple[int, int, int], rows: slice, cols: slice) -> bool:
        return bool((image[rows, cols] == colour).all(axis=-1).any())

    # x up, y left: row = (10 - x) * 10, column = (10 - y) * 10
    assert has(GT_COLOUR, slice(28, 33), slice(75, 86))  # front edge of the GT box
    assert has(PRED_COLOUR, slice(125, 136), slice(40, 61))  # the kept prediction's heading tick / box
    assert not has(PRED_COLOUR, slice(100, 200), slice(100, 200))  # the low-score one is not drawn
    assert tuple(image[150, 150]) != BACKGROUND  # the LiDAR point at (-5, -5)


def test_render_labels_boxes_with_class_and_score_and_has_a_legend(tmp_path: Path) -> None:
    def render(name: str, classes: list[str], score: float) -> np.ndarray:
        pred = dets([box(-5, 5)], scores=[score])  # box columns 40-60, rows 130-170; its label above
        path = render_bev(None, None, pred, (-10, -10, 10, 10), tmp_path / name, pixels_per_metre=10,
                          classes=classes)
        return np.asarray(Image.open(path).convert("RGB"))

    car, truck = render("a.png", ["car"], 0.9), render("b.png", ["truck"], 0.9)
    car_lower = render("c.png", ["car"], 0.5)
    label = (slice(110, 130), slice(60, 140))
    reddish = np.abs(car[label].astype(int) - PRED_COLOUR).sum(axis=-1) < 90  # anti-aliased text in the box's colour
    assert reddish.any()
    assert not np.array_equal(car[label], truck[label]) and not np.array_equal(car[label], car_lower[label])
    outside = np.ones(car.shape[:2], bool)
    outside[label] = False
    assert np.array_equal(car[outside], truck[outside])  # only the label changes with the class
    legend = car[:30, :20]
    assert (legend == GT_COLOUR).all(axis=-1).any() and (legend == PRED_COLOUR).all(axis=-1).any()


# ------------------------------------------------------------------------------------------------------------ CLI

SCENES = [
    [("car", box(5, 2)), ("pedestrian", box(-4, 6, 0.6, 0.8, 1.7)), ("truck", box(20, -10, 2.5, 8, 3))],
    [("car", box(-12, -3, yaw=1.2))],
    [],
]


def write_scenes(folder: Path) -> str:
    rng = np.random.default_rng(0)
    samples = []
    for i, scene in enumerate(SCENES):
        boxes = [{"translation": b[:3], "size": b[3:6], "rotation": b[6], "class": name, "num_lidar_pts": 10}
                 for name, b in scene]
        points = np.concatenate([rng.uniform(-30, 30, (50, 2)), rng.uniform(0, 2, (50, 2))], 1).astype(np.float32)
        samples.append({"__key__": f"scene{i:02d}", "lidar.npy": points, "json": {"cameras": [], "boxes": boxes}})
    return str(write_shards(samples, folder, "test")[0])


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_scenes(tmp_path_factory.mktemp("bev"))


def scene_predictions(shift: float) -> list[dict]:
    """Perfect boxes for the cars and pedestrians, the first car moved ``shift`` m along x."""
    out = []
    for i, scene in enumerate(SCENES):
        kept = [(CLASSES.index(name), b) for name, b in scene if name in CLASSES]
        boxes = [[b[0] + (shift if i == 0 and label == 0 else 0), *b[1:]] for label, b in kept]
        out.append(dets(boxes, [label for label, _ in kept], [0.9] * len(kept)))
    return out


def test_cli_scores_a_results_json(shards: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds = scene_predictions(shift=1.5)
    tokens = [f"scene{i:02d}" for i in range(len(SCENES))]
    results = write_results(tmp_path / "results.json", preds, tokens, CLASSES)
    out = tmp_path / "metrics.json"
    eval_main(["bev", "--results", str(results), "--shards", shards, "--classes", *CLASSES, "--render", "2",
               "--render-dir", str(tmp_path / "renders"), "--out", str(out)])
    assert "mAP" in capsys.readouterr().out
    metrics = json.loads(out.read_text())["metrics"]
    truths = [dets([b for name, b in s if name in CLASSES], [CLASSES.index(n) for n, _ in s if n in CLASSES])
              for s in SCENES]
    direct = detection_metrics(preds, truths, CLASSES)
    for key in ("mAP", "NDS", "mATE", "mASE", "mAOE"):  # the shards' boxes are float32, the results' float64
        assert metrics[key] == pytest.approx(direct[key], abs=1e-6)
    car = metrics["per_class"]["car"]
    assert car["AP@2"] == pytest.approx(1.0) and car["AP@1"] < 0.9
    assert metrics["per_class"]["pedestrian"]["AP"] == pytest.approx(1.0)
    assert metrics["samples"] == 3 and metrics["samples_without_results"] == 0
    assert [Path(p).name for p in metrics["renders"]] == ["scene00.png", "scene01.png"]
    assert Image.open(metrics["renders"][0]).size == (512, 512)  # 64 m at 8 px/m


class GroundTruthDetector:
    """Predicts the batch's own ground truth: a perfect LiDAR detector for the model path of the CLI."""

    inputs = "lidar"
    grid = SimpleNamespace(classes=("car", "truck"), x_range=(-20.0, 20.0), y_range=(-25.0, 25.0))

    def predict(self, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        counts = batch["box_counts"].tolist()
        return [{"boxes": batch["boxes"][i, :n, :7], "scores": torch.ones(n), "labels": batch["box_labels"][i, :n]}
                for i, n in enumerate(counts)]


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Replace the detector loader by one that records its arguments and returns a :class:`GroundTruthDetector`."""
    calls: list[tuple] = []

    def fake_loader(*args: Any) -> GroundTruthDetector:
        calls.append(args)
        return GroundTruthDetector()

    monkeypatch.setattr(eval_bev, "load_detector", fake_loader)
    return calls


def test_cli_scores_a_recipe_model(shards: str, tmp_path: Path, loaded: list[tuple]) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text("data:\n  modalities:\n    - class_path: BEVModality\n"
                      "      init_args: {classes: [car, pedestrian], cameras: false}\n")
    out, written = tmp_path / "metrics.json", tmp_path / "preds.json"
    eval_main(["bev", "--config", str(config), "--checkpoint", "last.ckpt", "--part", "teacher", "--shards", shards,
               "--device", "cpu", "--write-results", str(written), "--out", str(out)])
    assert loaded == [(None, str(config), "last.ckpt", "teacher")]
    results = json.loads(out.read_text())
    assert results["classes"] == CLASSES  # the recipe's, not the model's
    assert results["metrics"]["mAP"] == pytest.approx(1.0) and results["metrics"]["NDS"] == pytest.approx(1.0)
    assert json.loads(written.read_text())["meta"]["use_lidar"] is True  # from the model's inputs
    assert read_results(written, CLASSES)["scene00"]["labels"].tolist() == [0, 1]


def test_cli_scores_an_exported_model(shards: str, tmp_path: Path, loaded: list[tuple]) -> None:
    out = tmp_path / "metrics.json"
    eval_main(["bev", "--model", "runs/models/x", "--shards", shards, "--render", "1", "--render-dir",
               str(tmp_path), "--out", str(out)])
    assert loaded == [("runs/models/x", None, None, "student")]
    results = json.loads(out.read_text())
    assert results["classes"] == ["car", "truck"]  # the model's grid classes; its inputs: LiDAR, no cameras decoded
    assert results["metrics"]["mAP"] == pytest.approx(1.0) and results["metrics"]["samples"] == 3
    assert Image.open(results["metrics"]["renders"][0]).size == (400, 320)  # the model's 50 x 40 m grid, 8 px/m


def test_cli_rejects_bad_flags(shards: str, tmp_path: Path) -> None:
    for flags in (["--results", "r.json", "--render", "2"], ["--results", "r.json", "--checkpoint", "c.ckpt"],
                  ["--model", "m", "--checkpoint", "c.ckpt"], []):
        with pytest.raises(SystemExit) as exit_info:
            eval_main(["bev", "--shards", shards, *flags])
        assert exit_info.value.code == 2
    (tmp_path / "other.json").write_text(json.dumps({"meta": {}, "results": {"elsewhere": []}}))
    with pytest.raises(SystemExit, match="not in the ground truth"):
        eval_main(["bev", "--results", str(tmp_path / "other.json"), "--shards", shards])

"""BEV losses against hand-computed values: keypoint geometry, Gaussian targets, the CenterPoint loss and
UniDistill's feature, relation and response distillation."""

from __future__ import annotations

import math

import pytest
import torch

from xmodal.losses.bev import (
    BEVDetectionLoss,
    UniDistillFeatureLoss,
    UniDistillRelationLoss,
    UniDistillResponseLoss,
    box_gaussian_mask,
    box_keypoints,
    encode_targets,
    focal_heatmap_loss,
    gaussian_radius,
    sample_keypoints,
)
from xmodal.modalities.bev_nets import BEVGrid

# 4 x 4 maps of 1 m cells over [-2, 2] m: metric x sits at continuous column (x + 2) - 0.5
SMALL = BEVGrid(x_range=(-2, 2), y_range=(-2, 2), z_range=(-1, 3), cell=1.0, stride=1, classes=("car",))
S3 = math.sqrt(3)


def boxes_batch(*scenes: list[list[float]]) -> dict[str, torch.Tensor]:
    """Boxes ``(x, y, z, w, l, h, yaw)`` per sample, all of class 0."""
    m = max(1, max(len(s) for s in scenes))
    boxes, labels = torch.zeros(len(scenes), m, 9), torch.full((len(scenes), m), -1)
    for i, scene in enumerate(scenes):
        for j, row in enumerate(scene):
            boxes[i, j, :7] = torch.tensor(row)
            labels[i, j] = 0
    return {"boxes": boxes, "box_counts": torch.tensor([len(s) for s in scenes]), "box_labels": labels}


def coordinate_maps() -> torch.Tensor:
    """``1 x 2 x 4 x 4``: channel 0 = column index, channel 1 = row index."""
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    return torch.stack([cols, rows])[None]


UNIT_BOX = [0.0, 0.0, 0.5, 2.0, 2.0, 1.0, 0.0]  # 2 m x 2 m at the origin: keypoints at x, y in {-1, 0, 1}


def test_keypoints_of_a_box_turned_90_degrees() -> None:
    points = box_keypoints(torch.tensor([1.0, 2.0, 0.0, 2.0, 4.0, 1.0, math.pi / 2]))
    expected = [(1, 2), (0, 4), (2, 4), (2, 0), (0, 0), (1, 4), (2, 2), (1, 0), (0, 2)]
    torch.testing.assert_close(points, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_keypoints_of_a_box_turned_30_degrees() -> None:
    points = box_keypoints(torch.tensor([[0.0, 0.0, 0.0, 2.0, 4.0, 1.0, math.pi / 6]]))
    expected = [(0, 0), (S3 - 0.5, 1 + S3 / 2), (S3 + 0.5, 1 - S3 / 2), (0.5 - S3, -1 - S3 / 2),
                (-0.5 - S3, S3 / 2 - 1), (S3, 1), (0.5, -S3 / 2), (-S3, -1), (-0.5, S3 / 2)]
    assert points.shape == (1, 9, 2)
    torch.testing.assert_close(points[0], torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_keypoints_map_to_feature_coordinates() -> None:
    grid = BEVGrid()
    torch.testing.assert_close(grid.to_normalized(torch.tensor([[-32.0, 32.0], [0.0, -31.5]])),
                               torch.tensor([[-1.0, 1.0], [0.0, -1 + 1 / 64]]))
    points = SMALL.to_normalized(box_keypoints(torch.tensor(UNIT_BOX)))[None, None]
    sampled = sample_keypoints(coordinate_maps(), points)[0, 0]  # 9 x 2: (column, row) of each keypoint
    expected = SMALL.to_cells(box_keypoints(torch.tensor(UNIT_BOX)), 1.0) - 0.5
    torch.testing.assert_close(sampled, expected)
    assert sampled[1].tolist() == [2.5, 2.5]  # front-left corner (1, 1) m


def test_gaussian_radius_and_heatmap_target() -> None:
    # l = 4, w = 2 cells, overlap 0.1: r1 = 4.567, r2 = 8.683, r3 = (-1.2 + sqrt(1.44 + 11.52)) / 2 = 1.2
    assert gaussian_radius(torch.tensor(4.0), torch.tensor(2.0), 0.1).item() == pytest.approx(1.2)
    grid = BEVGrid(x_range=(-8, 8), y_range=(-8, 8), cell=1.0, stride=1, classes=("car", "pedestrian"))
    batch = boxes_batch([[0.3, -0.6, 0.5, 2.0, 4.0, 1.0, 0.0]])
    targets = encode_targets(batch, grid, min_overlap=0.1, min_radius=2)  # radius max(2, floor(1.2)) = 2
    heat = targets.heatmap[0, 0]
    row, col = 7, 8  # y = -0.6 -> row 7.4; x = 0.3 -> column 8.3
    sigma2 = (5 / 6) ** 2
    assert heat[row, col] == 1 and heat.sum() > 1 and targets.heatmap[0, 1].sum() == 0
    assert heat[row, col + 1].item() == pytest.approx(math.exp(-1 / (2 * sigma2)))
    assert heat[row + 2, col - 2].item() == pytest.approx(math.exp(-8 / (2 * sigma2)))
    assert heat[row, col + 3] == 0 and heat[row + 3, col] == 0
    assert targets.index[0, 0] == row * 16 + col
    torch.testing.assert_close(targets.reg[0, 0], torch.tensor([0.3, 0.4, 0.5, math.log(2), math.log(4), 0, 0, 1]))


def test_focal_heatmap_loss_by_hand() -> None:
    logits = torch.tensor([0.0, 1.0, -2.0]).view(1, 1, 1, 3)
    target = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 1, 3)
    p1, p2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(2))
    expected = math.log(2) * 0.5**2 - math.log(1 - p1) * p1**2 * 0.5**4 - math.log(1 - p2) * p2**2
    assert focal_heatmap_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_detection_loss_by_hand() -> None:
    batch = boxes_batch([[0.3, -0.6, 0.5, 1.0, 2.0, 0.5, 0.0]])
    heatmap = torch.full((1, 1, 4, 4), -30.0)
    heatmap[0, 0, 1, 2] = 30.0  # the centre cell (row 1.4, column 2.3): focal loss ~ 0
    loss = BEVDetectionLoss(SMALL, reg_weight=0.5, min_radius=0)
    value = loss((heatmap, torch.zeros(1, 8, 4, 4)), None, batch)
    reg_l1 = 0.3 + 0.4 + 0.5 + 0.0 + 2 * math.log(2) + 0.0 + 1.0  # |dx|, |dy|, |z|, |log w, l, h|, |sin|, |cos|
    assert loss.last_metrics["reg"].item() == pytest.approx(reg_l1, rel=1e-5)
    assert value.item() == pytest.approx(0.5 * reg_l1, abs=1e-4)


def test_feature_loss_by_hand_and_objects_weigh_equally() -> None:
    # student = (column, row) maps, teacher = 0: the loss is the mean of |keypoint coordinates| (L1, the default)
    # or of their squares, whose columns and rows are each {1.5, 2.5, 2.5, 0.5, 0.5, 2.5, 1.5, 0.5, 1.5} up to
    # order (sum 13.5, sum of squares 26.25)
    loss = UniDistillFeatureLoss(SMALL)
    student = coordinate_maps().requires_grad_()
    value = loss(student, torch.zeros(1, 2, 4, 4), boxes_batch([UNIT_BOX]))
    assert value.item() == pytest.approx(2 * 13.5 / 18)
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    squared = UniDistillFeatureLoss(SMALL, distance="mse")(coordinate_maps(), torch.zeros(1, 2, 4, 4),
                                                           boxes_batch([UNIT_BOX]))
    assert squared.item() == pytest.approx(2 * 26.25 / 18)
    with pytest.raises(ValueError, match="distance"):
        UniDistillFeatureLoss(SMALL, distance="huber")  # type: ignore[arg-type]

    torch.manual_seed(0)
    s, t = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    small, large = [0.5, 0.5, 0.5, 0.4, 0.4, 1.0, 0.3], [-0.5, -0.5, 0.5, 3.0, 3.5, 1.0, 1.0]
    both = loss(s, t, boxes_batch([small, large]))
    one_each = (loss(s, t, boxes_batch([small])) + loss(s, t, boxes_batch([large]))) / 2
    torch.testing.assert_close(both, one_each)


def test_feature_loss_adapter_and_channel_mismatch() -> None:
    batch = boxes_batch([UNIT_BOX])
    with pytest.raises(ValueError, match="adapter"):
        UniDistillFeatureLoss(SMALL)(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4), batch)
    loss = UniDistillFeatureLoss(SMALL, student_channels=3, teacher_channels=2)
    assert isinstance(loss.adapter, torch.nn.Linear)
    with torch.no_grad():  # adapter = keep the first two channels: then the hand value above holds again
        loss.adapter.weight.copy_(torch.eye(2, 3))
        loss.adapter.bias.zero_()
    student = torch.cat([coordinate_maps(), torch.ones(1, 1, 4, 4)], 1)
    assert loss(student, torch.zeros(1, 2, 4, 4), batch).item() == pytest.approx(2 * 13.5 / 18)


def test_relation_loss_by_hand() -> None:
    # student features all point the same way: R_s = 1. Teacher features (1, y): with y in {0, 1, -1} (3 keypoints
    # each), cos = 1/sqrt(2) between y = 0 and y = +-1 (36 ordered pairs) and 0 between y = 1 and y = -1 (18 pairs)
    student = torch.zeros(1, 2, 4, 4)
    student[:, 0] = 1.0
    teacher = torch.stack([torch.ones(4, 4), coordinate_maps()[0, 1] - 1.5])[None]
    value = UniDistillRelationLoss(SMALL)(student, teacher, boxes_batch([UNIT_BOX]))
    assert value.item() == pytest.approx((36 * (1 - 1 / math.sqrt(2)) + 18) / 81, rel=1e-5)


def test_response_loss_at_keypoints_by_hand() -> None:
    # heatmaps: student p = 0.5, teacher p = 0.75 everywhere; regression: teacher channel 0 = column, the rest 0:
    # mean over 9 keypoints x 8 channels of |column| = (1.5 + 3 * 2.5 + 3 * 0.5 + 2 * 1.5) / 72 = 0.1875
    loss = UniDistillResponseLoss(SMALL, heatmap_weight=2.0, reg_weight=0.5, region="keypoints", teacher_temperature=1)
    teacher_reg = torch.zeros(1, 8, 4, 4)
    teacher_reg[:, 0] = coordinate_maps()[0, 0]
    s = (torch.zeros(1, 1, 4, 4), torch.zeros(1, 8, 4, 4))
    t = (torch.full((1, 1, 4, 4), math.log(3)), teacher_reg)
    value = loss(s, t, boxes_batch([UNIT_BOX]))
    assert loss.last_metrics["heatmap"].item() == pytest.approx(0.25)
    assert loss.last_metrics["reg"].item() == pytest.approx(0.1875)
    assert value.item() == pytest.approx(2.0 * 0.25 + 0.5 * 0.1875)


# 16 x 16 cells of 1 m over [-8, 8] m, two classes; metric x sits in column floor(x + 8)
WIDE = BEVGrid(x_range=(-8, 8), y_range=(-8, 8), z_range=(-1, 3), cell=1.0, stride=1, classes=("car", "pedestrian"))
# w = 4, l = 8 cells at overlap 0.7: r3 = (-16.8 + sqrt(16.8^2 + 4 * 2.8 * 9.6)) / 2 = 1.47 -> radius 1, sigma 0.5
RADIUS_1 = [0.3, -0.6, 0.5, 4.0, 8.0, 1.0, 0.0]  # centre cell: column 8, row 7
CAR = [-5.5, 4.2, 0.5, 1.9, 4.5, 1.5, 0.0]  # r3 = 0.74 -> radius 0: its centre cell (column 2, row 12) alone


def test_gaussian_mask_peak_radius_and_overlap() -> None:
    mask = box_gaussian_mask(boxes_batch([RADIUS_1, CAR], [], [RADIUS_1, [1.3, -0.6, 0.5, 4.0, 8.0, 1.0, 0.0]]), WIDE)
    first = mask[0]
    assert first[7, 8] == 1 and first[12, 2] == 1
    assert first[7, 9].item() == pytest.approx(math.exp(-2)) and first[6, 7].item() == pytest.approx(math.exp(-4))
    assert first[7, 10] == 0 and first[9, 8] == 0 and first[12, 3] == 0 and first[11, 2] == 0
    assert first.sum().item() == pytest.approx(2 + 4 * math.exp(-2) + 4 * math.exp(-4), rel=1e-5)
    assert mask[1].sum() == 0  # a sample without boxes
    assert mask[2][7, 8] == 1 and mask[2][7, 9] == 1  # neighbouring centres: the larger value wins
    assert mask[2][7, 10].item() == pytest.approx(math.exp(-2))


def test_response_loss_under_the_gaussian_mask_by_hand() -> None:
    # heatmaps: student p = 0.5 for both classes; teacher logits -5 (car) and 2 log 3 (pedestrian), softened by
    # the temperature 2: the highest teacher probability is sigmoid(log 3) = 0.75 in every cell, so |0.5 - 0.75|.
    # Regression: teacher channel 0 = column, the rest 0, student 0; a box at column 0 (radius 1) weighs column 0 by
    # (1 + 2 e^-2) and column 1 by e^-2 (1 + 2 e^-2), so the masked mean column is e^-2 / (1 + e^-2), over 8 channels
    loss = UniDistillResponseLoss(WIDE, heatmap_weight=2.0, reg_weight=3.0)
    teacher_heat = torch.stack([torch.full((16, 16), -5.0), torch.full((16, 16), 2 * math.log(3))])[None]
    teacher_reg = torch.zeros(1, 8, 16, 16)
    teacher_reg[:, 0] = torch.arange(16.0)
    student = (torch.zeros(1, 2, 16, 16, requires_grad=True), torch.zeros(1, 8, 16, 16, requires_grad=True))
    value = loss(student, (teacher_heat, teacher_reg), boxes_batch([[-7.7, 0.5, 0.5, 4.0, 8.0, 1.0, 0.0]]))
    reg_l1 = math.exp(-2) / (1 + math.exp(-2)) / 8
    assert loss.last_metrics["heatmap"].item() == pytest.approx(0.25, rel=1e-5)
    assert loss.last_metrics["reg"].item() == pytest.approx(reg_l1, rel=1e-5)
    assert value.item() == pytest.approx(2.0 * 0.25 + 3.0 * reg_l1, rel=1e-5)
    value.backward()
    grad = student[1].grad
    assert grad is not None and grad[0, :, 0, 9].abs().sum() == 0  # outside the mask: no gradient
    assert grad[0, 0, 8, 1] < 0  # next to the centre (row 8, column 0), channel 0 is pulled up toward the teacher's 1
    assert grad[0, 1:, 8, 1].abs().sum() == 0  # where student and teacher agree, L1 gives no gradient
    unsoftened = UniDistillResponseLoss(WIDE, teacher_temperature=1.0)
    unsoftened(student, (teacher_heat, teacher_reg), boxes_batch([RADIUS_1]))
    assert unsoftened.last_metrics["heatmap"].item() == pytest.approx(0.4, rel=1e-5)  # sigmoid(2 log 3) = 0.9


def test_batches_without_boxes_give_a_zero_that_backpropagates() -> None:
    empty = boxes_batch([], [])
    outside = boxes_batch([[50.0, 0.0, 0.5, 2.0, 4.0, 1.0, 0.0]])  # centre outside the grid: ignored
    for batch in (empty, outside):
        n = len(batch["box_counts"])
        feat = torch.randn(n, 2, 4, 4, requires_grad=True)
        head = (torch.randn(n, 1, 4, 4, requires_grad=True), torch.randn(n, 8, 4, 4, requires_grad=True))
        values = [
            UniDistillFeatureLoss(SMALL)(feat, torch.randn(n, 2, 4, 4), batch),
            UniDistillFeatureLoss(SMALL, student_channels=2, teacher_channels=3)(feat, torch.randn(n, 3, 4, 4), batch),
            UniDistillRelationLoss(SMALL)(feat, torch.randn(n, 2, 4, 4), batch),
            UniDistillResponseLoss(SMALL)(head, (torch.randn(n, 1, 4, 4), torch.randn(n, 8, 4, 4)), batch),
        ]
        for value in values:
            assert value.item() == 0 and value.requires_grad
            value.backward()
        detection = BEVDetectionLoss(SMALL)(head, None, batch)  # negatives only
        assert detection.item() > 0 and torch.isfinite(detection)

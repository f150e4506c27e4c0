"""BEV detectors: grid, pillar scatter, camera frustum projection, output contract, target/decode round trip,
training through the Distiller and the CLI, and the frozen teacher loaded once."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import train_steps
from xmodal.distiller import Distiller
from xmodal.losses.bev import (
    BEVDetectionLoss,
    UniDistillFeatureLoss,
    UniDistillRelationLoss,
    UniDistillResponseLoss,
    encode_targets,
)
from xmodal.modalities.bev_detector import BEVDetector, decode_boxes
from xmodal.modalities.bev_nets import BEVGrid, PillarEncoder, frustum_points, splat

ROOT = Path(__file__).resolve().parent.parent
TINY_GRID = BEVGrid(x_range=(-8, 8), y_range=(-8, 8), z_range=(-1, 3), cell=0.5, stride=2)
TINY = {"grid": TINY_GRID, "channels": 8, "pillar_channels": 8, "camera_channels": 8, "depth_bins": 6,
        "depth_range": (1.0, 12.0), "image_stride": 4, "image_width": 8}
SIZES = {0: (1.8, 4.2, 1.6), 1: (2.4, 6.0, 2.8), 2: (0.6, 0.6, 1.7), 3: (0.6, 1.8, 1.6)}  # w, l, h per class


def camera_extrinsics(yaw: float, position: tuple[float, float, float] = (0.0, 0.0, 1.6)) -> torch.Tensor:
    """Camera-to-ego pose of a camera looking along ``yaw`` (OpenCV axes: x right, y down, z forward)."""
    c, s = math.cos(yaw), math.sin(yaw)
    pose = torch.eye(4)
    pose[:3, 0] = torch.tensor([s, -c, 0.0])
    pose[:3, 1] = torch.tensor([0.0, 0.0, -1.0])
    pose[:3, 2] = torch.tensor([c, s, 0.0])
    pose[:3, 3] = torch.tensor(position)
    return pose


Scene = list[tuple[float, float, float, int]]


def synthetic_batch(objects: list[Scene], views: int = 2, hw: tuple[int, int] = (24, 40), points_per_box: int = 120,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch per the BEV contract: per scene, boxes ``(x, y, yaw, label)`` with class sizes, LiDAR points inside
    the boxes and on the ground, and ``views`` cameras around the car with random images."""
    g = torch.Generator().manual_seed(seed)
    clouds, box_rows = [], []
    for scene in objects:
        rows = [[x, y, SIZES[k][2] / 2, *SIZES[k], yaw, 0.0, 0.0] for x, y, yaw, k in scene]
        pts = [torch.cat([torch.rand(200, 2, generator=g) * 16 - 8, torch.zeros(200, 1), torch.full((200, 1), 0.1)], 1)]
        for x, y, _, w, length, h, yaw, _, _ in rows:
            local = (torch.rand(points_per_box, 3, generator=g) - 0.5) * torch.tensor([length, w, 0.0])
            along, across = local[:, 0], local[:, 1]
            z = torch.rand(points_per_box, generator=g) * h
            px = x + along * math.cos(yaw) - across * math.sin(yaw)
            py = y + along * math.sin(yaw) + across * math.cos(yaw)
            pts.append(torch.stack([px, py, z, torch.full_like(z, 0.6)], 1))
        clouds.append(torch.cat(pts))
        box_rows.append(torch.tensor(rows, dtype=torch.float32).reshape(-1, 9))
    b, m = len(objects), max(len(s) for s in objects)
    boxes, labels = torch.zeros(b, m, 9), torch.full((b, m), -1)
    for i, (box_row, scene) in enumerate(zip(box_rows, objects, strict=True)):
        boxes[i, : len(box_row)] = box_row
        labels[i, : len(box_row)] = torch.tensor([k for *_, k in scene], dtype=torch.int64)
    k = torch.tensor([[20.0, 0, hw[1] / 2], [0, 20.0, hw[0] / 2], [0, 0, 1]])
    poses = torch.stack([camera_extrinsics(2 * math.pi * v / views) for v in range(views)])
    return {
        "lidar": torch.nn.utils.rnn.pad_sequence(clouds, batch_first=True),
        "lidar_counts": torch.tensor([len(c) for c in clouds]),
        "camera": torch.rand(b, views, 3, *hw, generator=g),
        "intrinsics": k.expand(b, views, 3, 3).clone(), "extrinsics": poses.expand(b, views, 4, 4).clone(),
        "boxes": boxes, "box_counts": torch.tensor([len(s) for s in objects]), "box_labels": labels,
    }


SCENES: list[Scene] = [[(3.0, 2.0, 0.3, 0), (-4.0, -3.0, 1.2, 2)], [(-2.0, 4.5, -0.7, 3)]]


def test_default_grid_matches_the_contract() -> None:
    grid = BEVGrid()
    assert (grid.nx, grid.ny, grid.out_size, grid.out_cell) == (128, 128, (64, 64), 1.0)
    assert grid.classes == ("car", "truck", "pedestrian", "cyclist")
    assert BEVGrid.of(grid.as_dict()) == grid
    with pytest.raises(ValueError, match="power of two"):
        BEVGrid(stride=3)
    with pytest.raises(ValueError, match="whole number"):
        BEVGrid(x_range=(-32, 32.5))


def test_pillar_scatter_puts_each_point_in_its_cell() -> None:
    encoder = PillarEncoder(TINY_GRID, channels=2).eval()
    with torch.no_grad():  # channel 0 = intensity, channel 1 = 0: the canvas shows the max intensity per pillar
        encoder.linear.weight.zero_()
        encoder.linear.weight[0, 3] = 1.0
    points = torch.tensor([[[1.2, -3.7, 0.5, 0.3], [1.4, -3.6, 1.0, 0.7], [-7.9, 7.9, 0.0, 0.5],
                            [20.0, 0.0, 0.0, 0.9], [0.0, 0.0, 0.0, 0.8]]])
    canvas = encoder(points, torch.tensor([4]))  # the 5th point is padding, the 4th is out of range
    assert canvas.shape == (1, 2, 32, 32)
    expected = torch.zeros(32, 32)
    expected[int((-3.7 + 8) / 0.5), int((1.2 + 8) / 0.5)] = 0.7  # row 8, col 18: max of 0.3 and 0.7
    expected[31, 0] = 0.5
    torch.testing.assert_close(canvas[0, 0], expected, atol=1e-4, rtol=0)
    assert canvas[0, 1].abs().max() == 0


def test_camera_pixel_at_known_depth_lands_in_its_bev_cell() -> None:
    # 96 x 160 image, 12 x 20 features (stride 8): feature pixel (6, 10) is centred at image point (84, 52), the
    # principal point; feature pixel (6, 12) is 16 px to the right, i.e. x/z = 16 / 80 = 0.2 in the camera frame
    k = torch.tensor([[80.0, 0.0, 84.0], [0.0, 80.0, 52.0], [0.0, 0.0, 1.0]])
    front = camera_extrinsics(0.0, (1.5, 0.0, 1.6))
    back = camera_extrinsics(math.pi, (-1.0, 0.0, 1.6))
    intrinsics, extrinsics = k.expand(1, 2, 3, 3), torch.stack([front, back])[None]
    points = frustum_points(intrinsics, extrinsics, torch.tensor([5.0, 10.0]), (96, 160), (12, 20))
    assert points.shape == (1, 2, 2, 12, 20, 3)
    torch.testing.assert_close(points[0, 0, 1, 6, 10], torch.tensor([11.5, 0.0, 1.6]))
    torch.testing.assert_close(points[0, 0, 1, 6, 12], torch.tensor([11.5, -2.0, 1.6]))  # right of the car is -y
    torch.testing.assert_close(points[0, 1, 0, 6, 10], torch.tensor([-6.0, 0.0, 1.6]), atol=1e-5, rtol=0)

    grid = BEVGrid()  # [-32, 32] m, 0.5 m cells
    feats = torch.zeros(1, points[0].numel() // 3, 1)
    flat = points.reshape(1, -1, 3)
    index = int(((flat[0] - torch.tensor([11.5, -2.0, 1.6])).norm(dim=1) < 1e-4).nonzero()[0])
    feats[0, index] = 1.0
    bev = splat(feats, flat, grid)
    assert bev.sum() == 1.0 and bev[0, 0, int((-2.0 + 32) / 0.5), int((11.5 + 32) / 0.5)] == 1.0  # row 60, col 87


@pytest.mark.parametrize("inputs", ["lidar", "camera", "fusion"])
def test_detectors_follow_the_output_contract(inputs: str) -> None:
    torch.manual_seed(0)
    model = BEVDetector(inputs, **TINY)
    batch = synthetic_batch(SCENES)
    out = model(batch)
    keys = {"bev.feat", "bev.heatmap", "bev.reg", "bev.pre_backbone", "bev.neck"}
    assert set(out) == set(model.output_keys) == keys
    assert out["bev.feat"].shape == (2, 8, 16, 16)
    assert out["bev.neck"] is out["bev.feat"] and out["bev.pre_backbone"].shape[-2:] == (32, 32)  # input grid
    assert out["bev.heatmap"].shape == (2, 4, 16, 16) and out["bev.reg"].shape == (2, 8, 16, 16)
    assert BEVDetector(inputs, **{**TINY, "feat_layer": "encoder"})(batch)["bev.feat"].shape == (2, 8, 32, 32)
    preds = model.predict(batch, score_threshold=0.0, top_k=5)
    assert model.training and len(preds) == 2
    for pred in preds:
        assert pred["boxes"].shape == (5, 7) and pred["scores"].shape == (5,) and pred["labels"].dtype == torch.int64
    rebuilt = BEVDetector(**model.init_args)
    assert rebuilt.grid == model.grid and json.dumps(model.init_args)


def test_targets_decode_back_to_the_boxes() -> None:
    batch = synthetic_batch(SCENES)
    targets = encode_targets(batch, TINY_GRID)
    b, _, h, w = targets.heatmap.shape
    assert (targets.heatmap.flatten(2).max(-1).values > 0).sum() == 3  # one peak channel per box
    assert int((targets.heatmap == 1).sum()) == 3
    reg = torch.zeros(b, 8, h * w)
    for i in range(b):
        keep = targets.mask[i]
        reg[i][:, targets.index[i][keep]] = targets.reg[i][keep].T
    logits = torch.logit(targets.heatmap.clamp(1e-4, 1 - 1e-4))
    preds = decode_boxes(logits, reg.view(b, 8, h, w), TINY_GRID, top_k=10, score_threshold=0.5)
    for i, pred in enumerate(preds):
        n = int(batch["box_counts"][i])
        order = torch.argsort(pred["boxes"][:, 0])
        truth = batch["boxes"][i, :n, :7]
        truth_order = torch.argsort(truth[:, 0])
        torch.testing.assert_close(pred["boxes"][order], truth[truth_order], atol=1e-4, rtol=0)
        assert pred["labels"][order].tolist() == batch["box_labels"][i, :n][truth_order].tolist()


def test_detection_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    distiller = Distiller(BEVDetector("lidar", **TINY), [BEVDetectionLoss(TINY_GRID)])
    losses = train_steps(distiller, synthetic_batch(SCENES), 25, lr=3e-3)
    assert losses[-1] < 0.6 * losses[0]


def test_teacher_is_loaded_once_and_frozen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L

    import xmodal.teachers.bev as teacher_module
    from xmodal.zoo import save_pretrained

    torch.manual_seed(0)
    trained = BEVDetector("lidar", **TINY)
    save_pretrained(trained, trained.init_args, tmp_path / "lidar")
    loads = []
    real_load = teacher_module.load_detector

    def counting_load(*args: Any, **kwargs: Any) -> BEVDetector:
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(teacher_module, "load_detector", counting_load)
    teacher = teacher_module.BEVTeacher(str(tmp_path / "lidar"))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = [BEVDetectionLoss(TINY_GRID), UniDistillFeatureLoss(TINY_GRID), UniDistillRelationLoss(TINY_GRID),
              UniDistillResponseLoss(TINY_GRID)]
    distiller = Distiller(BEVDetector("camera", **TINY), losses, teacher=teacher)
    batch = synthetic_batch(SCENES)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(cast(Any, [batch] * 4), batch_size=None)
    trainer.fit(distiller, train_dataloaders=loader)
    assert len(loads) == 1 and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert not any(k.startswith("teacher") for k in distiller.state_dict())
    assert trainer.callback_metrics["train/unidistill_feature"] >= 0
    torch.testing.assert_close(teacher(batch)["bev.heatmap"], trained.eval()(batch)["bev.heatmap"])
    assert teacher.manifest()["config"]["inputs"] == "lidar"


def write_scene_shards(root: Path, split: str, scenes: int, seed: int) -> None:
    """Shards in the contract's format (``lidar.npy``, ``json``, ``<camera>.jpg``) from :func:`synthetic_batch`."""
    from xmodal.data.shards import write_shards

    names = ("cam_front", "cam_back")  # WebDataset lowercases extensions
    classes = ("car", "truck", "pedestrian", "cyclist")
    samples = []
    for i in range(scenes):
        batch = synthetic_batch([SCENES[i % 2]], hw=(96, 160), seed=seed + i)
        cameras = [{"name": n, "intrinsics": batch["intrinsics"][0, v].tolist(),
                    "extrinsics": batch["extrinsics"][0, v].tolist()} for v, n in enumerate(names)]
        boxes = [{"translation": row[:3].tolist(), "size": row[3:6].tolist(), "rotation": float(row[6]),
                  "class": classes[int(label)], "num_lidar_pts": 100}
                 for row, label in zip(batch["boxes"][0], batch["box_labels"][0], strict=True) if label >= 0]
        sample = {"__key__": f"{split}{i:04d}", "lidar.npy": batch["lidar"][0].numpy().astype(np.float32),
                  "json": {"scene": f"s{i}", "cameras": cameras, "boxes": boxes}}
        for v, name in enumerate(names):
            image = (batch["camera"][0, v].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG")
            sample[f"{name}.jpg"] = buffer.getvalue()
        samples.append(sample)
    write_shards(samples, root, split, max_count=scenes)


ON_THE_GPU = pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("accelerator", ["cpu", ON_THE_GPU])
def test_recipe_configs_train_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              accelerator: str) -> None:
    from xmodal.commands.main import main

    monkeypatch.chdir(tmp_path)
    for split in ("train", "val"):
        write_scene_shards(tmp_path / "runs/data/bev-small", split, 4, seed=7 if split == "val" else 0)
    fast = ["--trainer.max_steps=2", f"--trainer.accelerator={accelerator}", "--trainer.logger=false",
            "--data.batch_size=2", "--data.num_workers=0", "--model.student.init_args.channels=16"]
    main(["fit", "--config", str(ROOT / "configs/bev/lidar_teacher.yaml"), *fast])
    assert (tmp_path / "runs/models/bev-lidar/model.safetensors").exists()
    main(["fit", "--config", str(ROOT / "configs/bev/camera_unidistill.yaml"), *fast])
    student = tmp_path / "runs/bev/camera_unidistill/student"
    from xmodal.zoo import create_model

    model = create_model(str(student))
    assert isinstance(model, BEVDetector) and model.inputs == "camera"
    for term in ("feature", "relation", "response"):  # each reference term alone, one step
        main(["fit", "--config", str(ROOT / f"configs/bev/camera_unidistill_{term}.yaml"), *fast[1:],
              "--trainer.fast_dev_run=1"])


# camera_exp_distill_lidar in megvii-research/CVPR2023-UniDistill: (layers, form, weight) of each distillation term
REFERENCE_TERMS: dict[type, tuple[dict[str, Any], float]] = {
    UniDistillFeatureLoss: ({"student_key": "bev.pre_backbone", "teacher_key": "bev.pre_backbone"}, 100.0),
    UniDistillRelationLoss: ({"student_key": "bev.neck", "teacher_key": "bev.neck"}, 40.0),
    UniDistillResponseLoss: ({"region": "gaussian", "teacher_temperature": 2.0, "min_overlap": 0.7}, 10.0),
}


@pytest.mark.parametrize("recipe", ["", "_feature", "_relation", "_response"])
def test_lidar_to_camera_recipes_use_the_reference_terms(recipe: str) -> None:
    import yaml

    config = yaml.safe_load((ROOT / f"configs/bev/camera_unidistill{recipe}.yaml").read_text())
    classes = {cls.__name__: cls for cls in (BEVDetectionLoss, *REFERENCE_TERMS)}
    losses = [classes[entry["class_path"]](**entry["init_args"]) for entry in config["model"]["losses"]]
    assert isinstance(losses[0], BEVDetectionLoss) and losses[0].weight == 1.0
    distill = losses[1:]
    assert len(distill) == (3 if recipe == "" else 1)
    for loss in distill:
        fields, weight = REFERENCE_TERMS[type(loss)]
        assert loss.weight == weight
        for field, value in fields.items():
            assert getattr(loss, field) == value, (type(loss).__name__, field)
        if isinstance(loss, UniDistillFeatureLoss):
            assert loss.distance is torch.nn.functional.l1_loss and isinstance(loss.adapter, torch.nn.Identity)
        if isinstance(loss, UniDistillResponseLoss):
            assert (loss.heatmap_weight, loss.reg_weight) == (1.0, 1.0)

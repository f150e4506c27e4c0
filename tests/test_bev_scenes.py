"""BEV scenes corpus: shards decode through BEVModality, determinism, LiDAR geometry, camera geometry, occlusion."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from xmodal.commands.data import data_main
from xmodal.data.corpora import CORPORA, make_corpus
from xmodal.data.corpora.bevscenes import (
    CAMERA_LAYOUT,
    CLASS_COLOURS,
    CLASSES,
    CLUTTER,
    GROUND,
    LidarSpec,
    Scene,
    box_corners,
    camera_window,
    lidar_sweep,
    lidar_window,
    make_cameras,
    random_scene,
    render,
    scene_sample,
    trace,
)
from xmodal.modalities.bev import BEVModality

EXACT = LidarSpec(range_noise=0.0, dropout=0.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bev")
    meta = make_corpus("bev-scenes", out, size="tiny", n_train=5, n_val=2, n_test=2, shard_size=3, workers=1,
                       progress=False)
    return out, meta


def read_split(out: Path, meta: dict, split: str) -> list[dict]:
    return list(wds.WebDataset(str(out / meta["patterns"][split]), shardshuffle=False))


def local_coords(scene: Scene, k: int, points: np.ndarray) -> np.ndarray:
    """Ego points in box ``k``'s frame: (along the length, along the width, up from the centre)."""
    c, s = math.cos(scene.yaws[k]), math.sin(scene.yaws[k])
    rel = points - scene.centres[k]
    return np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], -1)


def half_extents(scene: Scene, k: int) -> np.ndarray:
    w, length, h = scene.sizes[k]
    return np.array([length, w, h]) / 2


def test_tiny_corpus_decodes_through_bev_modality(corpus: tuple[Path, dict]) -> None:
    out, meta = corpus
    assert meta["counts"] == {"train": 5, "val": 2, "test": 2} and meta["shards"]["train"] == 2
    assert meta["classes"] == list(CLASSES) and meta["cameras"] == list(CAMERA_LAYOUT)
    assert meta["image_size"] == [96, 160] and meta["scenes_per_second"] > 0
    assert json.loads((out / "meta.json").read_text())["counts"] == meta["counts"]
    assert (out / "preview.png").exists()
    samples = read_split(out, meta, "train")
    assert [s["__key__"] for s in samples] == [f"train-{i:07d}" for i in range(5)]
    modality = BEVModality(classes=CLASSES)
    items = [modality.decode(s) for s in samples]
    batch = modality.on_device(modality.collate(items), train=True)
    infos = [json.loads(s["json"]) for s in samples]
    b, n_boxes = len(samples), max(len(i["boxes"]) for i in infos)
    assert batch["lidar"].shape[0] == b and batch["lidar"].shape[2] == 4
    assert batch["lidar_counts"].min() > 5000
    assert batch["camera"].shape == (b, 6, 3, 96, 160) and 0 <= batch["camera"].min() <= batch["camera"].max() <= 1
    assert batch["intrinsics"].shape == (b, 6, 3, 3) and batch["extrinsics"].shape == (b, 6, 4, 4)
    assert batch["boxes"].shape == (b, n_boxes, 9)
    assert batch["box_counts"].tolist() == [len(i["boxes"]) for i in infos]
    labels = batch["box_labels"][0, : len(infos[0]["boxes"])].tolist()
    assert labels == [CLASSES.index(box["class"]) for box in infos[0]["boxes"]]
    for info in infos:
        assert info["boxes"] and all(box["class"] in CLASSES for box in info["boxes"])
        centres = np.array([box["translation"] for box in info["boxes"]])
        assert np.abs(centres[:, :2]).max() < 32
        assert sum(box["num_lidar_pts"] for box in info["boxes"]) > 0


def test_registered_and_cli_accepts_options(tmp_path: Path) -> None:
    assert "bev-scenes" in CORPORA
    data_main(["make", "bev-scenes", "--out", str(tmp_path), "--size", "tiny", "--n-train", "1", "--n-val", "1",
               "--n-test", "1", "--image-size", "48", "--workers", "1"])
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["image_size"] == [48, 80] and meta["counts"] == {"train": 1, "val": 1, "test": 1}


def payload(samples: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")} for s in samples]


def test_deterministic_from_seed_and_independent_of_workers(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    a = scene_sample("val", 1, seed=3)
    b = scene_sample("val", 1, seed=3)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert scene_sample("val", 1, seed=4)["lidar.npy"] != a["lidar.npy"]
    assert scene_sample("test", 1, seed=3)["lidar.npy"] != a["lidar.npy"]
    out, meta = corpus
    again = make_corpus("bev-scenes", tmp_path, n_train=5, n_val=2, n_test=2, shard_size=3, workers=2,
                        progress=False, preview=False)
    for split in ("train", "test"):
        assert payload(read_split(tmp_path, again, split)) == payload(read_split(out, meta, split))


def test_scenes_have_no_overlaps_and_plausible_objects() -> None:
    for index in range(3):
        scene = random_scene(np.random.default_rng([7, index]))
        grid = np.stack(np.meshgrid(np.linspace(-0.45, 0.45, 7), np.linspace(-0.45, 0.45, 7)), -1).reshape(-1, 2)
        for k in range(len(scene.kinds)):
            w, length, _ = scene.sizes[k]
            c, s = math.cos(scene.yaws[k]), math.sin(scene.yaws[k])
            xy = scene.centres[k, :2] + (grid * [length, w]) @ np.array([[c, s], [-s, c]])
            inside = np.column_stack([xy, np.full(len(xy), 0.1)])
            for j in range(len(scene.kinds)):
                if j != k:
                    assert not np.any(np.all(np.abs(local_coords(scene, j, inside)) < half_extents(scene, j), 1))
        objects = [k for k, kind in enumerate(scene.kinds) if kind != CLUTTER]
        assert objects and np.abs(scene.centres[objects, :2]).max() < 32
        assert np.allclose(scene.centres[:, 2], scene.sizes[:, 2] / 2)
        cars = [k for k in objects if scene.kinds[k] == "car"]
        aligned = np.abs(np.sin(scene.yaws[cars] - scene.roads[0].yaw)) < 0.3
        assert aligned.mean() >= 0.5 or len(scene.roads) > 1
        assert np.all(np.abs(scene.sizes[cars] / [1.9, 4.6, 1.7] - 1) <= 0.21)


def test_lidar_points_lie_on_box_surfaces_or_ground() -> None:
    scene = random_scene(np.random.default_rng(11))
    points, hit = lidar_sweep(scene, EXACT, np.random.default_rng(0))
    assert points.dtype == np.float32 and points.shape[1] == 4
    assert 0 <= points[:, 3].min() and points[:, 3].max() <= 1
    xyz = points[:, :3].astype(np.float64)
    assert np.all(np.abs(xyz[hit == GROUND, 2]) < 1e-3)
    distance = np.linalg.norm(xyz - [0, 0, EXACT.height], axis=1)
    assert distance.min() >= EXACT.min_range - 1e-3 and distance.max() <= EXACT.max_range + 1e-3
    tol = 1e-3
    for k in range(len(scene.kinds)):
        local = np.abs(local_coords(scene, k, xyz))
        half = half_extents(scene, k)
        mine = local[hit == k]
        assert np.all(mine <= half + tol)  # within the box...
        assert np.all(np.any(mine >= half - tol, axis=1))  # ...and on its surface
        assert not np.any(np.all(local < half - tol, axis=1))  # no point of any sweep is inside a box
    assert (hit >= 0).sum() > 100


def test_projection_of_known_points_and_rendered_box() -> None:
    cameras = {c.name: c for c in make_cameras(96, 160)}
    front, back = cameras["cam_front"], cameras["cam_back"]
    uv, depth = front.project(np.array([[11.7, 0.0, 1.5]]))
    assert np.allclose(uv, [[80.0, 48.0]]) and np.isclose(depth[0], 10.0)
    uv, depth = back.project(np.array([[-21.0, 0.0, 1.5]]))
    assert np.allclose(uv, [[80.0, 48.0]]) and np.isclose(depth[0], 20.0)
    uv, _ = front.project(np.array([[11.7, -1.0, 0.5]]))  # right of and below the axis: larger u and v
    assert uv[0, 0] > 80 and uv[0, 1] > 48
    for camera in cameras.values():  # E is a rigid camera-to-ego pose: its translation is the camera centre
        rotation = camera.extrinsics[:3, :3]
        assert np.allclose(rotation @ rotation.T, np.eye(3)) and np.isclose(np.linalg.det(rotation), 1.0)

    scene = Scene.of([("car", (12.0, 1.0, 0.85), (1.9, 4.6, 1.7), 0.4)])
    image, ids = render(scene, front, np.random.default_rng(0))
    assert image.shape == (96, 160, 3) and image.dtype == np.uint8
    inner = 0.85 * scene.corners(0) + 0.15 * scene.centres[0]
    uv, _ = front.project(np.vstack([inner, scene.centres[:1]]))
    pixels = np.floor(uv).astype(int)
    assert np.all(ids[pixels[:, 1], pixels[:, 0]] == 0)
    r, g, b = image[pixels[-1, 1], pixels[-1, 0]].astype(int)
    assert r > g + 40 and r > b + 40 and CLASS_COLOURS["car"][0] > 150
    outline = box_corners(scene.centres[0], scene.sizes[0], 0.4)
    far = np.floor(front.project(outline + [0.0, 0.0, 3.0])[0]).astype(int)  # above the box: sky or ground
    assert np.all(ids[np.clip(far[:, 1], 0, 95), np.clip(far[:, 0], 0, 159)] < 0)


def test_occluded_box_gets_fewer_points() -> None:
    behind = ("car", (20.0, 0.0, 0.85), (1.9, 4.6, 1.7), 0.0)
    alone = Scene.of([behind])
    car_in_front = Scene.of([behind, ("car", (10.0, 0.3, 0.85), (1.9, 4.6, 1.7), 0.0)])
    truck_in_front = Scene.of([behind, ("truck", (10.0, 0.0, 1.5), (2.5, 8.0, 3.0), 0.0)])
    counts = []
    for scene in (alone, car_in_front, truck_in_front):
        _, hit = lidar_sweep(scene, EXACT, np.random.default_rng(0))
        counts.append(int((hit == 0).sum()))
    assert counts[0] > 20 and counts[1] < counts[0] / 2 and counts[2] == 0
    _, ids = render(truck_in_front, make_cameras()[0], np.random.default_rng(0))
    assert not np.any(ids == 0) and np.any(ids == 1)


def test_culling_windows_never_drop_hits() -> None:
    scene = random_scene(np.random.default_rng(5))
    spec = LidarSpec()
    full = [(slice(None), slice(None))] * len(scene.kinds)
    elevation = np.radians(np.asarray(spec.elevations))[:, None]
    azimuths = (0.3 + np.arange(spec.azimuth_steps)) * (2 * math.pi / spec.azimuth_steps)
    dirs = np.stack(np.broadcast_arrays(np.cos(elevation) * np.cos(azimuths), np.cos(elevation) * np.sin(azimuths),
                                        np.sin(elevation)), -1)
    origin = np.array([0.0, 0.0, spec.height])
    culled = trace(origin, dirs, scene, [lidar_window(scene.corners(k), spec, azimuths) for k in range(len(full))])
    assert np.array_equal(culled.index, trace(origin, dirs, scene, full).index)
    for camera in make_cameras(48, 80):
        centre, rays = camera.rays()
        culled = trace(centre, rays, scene, [camera_window(scene.corners(k), camera) for k in range(len(full))])
        assert np.array_equal(culled.index, trace(centre, rays, scene, full).index)

"""``xmodal data convert nuscenes``: a miniature v1.0 dataset (two scenes of two keyframes, every table, LiDAR
sweeps, six cameras), converted, checked against hand-computed geometry and against nuscenes-devkit, and trained on."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from scipy.spatial.transform import Rotation

from tests.conftest import ROOT
from xmodal.commands.data import data_main
from xmodal.data.convert import nuscenes

VERSION = "v1.0-mini"
SCENES = ("scene-0061", "scene-0103")  # in the devkit's mini_train and mini_val
T0 = 1_532_402_927_000_000  # microseconds
IMAGE_HW = (32, 48)
CAMERA_YAWS = {"CAM_FRONT": 0.0, "CAM_FRONT_RIGHT": -55.0, "CAM_FRONT_LEFT": 55.0, "CAM_BACK": 180.0,
               "CAM_BACK_LEFT": 110.0, "CAM_BACK_RIGHT": -110.0}
OBJECTS = (  # category, offset from the ego (x, y, z) in the ego frame at the first keyframe, size [w, l, h], yaw
    ("vehicle.car", (8.0, 2.0, 0.8), (1.9, 4.5, 1.6), 0.4),
    ("human.pedestrian.adult", (5.0, -3.0, 0.9), (0.6, 0.7, 1.8), 1.2),
    ("vehicle.bus.rigid", (-12.0, 4.0, 1.5), (2.9, 11.0, 3.2), -0.2),
    ("vehicle.bicycle", (3.0, 6.0, 0.6), (0.6, 1.7, 1.2), 2.5),
    ("movable_object.barrier", (10.0, -6.0, 0.5), (2.0, 0.5, 1.0), 0.0),
)


def quaternion(matrix: np.ndarray) -> list[float]:
    x, y, z, w = Rotation.from_matrix(matrix).as_quat()
    return [float(w), float(x), float(y), float(z)]


def yaw_quaternion(yaw: float) -> list[float]:
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def ego_at(seconds: float, scene: int) -> tuple[np.ndarray, float]:
    """The ego's global position and yaw, ``seconds`` into a scene: driving at 8 m/s while turning."""
    yaw = 0.3 + scene + 0.1 * seconds
    return np.array([300.0 + 100 * scene + 8 * seconds * math.cos(yaw), 900.0 + 8 * seconds * math.sin(yaw), 0.1]), yaw


def camera_rotation(yaw_deg: float) -> np.ndarray:
    yaw = math.radians(yaw_deg)
    right, down, forward = (math.sin(yaw), -math.cos(yaw), 0.0), (0.0, 0.0, -1.0), (math.cos(yaw), math.sin(yaw), 0.0)
    return np.array([right, down, forward]).T


class Miniature:
    """The tables and blobs of a miniature nuScenes, written under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tables: dict[str, list[dict[str, Any]]] = {name: [] for name in (
            "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
            "scene", "sample", "sample_data", "sample_annotation", "map")}
        self.rng = np.random.default_rng(0)

    def add(self, table: str, **record: Any) -> dict[str, Any]:
        self.tables[table].append(record)
        return record

    def write(self) -> Path:
        self._static()
        for scene in range(len(SCENES)):
            self._scene(scene)
        folder = self.root / VERSION
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in self.tables.items():
            (folder / f"{name}.json").write_text(json.dumps(rows))
        (self.root / "maps").mkdir(exist_ok=True)
        Image.new("L", (8, 8)).save(self.root / "maps/map0.png")
        return self.root

    def _static(self) -> None:
        self.add("visibility", token="4", level="v80-100", description="")
        self.add("log", token="log0", logfile="n015-2018-07-24", vehicle="n015", date_captured="2018-07-24",
                 location="singapore-onenorth")
        self.add("map", token="map0", log_tokens=["log0"], category="semantic_prior", filename="maps/map0.png")
        for category, *_ in OBJECTS:
            self.add("category", token=f"cat-{category}", name=category, description="")
        self.add("sensor", token="sensor-lidar", channel="LIDAR_TOP", modality="lidar")
        lidar_rotation = yaw_quaternion(-math.pi / 2 + 0.01)  # nuScenes' LIDAR_TOP x axis points right
        self.add("calibrated_sensor", token="cs-LIDAR_TOP", sensor_token="sensor-lidar", translation=[0.94, 0.01, 1.84],
                 rotation=lidar_rotation, camera_intrinsic=[])
        h, w = IMAGE_HW
        for channel, yaw in CAMERA_YAWS.items():
            self.add("sensor", token=f"sensor-{channel}", channel=channel, modality="camera")
            rotation = quaternion(camera_rotation(yaw))
            self.add("calibrated_sensor", token=f"cs-{channel}", sensor_token=f"sensor-{channel}",
                     translation=[1.5 * math.cos(math.radians(yaw)), 0.5 * math.sin(math.radians(yaw)), 1.5],
                     rotation=rotation, camera_intrinsic=[[30.0, 0.0, w / 2], [0.0, 30.0, h / 2], [0.0, 0.0, 1.0]])

    def _pose(self, token: str, seconds: float, scene: int) -> str:
        position, yaw = ego_at(seconds, scene)
        self.add("ego_pose", token=token, timestamp=T0 + int(seconds * 1e6), translation=position.tolist(),
                 rotation=yaw_quaternion(yaw))
        return token

    def _data(self, token: str, sample: str, channel: str, seconds: float, scene: int, key: bool) -> dict[str, Any]:
        folder = "samples" if key else "sweeps"
        lidar = channel == "LIDAR_TOP"
        stem = f"n015-{SCENES[scene]}__{channel}__{T0 + int(seconds * 1e6)}"
        filename = f"{folder}/{channel}/{stem}.{'pcd.bin' if lidar else 'jpg'}"
        path = self.root / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if lidar:
            points = np.zeros((120, 5), np.float32)
            points[:, :2] = self.rng.uniform(2, 30, (120, 2)) * self.rng.choice([-1, 1], (120, 2))
            points[:5, :2] *= 0.02  # on the roof: dropped
            points[:, 2] = self.rng.uniform(-2, 2, 120)
            points[:, 3] = self.rng.integers(0, 256, 120)
            points[:, 4] = self.rng.integers(0, 32, 120)
            points.tofile(path)
        else:
            pixels = self.rng.integers(0, 255, (*IMAGE_HW, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, format="JPEG")
        return self.add("sample_data", token=token, sample_token=sample, ego_pose_token=self._pose(
            f"ep-{token}", seconds, scene), calibrated_sensor_token=f"cs-{channel}", timestamp=T0 + int(seconds * 1e6),
            fileformat="pcd" if lidar else "jpg", is_key_frame=key, height=0 if lidar else IMAGE_HW[0],
            width=0 if lidar else IMAGE_HW[1], filename=filename, prev="", next="")

    def _scene(self, scene: int) -> None:
        name = SCENES[scene]
        samples = [f"{name}-s{i}" for i in range(2)]
        self.add("scene", token=f"{name}-token", name=name, description="", log_token="log0", nbr_samples=2,
                 first_sample_token=samples[0], last_sample_token=samples[1])
        chain = [self._data(f"{name}-sweep0", samples[0], "LIDAR_TOP", -0.05, scene, key=False)]
        for i, sample in enumerate(samples):
            seconds = 0.5 * i
            self.add("sample", token=sample, timestamp=T0 + int(seconds * 1e6), scene_token=f"{name}-token",
                     prev=samples[i - 1] if i else "", next=samples[i + 1] if i + 1 < len(samples) else "")
            if i:
                chain.append(self._data(f"{name}-sweep{i}", sample, "LIDAR_TOP", seconds - 0.25, scene, key=False))
            chain.append(self._data(f"{name}-lidar{i}", sample, "LIDAR_TOP", seconds, scene, key=True))
            for k, channel in enumerate(CAMERA_YAWS):
                self._data(f"{name}-{channel}{i}", sample, channel, seconds + 0.008 * (k + 1), scene, key=True)
        for earlier, later in zip(chain, chain[1:], strict=False):
            earlier["next"], later["prev"] = later["token"], earlier["token"]
        self._annotations(name, samples, scene)

    def _annotations(self, name: str, samples: list[str], scene: int) -> None:
        origin, yaw0 = ego_at(0.0, scene)
        to_global = Rotation.from_euler("z", yaw0).as_matrix()
        for k, (category, offset, size, yaw) in enumerate(OBJECTS):
            instance = f"{name}-inst{k}"
            tokens = [f"{instance}-ann{i}" for i in range(len(samples))]
            self.add("instance", token=instance, category_token=f"cat-{category}", nbr_annotations=2,
                     first_annotation_token=tokens[0], last_annotation_token=tokens[-1])
            for i, sample in enumerate(samples):
                moved = np.asarray(offset) + np.array([1.5 * i, 0.5 * i, 0.0])  # 3 m/s, 1 m/s in the ego frame
                self.add("sample_annotation", token=tokens[i], sample_token=sample, instance_token=instance,
                         visibility_token="4", attribute_tokens=[], translation=(origin + to_global @ moved).tolist(),
                         size=list(size), rotation=yaw_quaternion(yaw0 + yaw), num_lidar_pts=5 + k,
                         num_radar_pts=0, prev=tokens[i - 1] if i else "", next=tokens[i + 1] if i == 0 else "")


def read_shards(pattern: Path) -> dict[str, dict[str, Any]]:
    return {item["__key__"]: item for item in wds.WebDataset(str(pattern), shardshuffle=False, empty_check=False)}


def convert(src: Path, out: Path, *extra: str) -> dict[str, Any]:
    data_main(["convert", "nuscenes", str(src), "--out", str(out), "--workers", "1", *extra])
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("nuscenes")
    src = Miniature(root / "nuscenes").write()
    (root / "splits.json").write_text(json.dumps({"train": [SCENES[0]], "val": [SCENES[1]]}))
    convert(src, root / "out", "--split-file", str(root / "splits.json"))
    return src, root / "out"


def test_fields_classes_and_splits(converted: tuple[Path, Path]) -> None:
    _, out = converted
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 2, "val": 2} and manifest["skipped"] == {}
    assert manifest["options"]["splits"].startswith("split file")
    assert json.loads((out / "meta.json").read_text())["classes"] == ["car", "truck", "pedestrian", "cyclist"]
    item = read_shards(out / "train-000000.tar")[f"{SCENES[0]}-s1"]
    meta = json.loads(item["json"])
    assert meta["scene"] == SCENES[0] and meta["sweeps"] == 3  # back to the scene's first sweep
    assert [c["name"] for c in meta["cameras"]] == [c.lower() for c in CAMERA_YAWS]
    assert all(f"{c.lower()}.jpg" in item for c in CAMERA_YAWS)
    classes = {box["category"]: box["class"] for box in meta["boxes"]}
    assert classes == {"vehicle.car": "car", "human.pedestrian.adult": "pedestrian", "vehicle.bus.rigid": "truck",
                       "vehicle.bicycle": "cyclist"}
    points = np.load(io.BytesIO(item["lidar.npy"]))
    assert points.shape == (4 * 115, 5) and points.dtype == np.float32  # 5 roof points dropped per sweep
    np.testing.assert_allclose(sorted(set(points[:, 4].tolist())), [0.0, 0.25, 0.5, 0.55], atol=1e-6)
    assert 0.0 <= points[:, 3].min() and points[:, 3].max() <= 1.0


def test_boxes_and_points_in_the_keyframe_ego_frame(converted: tuple[Path, Path]) -> None:
    """Hand-computed: the boxes were placed at known offsets in the first keyframe's ego frame, moving at 3 and 1
    m/s (ego frame); a point written at a box centre in the sensor frame lands on the box."""
    _, out = converted
    first = json.loads(read_shards(out / "train-000000.tar")[f"{SCENES[0]}-s0"]["json"])
    car = next(box for box in first["boxes"] if box["class"] == "car")
    np.testing.assert_allclose(car["translation"], OBJECTS[0][1], atol=1e-3)
    assert car["size"] == list(OBJECTS[0][2]) and car["num_lidar_pts"] == 5
    assert car["rotation"] == pytest.approx(OBJECTS[0][3], abs=1e-5)
    np.testing.assert_allclose(car["velocity"], [3.0, 1.0], atol=1e-3)
    to_ego = np.eye(4)
    to_ego[:3, :3] = Rotation.from_euler("z", 0.7).as_matrix()
    to_ego[:3, 3] = [1.0, 2.0, 1.8]
    sensor_point = np.linalg.inv(to_ego) @ np.array([*OBJECTS[0][1], 1.0])
    path = out.parent / "one.pcd.bin"
    np.array([[*sensor_point[:3], 255.0, 0.0]], np.float32).tofile(path)
    moved = nuscenes.read_points(nuscenes.Sweep(path, nuscenes._frozen(to_ego), 0.5))
    np.testing.assert_allclose(moved[0], [*OBJECTS[0][1], 1.0, 0.5], atol=1e-4)


def test_geometry_matches_the_devkit(converted: tuple[Path, Path]) -> None:
    pytest.importorskip("nuscenes")
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.data_classes import LidarPointCloud
    from nuscenes.utils.geometry_utils import BoxVisibility
    from pyquaternion import Quaternion

    src, out = converted
    nusc = NuScenes(VERSION, str(src), verbose=False)
    items = read_shards(out / "val-000000.tar")
    for token, item in items.items():
        record = nusc.get("sample", token)
        lidar = nusc.get("sample_data", record["data"]["LIDAR_TOP"])
        calibration = nusc.get("calibrated_sensor", lidar["calibrated_sensor_token"])
        ego = nusc.get("ego_pose", lidar["ego_pose_token"])
        cloud, times = LidarPointCloud.from_file_multisweep(nusc, record, "LIDAR_TOP", "LIDAR_TOP", nsweeps=10)
        cloud.rotate(Quaternion(calibration["rotation"]).rotation_matrix)
        cloud.translate(np.array(calibration["translation"]))
        points = np.load(io.BytesIO(item["lidar.npy"]))
        np.testing.assert_allclose(points[:, :3], cloud.points[:3].T, atol=1e-3)
        np.testing.assert_allclose(points[:, 3], cloud.points[3] / 255.0, atol=1e-6)
        np.testing.assert_allclose(points[:, 4], times[0], atol=1e-6)
        meta = json.loads(item["json"])
        _, boxes, _ = nusc.get_sample_data(lidar["token"])
        expected = {}
        for box in boxes:
            box.rotate(Quaternion(calibration["rotation"]))
            box.translate(np.array(calibration["translation"]))
            expected[box.name] = box
        for ours in meta["boxes"]:
            box = expected[ours["category"]]
            np.testing.assert_allclose(ours["translation"], box.center, atol=1e-3)
            np.testing.assert_allclose(ours["size"], box.wlh, atol=1e-4)
            assert ours["rotation"] == pytest.approx(box.orientation.yaw_pitch_roll[0], abs=1e-5)
            velocity = Quaternion(ego["rotation"]).inverse.rotate(nusc.box_velocity(box.token))  # global -> ego
            np.testing.assert_allclose(ours["velocity"], velocity[:2], atol=1e-3)
        for camera in meta["cameras"]:  # a box centre moved into each camera by our extrinsics and by the devkit
            _, camera_boxes, k = nusc.get_sample_data(record["data"][camera["name"].upper()],
                                                      box_vis_level=BoxVisibility.NONE)
            np.testing.assert_allclose(camera["intrinsics"], k, atol=1e-6)
            ego_to_camera = np.linalg.inv(np.array(camera["extrinsics"]))
            for ours in meta["boxes"]:
                box = next(b for b in camera_boxes if b.name == ours["category"])
                centre = ego_to_camera @ np.array([*ours["translation"], 1.0])
                np.testing.assert_allclose(centre[:3], box.center, atol=2e-3)


def test_official_mini_splits_from_the_devkit(tmp_path: Path) -> None:
    pytest.importorskip("nuscenes")
    src = Miniature(tmp_path / "nuscenes").write()
    manifest = convert(src, tmp_path / "out", "--sweeps", "0", "--no-cameras", "--classes", "nuscenes")
    assert manifest["counts"] == {"train": 2, "val": 2}
    assert manifest["options"]["splits"].startswith("official v1.0-mini")
    item = next(iter(read_shards(tmp_path / "out/train-000000.tar").values()))
    meta = json.loads(item["json"])
    assert meta["cameras"] == [] and meta["sweeps"] == 0
    assert {box["class"] for box in meta["boxes"]} == {"car", "pedestrian", "bus", "bicycle", "barrier"}


def test_missing_and_corrupt_blobs_are_skipped_and_named(tmp_path: Path) -> None:
    src = Miniature(tmp_path / "nuscenes").write()
    data = {r["token"]: r for r in json.loads((src / VERSION / "sample_data.json").read_text())}
    missing_lidar = src / data[f"{SCENES[0]}-lidar0"]["filename"]
    corrupt_lidar = src / data[f"{SCENES[0]}-lidar1"]["filename"]
    missing_image = src / data[f"{SCENES[1]}-CAM_BACK0"]["filename"]
    corrupt_image = src / data[f"{SCENES[1]}-CAM_FRONT1"]["filename"]
    missing_lidar.unlink()
    corrupt_lidar.write_bytes(b"\x00" * 22)
    missing_image.unlink()
    corrupt_image.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "splits.json").write_text(json.dumps({"train": list(SCENES)}))
    manifest = convert(src, tmp_path / "out", "--split-file", str(tmp_path / "splits.json"), "--sweeps", "0")
    assert manifest["counts"] == {"train": 0}
    assert manifest["skipped"] == {"corrupt camera image": 1, "corrupt lidar": 1, "missing camera image": 1,
                                   "missing lidar": 1}
    assert {entry["file"] for entry in manifest["skipped_files"]} == {
        str(missing_lidar), str(corrupt_lidar), str(missing_image), str(corrupt_image)}


@pytest.mark.parametrize(("table", "text", "message"), [
    ("sample", "[{\"token\": ", "not valid JSON"),
    ("ego_pose", "[{\"token\": \"x\", \"translation\": [0, 0, 0]}]", "record 0 lacks rotation"),
    ("scene", "{\"token\": \"x\"}", "expected a list"),
])
def test_malformed_tables_stop_with_the_file_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str,
                                                   text: str, message: str) -> None:
    src = Miniature(tmp_path / "nuscenes").write()
    (src / VERSION / f"{table}.json").write_text(text)
    with pytest.raises(SystemExit):
        convert(src, tmp_path / "out")
    error = capsys.readouterr().err
    assert str(src / VERSION / f"{table}.json") in error and message in error


def test_converted_shards_train_the_bev_recipes_and_evaluate(converted: tuple[Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from xmodal.commands.eval import eval_main
    from xmodal.commands.main import main

    _, out = converted
    monkeypatch.chdir(tmp_path)
    data = [f"--data.train={out}/train-*.tar", f"--data.val={out}/val-*.tar", "--data.batch_size=2",
            "--data.num_workers=0", "--trainer.max_steps=1", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--model.student.init_args.channels=16"]
    main(["fit", "--config", str(ROOT / "configs/bev/lidar_teacher.yaml"), *data])
    main(["fit", "--config", str(ROOT / "configs/bev/camera_student.yaml"), *data])
    metrics = tmp_path / "metrics.json"
    eval_main(["bev", "--model", "runs/models/bev-lidar", "--config", str(ROOT / "configs/bev/lidar_teacher.yaml"),
               "--shards", f"{out}/val-*.tar", "--out", str(metrics)])
    result = json.loads(metrics.read_text())["metrics"]
    assert result["samples"] == 2 and 0.0 <= result["mAP"] <= 1.0
    assert {name: row["gt"] for name, row in result["per_class"].items()} == {
        "car": 2, "truck": 2, "pedestrian": 2, "cyclist": 2}

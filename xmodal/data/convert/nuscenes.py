"""nuScenes v1.0 (``xmodal data convert nuscenes SRC --out DIR``): keyframes into ``bev-scenes`` shards.

Layout read: ``SRC/v1.0-mini/`` (or ``v1.0-trainval/``, ``v1.0-test/``; ``--version`` picks one when several are
there) with the JSON tables, and the blobs they name: ``samples/LIDAR_TOP/*.pcd.bin`` (float32, 5 per point: x, y,
z, intensity 0-255, ring), ``sweeps/LIDAR_TOP/*.pcd.bin`` and ``samples/CAM_*/*.jpg``. The tables are read with our
own small reader (``nuscenes-devkit`` is needed only for the official scene splits, and the tests compare against
it).

One sample per keyframe, in the fields :mod:`xmodal.data.corpora.bevscenes` writes, so the BEV recipes and
``xmodal eval bev`` run on it unchanged. Everything is in the **ego frame of the keyframe's LiDAR sweep** (the ego
pose at the ``LIDAR_TOP`` keyframe's timestamp: x forward, y left, z up from the ground under the rear axle):

``lidar.npy``
    float32 ``N x 5``: x, y, z, intensity (``/255``, so in [0, 1] like the corpus'), and the time lag in seconds
    behind the keyframe (0 for its own points). The keyframe's points come first, then ``--sweeps`` earlier sweeps
    (default 9: ten in all, as nuScenes' detection baselines use), each moved through the global frame into the
    keyframe's ego frame. As in the devkit, points within 1 m of the sensor in x and y (the car's own roof) are
    dropped. :class:`~xmodal.modalities.bev.BEVModality` reads the first four columns.
``<camera>.jpg``
    the six keyframe images (``cam_front.jpg``... : channel names in lower case, as WebDataset reads field names),
    as stored or, with ``--image-height``, resized (the intrinsics scaled to match).
``json``
    ``scene`` (its name), ``token``, ``timestamp``, ``sweeps``; ``cameras``: ``name``, ``intrinsics`` (3 x 3) and
    ``extrinsics`` (4 x 4 camera-to-ego, including the ego's motion between the camera's and the LiDAR's
    timestamps); ``boxes``: ``translation``, ``size`` [w, l, h], ``rotation`` (yaw), ``velocity`` [vx, vy] (m/s in
    the ego frame, by the devkit's rule; absent where it cannot be estimated), ``class``, ``category`` (the
    nuScenes category) and ``num_lidar_pts``.

Classes (``--classes``): ``xmodal`` (default) maps nuScenes' detection classes onto the recipes' four:
car -> car; truck, bus, trailer, construction vehicle -> truck; pedestrian -> pedestrian; bicycle, motorcycle ->
cyclist (barriers, traffic cones and the categories nuScenes does not score are left out). ``nuscenes`` keeps the
ten detection class names (a recipe then needs that class list).

Splits: ``--split-file`` (JSON ``{"train": [scene names], "val": [...]}``), else the official scene splits of
``nuscenes.utils.splits`` when the devkit is installed (``mini_train``/``mini_val`` for v1.0-mini), else every
scene in ``train``; the manifest states which.
"""

from __future__ import annotations

import argparse
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.data.convert.base import Conversion, ConvertError, SkipSample, read_json

LIDAR = "LIDAR_TOP"
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
POINT_DIM = 5  # x, y, z, intensity, ring index
CLOSE_RADIUS = 1.0  # metres: the devkit's remove_close radius, applied in the sensor frame
DEFAULT_SWEEPS = 9
FIELDS: dict[str, tuple[str, ...]] = {  # the fields this reader uses, checked in every record
    "scene": ("token", "name", "first_sample_token"),
    "sample": ("token", "timestamp", "scene_token", "next"),
    "sample_data": ("token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "filename", "timestamp",
                    "is_key_frame", "prev"),
    "sample_annotation": ("token", "sample_token", "instance_token", "translation", "size", "rotation",
                          "num_lidar_pts", "prev", "next"),
    "calibrated_sensor": ("token", "sensor_token", "translation", "rotation", "camera_intrinsic"),
    "ego_pose": ("token", "translation", "rotation"),
    "sensor": ("token", "channel"),
    "instance": ("token", "category_token"),
    "category": ("token", "name"),
}
DETECTION_CLASSES: dict[str, str] = {  # nuScenes category -> detection class (the devkit's detection mapping)
    "movable_object.barrier": "barrier", "vehicle.bicycle": "bicycle", "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus", "vehicle.car": "car", "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle", "human.pedestrian.adult": "pedestrian", "human.pedestrian.child":
    "pedestrian", "human.pedestrian.construction_worker": "pedestrian", "human.pedestrian.police_officer":
    "pedestrian", "movable_object.trafficcone": "traffic_cone", "vehicle.trailer": "trailer", "vehicle.truck": "truck",
}
NUSCENES_CLASSES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
                    "pedestrian", "traffic_cone")
XMODAL_CLASSES: dict[str, str] = {
    "car": "car", "truck": "truck", "bus": "truck", "trailer": "truck", "construction_vehicle": "truck",
    "pedestrian": "pedestrian", "bicycle": "cyclist", "motorcycle": "cyclist",
}
OFFICIAL_SPLITS = {"v1.0-mini": {"train": "mini_train", "val": "mini_val"},
                   "v1.0-trainval": {"train": "train", "val": "val"}, "v1.0-test": {"test": "test"}}
VELOCITY_MAX_GAP_S = 1.5  # the devkit's max_time_diff (doubled for a centred difference)

Matrix = tuple[tuple[float, ...], ...]


# --- geometry -------------------------------------------------------------------------------------------------


def quaternion_matrix(q: Sequence[float]) -> np.ndarray:
    """The 3 x 3 rotation of a quaternion ``[w, x, y, z]`` (normalised first)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def pose_matrix(record: dict[str, Any]) -> np.ndarray:
    """4 x 4 from a ``calibrated_sensor`` (sensor -> ego) or ``ego_pose`` (ego -> global) record."""
    pose = np.eye(4)
    pose[:3, :3] = quaternion_matrix(record["rotation"])
    pose[:3, 3] = record["translation"]
    return pose


def _frozen(matrix: np.ndarray) -> Matrix:
    return tuple(tuple(float(v) for v in row) for row in matrix)


# --- tables ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tables:
    """The nuScenes tables this reader uses, each by token, and the folder they came from."""

    root: Path
    records: dict[str, dict[str, dict[str, Any]]]

    def get(self, table: str, token: str) -> dict[str, Any]:
        try:
            return self.records[table][token]
        except KeyError as error:
            raise ConvertError(f"{self.root / (table + '.json')}: no record with token {token!r}") from error


def read_tables(root: Path) -> Tables:
    """Read and check the tables in ``root`` (a ``v1.0-*`` folder).

    Raises:
        ConvertError: a missing or malformed table, naming the file (and the record and field).
    """
    records: dict[str, dict[str, dict[str, Any]]] = {}
    for table, fields in FIELDS.items():
        path = root / f"{table}.json"
        rows = read_json(path)
        if not isinstance(rows, list):
            raise ConvertError(f"{path}: expected a list of records, got {type(rows).__name__}")
        for index, row in enumerate(rows):
            missing = [name for name in fields if not isinstance(row, dict) or name not in row]
            if missing:
                raise ConvertError(f"{path}: record {index} lacks {', '.join(missing)}")
        records[table] = {row["token"]: row for row in rows}
    return Tables(root, records)


# --- jobs -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """A LiDAR sweep file, its sensor-to-(keyframe ego) transform and its time lag behind the keyframe."""

    path: Path
    to_ego: Matrix
    time_lag: float


@dataclass(frozen=True)
class View:
    """A camera image with its calibration (``extrinsics``: camera-to-(keyframe ego))."""

    name: str
    path: Path
    intrinsics: Matrix
    extrinsics: Matrix


@dataclass(frozen=True)
class KeyFrame:
    """One nuScenes sample to convert: everything its sample needs, precomputed from the tables."""

    token: str
    split: str
    scene: str
    timestamp: int
    sweeps: tuple[Sweep, ...]  # the keyframe's own first
    views: tuple[View, ...]
    boxes: tuple[dict[str, Any], ...] = field(default=())
    image_height: int | None = None


@dataclass(frozen=True)
class Index:
    """Lookups the tables do not give directly: each sample's keyframe ``sample_data`` per channel, and its
    annotations."""

    keyframes: dict[tuple[str, str], dict[str, Any]]
    annotations: dict[str, list[dict[str, Any]]]

    @classmethod
    def of(cls, tables: Tables) -> Index:
        keyframes: dict[tuple[str, str], dict[str, Any]] = {}
        for record in tables.records["sample_data"].values():
            if record["is_key_frame"]:
                keyframes[(record["sample_token"], channel_of(tables, record))] = record
        annotations: dict[str, list[dict[str, Any]]] = {}
        for record in tables.records["sample_annotation"].values():
            annotations.setdefault(record["sample_token"], []).append(record)
        return cls(keyframes, annotations)

    def keyframe(self, tables: Tables, sample: str, channel: str) -> dict[str, Any]:
        if (sample, channel) not in self.keyframes:
            raise ConvertError(f"{tables.root / 'sample_data.json'}: sample {sample} has no {channel} keyframe")
        return self.keyframes[(sample, channel)]


def channel_of(tables: Tables, sample_data: dict[str, Any]) -> str:
    calibration = tables.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
    return str(tables.get("sensor", calibration["sensor_token"])["channel"])


def sensor_to_global(tables: Tables, sample_data: dict[str, Any]) -> np.ndarray:
    """4 x 4: the sensor's frame to the global frame at the sample_data's timestamp."""
    calibration = tables.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
    return pose_matrix(tables.get("ego_pose", sample_data["ego_pose_token"])) @ pose_matrix(calibration)


def sweeps_of(tables: Tables, src: Path, lidar: dict[str, Any], count: int) -> tuple[Sweep, ...]:
    """The keyframe sweep and up to ``count`` earlier ones (fewer at the start of a scene)."""
    to_ego = np.linalg.inv(pose_matrix(tables.get("ego_pose", lidar["ego_pose_token"])))
    sweeps, record = [], lidar
    while True:
        lag = (lidar["timestamp"] - record["timestamp"]) * 1e-6
        sweeps.append(Sweep(src / record["filename"], _frozen(to_ego @ sensor_to_global(tables, record)), lag))
        if len(sweeps) > count or not record["prev"]:
            return tuple(sweeps)
        record = tables.get("sample_data", record["prev"])


def views_of(tables: Tables, index: Index, src: Path, sample: str, lidar: dict[str, Any]) -> tuple[View, ...]:
    to_ego = np.linalg.inv(pose_matrix(tables.get("ego_pose", lidar["ego_pose_token"])))
    views = []
    for channel in CAMERAS:
        record = index.keyframe(tables, sample, channel)
        calibration = tables.get("calibrated_sensor", record["calibrated_sensor_token"])
        intrinsics = _frozen(np.asarray(calibration["camera_intrinsic"]))
        views.append(View(channel.lower(), src / record["filename"], intrinsics,
                          _frozen(to_ego @ sensor_to_global(tables, record))))
    return tuple(views)


def boxes_of(tables: Tables, index: Index, sample: str, lidar: dict[str, Any],
             class_map: dict[str, str] | None) -> tuple[dict[str, Any], ...]:
    """The sample's annotations in the keyframe's ego frame, with a class of ``class_map`` (``None``: the detection
    classes); others are left out."""
    ego = pose_matrix(tables.get("ego_pose", lidar["ego_pose_token"]))
    rotation, origin = ego[:3, :3], ego[:3, 3]
    boxes = []
    for record in index.annotations.get(sample, []):
        category = tables.get("category", tables.get("instance", record["instance_token"])["category_token"])["name"]
        detection = DETECTION_CLASSES.get(category)
        name = detection if class_map is None else class_map.get(detection or "")
        if name is None:
            continue
        box_rotation = rotation.T @ quaternion_matrix(record["rotation"])
        box: dict[str, Any] = {
            "translation": np.round(rotation.T @ (np.asarray(record["translation"]) - origin), 4).tolist(),
            "size": [round(float(v), 4) for v in record["size"]],
            "rotation": round(math.atan2(box_rotation[1, 0], box_rotation[0, 0]), 6),
            "class": name, "category": category, "num_lidar_pts": int(record["num_lidar_pts"]),
        }
        velocity = global_velocity(tables, record)
        if velocity is not None:
            box["velocity"] = np.round((rotation.T @ velocity)[:2], 4).tolist()
        boxes.append(box)
    return tuple(boxes)


def global_velocity(tables: Tables, record: dict[str, Any]) -> np.ndarray | None:
    """m/s in the global frame from the neighbouring annotations of the instance (the devkit's rule: a centred
    difference where both exist, gaps up to 1.5 s, 3 s centred); ``None`` where it cannot be estimated."""
    if not record["prev"] and not record["next"]:
        return None
    first = tables.get("sample_annotation", record["prev"]) if record["prev"] else record
    last = tables.get("sample_annotation", record["next"]) if record["next"] else record
    seconds = 1e-6 * (tables.get("sample", last["sample_token"])["timestamp"]
                      - tables.get("sample", first["sample_token"])["timestamp"])
    limit = VELOCITY_MAX_GAP_S * (2 if record["prev"] and record["next"] else 1)
    if not 0 < seconds <= limit:
        return None
    return (np.asarray(last["translation"], dtype=np.float64) - np.asarray(first["translation"])) / seconds


# --- splits ---------------------------------------------------------------------------------------------------


def official_splits(version: str) -> dict[str, list[str]] | None:
    """The devkit's scene splits of ``version`` (``None`` when the devkit is not installed or has none)."""
    try:
        from nuscenes.utils.splits import create_splits_scenes
    except ImportError:
        return None
    names = OFFICIAL_SPLITS.get(version)
    if names is None:
        return None
    scenes = create_splits_scenes()
    return {split: list(scenes[name]) for split, name in names.items()}


def read_split_file(path: Path) -> dict[str, list[str]]:
    """``{"split": [scene names]}`` from a JSON split file (:class:`ConvertError` when malformed)."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(
            isinstance(names, list) and all(isinstance(n, str) for n in names) for names in data.values()):
        raise ConvertError(f"{path}: expected {{\"split\": [scene names], ...}}")
    return {str(split): names for split, names in data.items()}


def choose_splits(version: str, split_file: Path | None, scenes: Sequence[str]) -> tuple[dict[str, list[str]], str]:
    """Scene names per split, and how they were chosen (for the manifest). Scenes the splits do not name are left
    out; split scenes this version does not have are ignored."""
    if split_file is not None:
        splits, how = read_split_file(split_file), f"split file {split_file}"
    else:
        official = official_splits(version)
        if official is not None:
            splits, how = official, f"official {version} scene splits (nuscenes.utils.splits)"
        else:
            splits, how = {"train": list(scenes)}, "every scene in train (no --split-file; nuscenes-devkit absent)"
    present = set(scenes)
    return {split: [s for s in names if s in present] for split, names in splits.items()}, how


# --- the sample -----------------------------------------------------------------------------------------------


def read_points(sweep: Sweep) -> np.ndarray:
    """One sweep in the keyframe's ego frame: float32 ``N x 5`` (x, y, z, intensity / 255, time lag)."""
    if not sweep.path.is_file():
        raise SkipSample(sweep.path, "missing lidar")
    size = sweep.path.stat().st_size
    points = np.fromfile(sweep.path, dtype=np.float32).reshape(-1, POINT_DIM) if size % (4 * POINT_DIM) == 0 else None
    if points is None or size == 0 or not np.isfinite(points).all():
        raise SkipSample(sweep.path, "corrupt lidar")
    points = points[~((np.abs(points[:, 0]) < CLOSE_RADIUS) & (np.abs(points[:, 1]) < CLOSE_RADIUS))]
    to_ego = np.asarray(sweep.to_ego)
    xyz = points[:, :3].astype(np.float64) @ to_ego[:3, :3].T + to_ego[:3, 3]
    lag = np.full((len(points), 1), sweep.time_lag)
    return np.concatenate([xyz, points[:, 3:4] / 255.0, lag], axis=1).astype(np.float32)


def read_view(view: View, height: int | None) -> tuple[bytes, Matrix]:
    """The camera's JPEG bytes (re-encoded at ``height`` rows when given) and its intrinsics for them."""
    from PIL import Image

    if not view.path.is_file():
        raise SkipSample(view.path, "missing camera image")
    data = view.path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if height is None or height == image.height:
                return data, view.intrinsics
            scale = height / image.height
            width = max(2, round(image.width * scale))
            resized = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
            sx, sy = width / image.width, scale
    except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for a truncated or foreign file
        raise SkipSample(view.path, "corrupt camera image") from error
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=90)
    k = np.asarray(view.intrinsics) * np.array([[sx], [sy], [1.0]])
    return buffer.getvalue(), _frozen(k)


def sample(frame: KeyFrame) -> dict[str, Any]:
    """The shard sample of one keyframe: ``lidar.npy``, ``json`` and one ``<camera>.jpg`` per camera."""
    points = np.concatenate([read_points(sweep) for sweep in frame.sweeps])
    buffer = io.BytesIO()
    np.save(buffer, points)
    out: dict[str, Any] = {"__key__": frame.token, "lidar.npy": buffer.getvalue()}
    cameras = []
    for view in frame.views:
        out[f"{view.name}.jpg"], intrinsics = read_view(view, frame.image_height)
        cameras.append({"name": view.name, "intrinsics": np.round(intrinsics, 6).tolist(),
                        "extrinsics": np.round(view.extrinsics, 6).tolist()})
    out["json"] = {"scene": frame.scene, "token": frame.token, "timestamp": frame.timestamp,
                   "sweeps": len(frame.sweeps) - 1, "cameras": cameras, "boxes": list(frame.boxes)}
    return out


def frame_sources(frame: KeyFrame) -> list[Path]:
    return [sweep.path for sweep in frame.sweeps] + [view.path for view in frame.views]


# --- the converter --------------------------------------------------------------------------------------------


def find_version(src: Path, version: str | None) -> Path:
    """The ``v1.0-*`` table folder in ``src``."""
    if version is not None:
        if not (src / version).is_dir():
            raise ConvertError(f"{src / version}: no such table folder")
        return src / version
    found = sorted(p for p in src.glob("v1.0-*") if p.is_dir()) if src.is_dir() else []
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise ConvertError(f"{src}: expected one v1.0-* table folder (found {listed}); pick one with --version")
    return found[0]


@dataclass(frozen=True)
class Options:
    """What a nuScenes conversion is asked for."""

    sweeps: int = DEFAULT_SWEEPS
    cameras: bool = True
    image_height: int | None = None
    classes: str = "xmodal"


def build_frames(src: Path, tables: Tables, splits: dict[str, list[str]],
                 options: Options) -> dict[str, list[KeyFrame]]:
    """The keyframes of each split's scenes, in scene order and time order."""
    index = Index.of(tables)
    scenes = {record["name"]: record for record in tables.records["scene"].values()}
    class_map = None if options.classes == "nuscenes" else XMODAL_CLASSES
    frames: dict[str, list[KeyFrame]] = {}
    for split, names in splits.items():
        frames[split] = []
        for name in names:
            token = scenes[name]["first_sample_token"]
            while token:
                record = tables.get("sample", token)
                lidar = index.keyframe(tables, token, LIDAR)
                views = views_of(tables, index, src, token, lidar) if options.cameras else ()
                frames[split].append(KeyFrame(
                    token, split, name, int(record["timestamp"]), sweeps_of(tables, src, lidar, options.sweeps),
                    views, boxes_of(tables, index, token, lidar, class_map), options.image_height))
                token = record["next"]
    return frames


class NuScenesConverter:
    name = "nuscenes"
    help = ("nuScenes v1.0: keyframes with LiDAR sweeps, six cameras and ego-frame boxes, in bev-scenes fields "
            "(splits: --split-file, else the devkit's official ones, else all in train)")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--version", default=None, help="table folder, e.g. v1.0-mini (default: the only one)")
        parser.add_argument("--sweeps", type=int, default=DEFAULT_SWEEPS,
                            help="earlier LiDAR sweeps added to each keyframe's points (default: %(default)s)")
        parser.add_argument("--classes", choices=("xmodal", "nuscenes"), default="xmodal", help=(
            "box classes: 'xmodal' maps onto car/truck/pedestrian/cyclist (the recipes' classes), 'nuscenes' keeps "
            "the ten detection classes (default: %(default)s)"))
        parser.add_argument("--split-file", type=Path, default=None,
                            help='JSON {"train": [scene names], "val": [...]} (default: the official splits)')
        parser.add_argument("--image-height", type=int, default=None,
                            help="resize camera images to this height (intrinsics scaled; default: as stored)")
        parser.add_argument("--no-cameras", action="store_true", help="LiDAR and boxes only")

    def build(self, src: Path, args: argparse.Namespace) -> Conversion[KeyFrame]:
        if args.sweeps < 0:
            raise ConvertError(f"--sweeps must be >= 0, got {args.sweeps}")
        root = find_version(src, args.version)
        tables = read_tables(root)
        scene_names = sorted(record["name"] for record in tables.records["scene"].values())
        splits, how = choose_splits(root.name, args.split_file, scene_names)
        options = Options(args.sweeps, not args.no_cameras, args.image_height, args.classes)
        frames = build_frames(src, tables, splits, options)
        from xmodal.data.corpora import bevscenes  # imports torch: not at module level, so that --help needs none

        classes = list(NUSCENES_CLASSES if args.classes == "nuscenes" else bevscenes.CLASSES)
        left_out = sorted(set(scene_names) - {name for names in splits.values() for name in names})
        return Conversion(
            format=self.name, splits=dict(frames), sample=sample, sources=frame_sources,
            options={"version": root.name, "sweeps": args.sweeps, "cameras": options.cameras,
                     "image_height": args.image_height, "classes": args.classes, "splits": how,
                     "scenes": {split: len(names) for split, names in splits.items()},
                     "scenes_left_out": len(left_out), "frame": "ego frame of the keyframe's LIDAR_TOP sweep",
                     "lidar_columns": ["x", "y", "z", "intensity/255", "time_lag_s"]},
            side_files=lambda out: {"classes": classes, "cameras": [c.lower() for c in CAMERAS] if options.cameras
                                    else []})


CONVERTERS = [NuScenesConverter()]

"""BEV scenes: procedural driving scenes with a simulated spinning LiDAR and six rendered cameras, for BEV 3D detection.

Scenes
    A ground plane (z = 0) with a main road through the ego's position (1-3 lanes each way, sometimes a parking
    lane), sometimes a crossing road, sidewalks and verges. Cars, trucks, pedestrians and cyclists are oriented 3D
    boxes with size priors (:data:`SIZE_PRIORS`, jittered): vehicles drive in lanes along the road (yaw = road
    direction of their side, with noise) or are parked at the kerb or off-road; pedestrians walk on sidewalks or
    cross; cyclists ride at the road edge. Unannotated clutter: building blocks along the road, poles and small
    blocks on the sidewalks. Nothing overlaps; annotated centres lie in the grid (``|x|, |y| < grid_range - 1``).
LiDAR (``lidar.npy``, float32 ``N x 4``: x, y, z, intensity in [0, 1], ego frame)
    A 32-beam spinning sensor at (0, 0, 1.8) with HDL-32E elevations (-30.67 to +10.67 degrees), 720 azimuth
    steps, ray casting against the ground and every box (nearest hit wins, so occlusion is physical), range noise
    (2 cm), 5% dropout, 1-70 m range. Intensity is the material's reflectivity (per class, clutter, road, lane
    marking, sidewalk, verge) times the incidence angle. Boxes record ``num_lidar_pts``; boxes with no points are
    kept (nuScenes' evaluation drops them).
Cameras (``<name>.jpg``)
    Six pinholes around the ego car as in nuScenes (:data:`CAMERA_LAYOUT`; 70 degree horizontal FOV, 110 for the
    back one) at 1.5 m, named in lower case (``cam_front``: WebDataset lower-cases field names), OpenCV axes,
    pixel ``(u, v)`` covering ``[u, u + 1) x [v, v + 1)``. Each pixel casts a ray like the LiDAR: sky gradient,
    textured ground with road markings, boxes flat-shaded per face by a sun with distinct class colours (jittered
    per instance), a lighter front face and a dark lower band on vehicles, window bands on cars, distance fog,
    pixel noise.
``json``
    ``{"scene", "cameras": [{"name", "intrinsics", "extrinsics" (camera-to-ego)}], "boxes": [{"translation",
    "size" [w, l, h], "rotation" (yaw of the length axis from +x toward +y), "class", "num_lidar_pts"}]}``.

Splits are independent streams seeded by ``(seed, split, index)``; the output does not depend on ``workers``.
Sizes (train/val/test scenes): :data:`SIZES`. ``small`` (1500/200/300) built in 48 s on two shared cores
(41 scenes/s, about 17k points and 15 annotated boxes per scene, 594 MB).
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from xmodal.data.corpora.writer import Corpus, Timing, Written, default_workers, write_corpus

CLASSES = ("car", "truck", "pedestrian", "cyclist")
CLUTTER = "clutter"
SIZE_PRIORS: dict[str, tuple[float, float, float]] = {  # mean [w, l, h] in metres
    "car": (1.9, 4.6, 1.7), "truck": (2.5, 8.0, 3.0), "pedestrian": (0.7, 0.7, 1.75), "cyclist": (0.7, 1.8, 1.6),
}
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "car": (200, 45, 45), "truck": (45, 95, 205), "pedestrian": (235, 205, 50), "cyclist": (50, 185, 90),
}
REFLECTIVITY = {"car": 0.45, "truck": 0.35, "pedestrian": 0.2, "cyclist": 0.3}
GROUND_REFLECTIVITY = np.array([0.25, 0.18, 0.08, 0.6])  # verge, sidewalk, road, lane marking
CAMERA_LAYOUT: dict[str, tuple[float, float, float, float]] = {  # x, y, yaw (deg), horizontal FOV (deg)
    "cam_front": (1.7, 0.0, 0.0, 70.0), "cam_front_right": (1.5, -0.5, -55.0, 70.0),
    "cam_front_left": (1.5, 0.5, 55.0, 70.0), "cam_back": (-1.0, 0.0, 180.0, 110.0),
    "cam_back_left": (1.0, 0.5, 110.0, 70.0), "cam_back_right": (1.0, -0.5, -110.0, 70.0),
}
CAMERA_HEIGHT = 1.5
HDL32_ELEVATIONS = tuple(float(e) for e in np.round(np.linspace(-30.67, 10.67, 32), 3))
SIZES = {"tiny": (16, 8, 8), "small": (1500, 200, 300), "medium": (6000, 800, 1200)}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
GROUND, SKY = -1, -2
LANE = 3.5
EGO_FOOTPRINT = (2.0, 4.8)  # w, l of the ego car at the origin, kept free of objects
SKY_COLOURS = np.array([[205.0, 215.0, 230.0], [90.0, 140.0, 210.0]])  # horizon, zenith
GROUND_COLOURS = np.array([[120.0, 110.0, 95.0], [140.0, 138.0, 132.0], [72.0, 72.0, 76.0], [225.0, 225.0, 215.0]])


@dataclass(frozen=True)
class LidarSpec:
    """A spinning LiDAR: beam elevations (degrees, ascending), azimuth steps per turn, noise and range."""

    height: float = 1.8
    elevations: tuple[float, ...] = HDL32_ELEVATIONS
    azimuth_steps: int = 720
    range_noise: float = 0.02
    dropout: float = 0.05
    min_range: float = 1.0
    max_range: float = 70.0


@dataclass(frozen=True)
class Road:
    """A straight road: travel axis ``yaw``, centre line ``offset`` metres left of the ego (along the normal)."""

    yaw: float
    offset: float
    lanes: int  # per direction
    parking: float  # width of the parking lane on each side (0: none)
    sidewalk: float

    @property
    def half_width(self) -> float:
        return self.lanes * LANE + self.parking

    def coords(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ego ``... x 2`` points -> (distance along the road, signed distance from the centre line)."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return xy[..., 0] * c + xy[..., 1] * s, -xy[..., 0] * s + xy[..., 1] * c - self.offset

    def point(self, along: float, across: float) -> np.ndarray:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        d = across + self.offset
        return np.array([along * c - d * s, along * s + d * c])


@dataclass(eq=False)
class Scene:
    """Boxes (annotated objects and clutter) on a ground plane, with the look of the ground, sky and sun."""

    centres: np.ndarray  # K x 3
    sizes: np.ndarray  # K x 3 (w, l, h)
    yaws: np.ndarray  # K
    kinds: tuple[str, ...]  # a class name or CLUTTER
    colours: np.ndarray  # K x 3, RGB 0-255
    reflectivity: np.ndarray  # K
    roads: tuple[Road, ...] = ()
    sun: np.ndarray = field(default_factory=lambda: np.array([0.4, 0.3, 0.866]))
    sky: np.ndarray = field(default_factory=SKY_COLOURS.copy)  # 2 x 3: horizon, zenith
    ground: np.ndarray = field(default_factory=GROUND_COLOURS.copy)  # 4 x 3: per ground_kind
    texture: np.ndarray = field(default_factory=lambda: np.zeros((8, 8)))  # T x T in [-1, 1]

    @classmethod
    def of(cls, boxes: Sequence[tuple[str, Sequence[float], Sequence[float], float]], **look: Any) -> Scene:
        """A scene from ``(kind, centre, size, yaw)`` boxes with default colours and reflectivities."""
        kinds = tuple(b[0] for b in boxes)
        return cls(
            centres=np.array([b[1] for b in boxes], dtype=np.float64).reshape(-1, 3),
            sizes=np.array([b[2] for b in boxes], dtype=np.float64).reshape(-1, 3),
            yaws=np.array([b[3] for b in boxes], dtype=np.float64), kinds=kinds,
            colours=np.array([CLASS_COLOURS.get(k, (128, 128, 128)) for k in kinds], dtype=np.float64).reshape(-1, 3),
            reflectivity=np.array([REFLECTIVITY.get(k, 0.3) for k in kinds]), **look)

    def corners(self, k: int) -> np.ndarray:
        """The 8 corners of box ``k``: ``8 x 3`` (bottom four, then top four)."""
        return box_corners(self.centres[k], self.sizes[k], float(self.yaws[k]))


def box_corners(centre: Sequence[float], size: Sequence[float], yaw: float) -> np.ndarray:
    """Corners ``8 x 3`` of a box with ``centre`` [x, y, z], ``size`` [w, l, h] and ``yaw``."""
    w, length, h = size
    local = np.array([[sx * length / 2, sy * w / 2, sz * h / 2] for sz in (-1, 1) for sx, sy in
                      ((1, 1), (1, -1), (-1, -1), (-1, 1))])
    c, s = math.cos(yaw), math.sin(yaw)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return local @ rot.T + np.asarray(centre, dtype=np.float64)


# --- scene generation ---------------------------------------------------------------------------------------


class _Placer:
    """Accepts boxes whose BEV footprints (grown by a margin) overlap no earlier box; circle test, then SAT."""

    def __init__(self) -> None:
        self.boxes: list[tuple[str, np.ndarray, np.ndarray, float]] = []
        self.footprints: list[np.ndarray] = []
        self.xy = np.zeros((0, 2))
        self.radii = np.zeros(0)
        self._reserve(np.zeros(2), np.array([*EGO_FOOTPRINT, 1.5]), 0.0, 0.5)

    def add(self, kind: str, xy: np.ndarray, size: np.ndarray, yaw: float, margin: float = 0.3) -> bool:
        foot = _footprint(xy, size[0] + margin, size[1] + margin, yaw)
        radius = 0.5 * math.hypot(size[0] + margin, size[1] + margin)
        near = np.nonzero(np.hypot(*(self.xy - xy).T) < self.radii + radius)[0]
        if any(_overlap(foot, self.footprints[i]) for i in near):
            return False
        self.boxes.append((kind, np.array([xy[0], xy[1], size[2] / 2]), size, yaw))
        self._reserve(xy, size, yaw, margin)
        return True

    def _reserve(self, xy: np.ndarray, size: np.ndarray, yaw: float, margin: float) -> None:
        self.footprints.append(_footprint(xy, size[0] + margin, size[1] + margin, yaw))
        self.xy = np.vstack([self.xy, xy])
        self.radii = np.append(self.radii, 0.5 * math.hypot(size[0] + margin, size[1] + margin))


def _footprint(xy: np.ndarray, w: float, length: float, yaw: float) -> np.ndarray:
    return box_corners([xy[0], xy[1], 0.0], [w, length, 0.0], yaw)[:4, :2]


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    for poly in (a, b):
        for i in range(2):
            edge = poly[i + 1] - poly[i]
            axis = np.array([-edge[1], edge[0]])
            pa, pb = a @ axis, b @ axis
            if pa.max() < pb.min() or pb.max() < pa.min():
                return False
    return True


def random_scene(rng: np.random.Generator, grid_range: float = 32.0) -> Scene:
    """A random driving scene whose annotated objects have centres inside ``[-grid_range, grid_range]^2``."""
    lanes, parking = int(rng.integers(1, 4)), float(rng.choice([0.0, 2.2]))
    offset = float(rng.uniform(-1, 1) * (lanes * LANE + parking - 1.6))  # the ego drives somewhere on the road
    main = Road(float(rng.normal(0.0, 0.12)), offset, lanes, parking, float(rng.uniform(2.5, 5.0)))
    roads = [main]
    if rng.random() < 0.35:
        roads.append(Road(main.yaw + math.pi / 2 + float(rng.normal(0, 0.08)), float(rng.uniform(-25, 25)),
                          int(rng.integers(1, 3)), 0.0, float(rng.uniform(2.5, 4.0))))
    placer = _Placer()
    _place_clutter(rng, placer, roads, grid_range)
    counts = {"car": rng.integers(4, 15), "truck": rng.integers(0, 4), "pedestrian": rng.integers(1, 11),
              "cyclist": rng.integers(0, 5)}
    for kind in CLASSES:
        for _ in range(int(counts[kind])):
            for _attempt in range(25):
                road = roads[0] if len(roads) == 1 or rng.random() < 0.75 else roads[1]
                xy, yaw = _pose(rng, kind, road, grid_range)
                if np.all(np.abs(xy) < grid_range - 1) and placer.add(kind, xy, _size(rng, kind), yaw):
                    break
    return _scene_from(rng, placer.boxes, tuple(roads))


def _size(rng: np.random.Generator, kind: str) -> np.ndarray:
    w, length, h = SIZE_PRIORS[kind]
    scale = rng.normal(1.0, 0.07, 3).clip(0.8, 1.2)
    return np.array([w, length, h]) * scale


def _pose(rng: np.random.Generator, kind: str, road: Road, grid_range: float) -> tuple[np.ndarray, float]:
    """A position and yaw for an object of ``kind`` along ``road`` (right-hand traffic)."""
    side = float(rng.choice([-1.0, 1.0]))
    along = float(rng.uniform(-1.5, 1.5) * grid_range)
    heading = road.yaw + (0.0 if side < 0 else math.pi)
    mode = rng.random()
    if kind in ("car", "truck"):
        if mode < 0.7:
            across = side * (LANE / 2 + LANE * int(rng.integers(road.lanes))) + rng.normal(0, 0.25)
            yaw = heading + rng.normal(0, 0.05)
        elif mode < 0.9 or kind == "truck":
            across = side * (road.half_width - (road.parking or 2.2) / 2 + rng.normal(0, 0.15))
            yaw = heading + rng.normal(0, 0.08)
        else:
            across = side * (road.half_width + road.sidewalk + rng.uniform(2, 12))
            yaw = rng.uniform(-math.pi, math.pi)
    elif kind == "pedestrian":
        if mode < 0.85:
            across = side * (road.half_width + rng.uniform(0.4, road.sidewalk - 0.4))
            yaw = heading + rng.choice([0.0, math.pi]) + rng.normal(0, 0.3) if mode < 0.6 else rng.uniform(-3, 3)
        else:
            across = rng.uniform(-road.half_width, road.half_width)
            yaw = road.yaw + rng.choice([-1.0, 1.0]) * math.pi / 2 + rng.normal(0, 0.2)
    else:
        across = side * (road.lanes * LANE - 0.7 + rng.normal(0, 0.2))
        yaw = heading + rng.normal(0, 0.1)
    return road.point(along, float(across)), float(_wrap(np.asarray(yaw)))


def _place_clutter(rng: np.random.Generator, placer: _Placer, roads: Sequence[Road], grid_range: float) -> None:
    """Building blocks along both sides of the main road (not on a crossing road), poles and small blocks."""
    main = roads[0]
    reach = 1.6 * grid_range
    for side in (-1.0, 1.0):
        along = -reach + rng.uniform(0, 8)
        while along < reach:
            length, depth, gap = rng.uniform(6, 20), rng.uniform(3, 10), rng.uniform(0, 8)
            across = side * (main.half_width + main.sidewalk + rng.uniform(0.3, 3) + depth / 2)
            xy = main.point(along + length / 2, across)
            if _off_roads(xy, roads, max(length, depth) / 2, sidewalks=True):
                placer.add(CLUTTER, xy, np.array([depth, length, rng.uniform(3, 12)]), main.yaw, margin=0.0)
            along += length + gap
    for road in roads:
        for side in (-1.0, 1.0):
            along = -reach + rng.uniform(0, 15)
            while along < reach:
                xy = road.point(along, side * (road.half_width + 0.5))
                if _off_roads(xy, roads, 0.3):
                    placer.add(CLUTTER, xy, np.array([0.25, 0.25, rng.uniform(4, 7)]), road.yaw, margin=0.1)
                along += rng.uniform(10, 25)
    for _ in range(int(rng.integers(0, 7))):
        road = roads[int(rng.integers(len(roads)))]
        xy = road.point(rng.uniform(-reach, reach), rng.choice([-1, 1]) * (road.half_width + rng.uniform(0.5, 2)))
        size = np.array([rng.uniform(0.4, 1.2), rng.uniform(0.4, 2.5), rng.uniform(0.6, 1.2)])
        if _off_roads(xy, roads, 1.4):
            placer.add(CLUTTER, xy, size, road.yaw + rng.normal(0, 0.3))


def _off_roads(xy: np.ndarray, roads: Sequence[Road], margin: float, sidewalks: bool = False) -> bool:
    """Whether ``xy`` is more than ``margin`` away from every carriageway (and sidewalk, if ``sidewalks``)."""
    return all(abs(float(r.coords(xy)[1])) > r.half_width + r.sidewalk * sidewalks + margin for r in roads)


def _scene_from(rng: np.random.Generator, boxes: Sequence[tuple[str, np.ndarray, np.ndarray, float]],
                roads: tuple[Road, ...]) -> Scene:
    colours, reflectivity = [], []
    for kind, _, _, _ in boxes:
        if kind == CLUTTER:
            grey = rng.uniform(70, 190)
            colours.append(grey * (1 + rng.uniform(-0.08, 0.08, 3)))
            reflectivity.append(rng.uniform(0.15, 0.5))
        else:
            colours.append(np.array(CLASS_COLOURS[kind]) * rng.uniform(0.8, 1.1) + rng.uniform(-22, 22, 3))
            reflectivity.append(REFLECTIVITY[kind] * rng.uniform(0.8, 1.2))
    elevation, azimuth = rng.uniform(0.5, 1.2), rng.uniform(-math.pi, math.pi)
    sun = np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                    math.sin(elevation)])
    tint = 1 + rng.uniform(-0.08, 0.08, 3)
    return Scene(
        centres=np.array([b[1] for b in boxes]).reshape(-1, 3), sizes=np.array([b[2] for b in boxes]).reshape(-1, 3),
        yaws=np.array([b[3] for b in boxes]), kinds=tuple(b[0] for b in boxes),
        colours=np.clip(np.array(colours).reshape(-1, 3), 0, 255), reflectivity=np.array(reflectivity), roads=roads,
        sun=sun, sky=SKY_COLOURS * tint * rng.uniform(0.85, 1.05),
        ground=GROUND_COLOURS * tint * rng.uniform(0.85, 1.1), texture=rng.uniform(-1, 1, (64, 64)))


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + math.pi) % (2 * math.pi) - math.pi


# --- ray casting ----------------------------------------------------------------------------------------------

Window = tuple[slice, Any]  # rows, columns (a slice or an index array) of a ray grid


@dataclass
class Hits:
    """Nearest hits of an ``R x C`` ray grid: distance ``t`` (inf: none), ``index`` (box, GROUND or SKY),
    ``face`` (hit face of a box: +-1 length, +-2 width, +-3 height axis; 0 otherwise) and ``normal`` ``R x C x 3``."""

    t: np.ndarray
    index: np.ndarray
    face: np.ndarray
    normal: np.ndarray


def trace(origin: np.ndarray, dirs: np.ndarray, scene: Scene, windows: Sequence[Window | None]) -> Hits:
    """Cast rays ``dirs`` (``R x C x 3``, unit) from ``origin`` against the ground and each box ``k`` (only the rays
    in ``windows[k]``, which must hold every ray that can hit it; ``None`` skips the box). Nearest hit wins."""
    down = dirs[..., 2] < 0
    t = np.where(down, -origin[2] / np.where(down, dirs[..., 2], -1.0), np.inf)
    index = np.where(down, GROUND, SKY)
    face = np.zeros(t.shape, dtype=np.int64)
    for k, window in enumerate(windows):
        if window is None:
            continue
        tk, fk = _slab(origin, dirs[window], scene.centres[k], scene.sizes[k], float(scene.yaws[k]))
        closer = tk < t[window]
        t[window] = np.where(closer, tk, t[window])
        index[window] = np.where(closer, k, index[window])
        face[window] = np.where(closer, fk, face[window])
    return Hits(t, index, face, _normals(scene, index, face))


def _slab(origin: np.ndarray, dirs: np.ndarray, centre: np.ndarray, size: np.ndarray,
          yaw: float) -> tuple[np.ndarray, np.ndarray]:
    """Entry distance of rays into an oriented box (inf: miss or origin inside) and the signed axis of the face."""
    c, s = math.cos(yaw), math.sin(yaw)
    rel = origin - centre
    o = np.array([c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2]])
    d = np.stack([c * dirs[..., 0] + s * dirs[..., 1], -s * dirs[..., 0] + c * dirs[..., 1], dirs[..., 2]], -1)
    half = np.array([size[1], size[0], size[2]]) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1, t2 = (-half - o) * inv, (half - o) * inv
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    axis = near.argmax(-1)
    enter = np.take_along_axis(near, axis[..., None], -1)[..., 0]
    hit = (enter <= far.min(-1)) & (enter > 0)
    sign = -np.sign(np.take_along_axis(d, axis[..., None], -1)[..., 0]).astype(np.int64)
    return np.where(hit, enter, np.inf), np.where(hit, sign * (axis + 1), 0)


def _normals(scene: Scene, index: np.ndarray, face: np.ndarray) -> np.ndarray:
    normal = np.zeros((*index.shape, 3))
    normal[index == GROUND] = (0.0, 0.0, 1.0)
    boxes = index >= 0
    yaw, f = scene.yaws[index[boxes]], face[boxes]
    axis, sign = np.abs(f), np.sign(f)
    c, s = np.cos(yaw), np.sin(yaw)
    normal[boxes] = sign[:, None] * np.stack([
        np.where(axis == 1, c, np.where(axis == 2, -s, 0.0)),
        np.where(axis == 1, s, np.where(axis == 2, c, 0.0)),
        (axis == 3).astype(np.float64)], -1)
    return normal


def lidar_window(corners: np.ndarray, spec: LidarSpec, azimuths: np.ndarray) -> Window | None:
    """The beams and azimuth columns of a sweep that can hit the box with ``corners`` (``8 x 3``)."""
    foot = corners[:4, :2]
    centre = foot.mean(0)
    axes = np.stack([foot[0] - foot[3], foot[0] - foot[1]])  # length and width edges
    local = np.abs(axes @ -centre) / np.linalg.norm(axes, axis=1)
    half = np.linalg.norm(axes, axis=1) / 2
    near = float(np.linalg.norm(np.maximum(local - half, 0.0)))
    far = float(np.linalg.norm(foot, axis=1).max())
    if near <= 1e-6:
        return slice(None), slice(None)
    if near > spec.max_range:
        return None
    low, high = corners[:, 2].min() - spec.height, corners[:, 2].max() - spec.height
    el = np.degrees([math.atan2(z, r) for z in (low, high) for r in (near, far)])
    rows = slice(int(np.searchsorted(spec.elevations, el.min() - 1e-6)),
                 int(np.searchsorted(spec.elevations, el.max() + 1e-6, side="right")))
    mid = math.atan2(centre[1], centre[0])
    spread = _wrap(np.arctan2(foot[:, 1], foot[:, 0]) - mid)
    offset = _wrap(azimuths - mid)
    cols = np.nonzero((offset >= spread.min() - 1e-9) & (offset <= spread.max() + 1e-9))[0]
    return (rows, cols) if rows.stop > rows.start and len(cols) else None


def lidar_sweep(scene: Scene, spec: LidarSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One LiDAR turn: float32 points ``N x 4`` (x, y, z, intensity) and the index of what each hit (box or GROUND)."""
    elevation = np.radians(np.asarray(spec.elevations))[:, None]
    azimuths = (rng.uniform(0, 1) + np.arange(spec.azimuth_steps)) * (2 * math.pi / spec.azimuth_steps)
    dirs = np.stack(np.broadcast_arrays(np.cos(elevation) * np.cos(azimuths), np.cos(elevation) * np.sin(azimuths),
                                        np.sin(elevation)), -1)
    origin = np.array([0.0, 0.0, spec.height])
    windows = [lidar_window(scene.corners(k), spec, azimuths) for k in range(len(scene.kinds))]
    hits = trace(origin, dirs, scene, windows)
    distance = hits.t + rng.normal(0.0, 1.0, hits.t.shape) * spec.range_noise
    keep = (hits.t >= spec.min_range) & (hits.t <= spec.max_range) & (rng.random(hits.t.shape) >= spec.dropout)
    points = origin + dirs[keep] * distance[keep][:, None]
    index = hits.index[keep]
    reflectivity = np.empty(len(index))
    on_box = index >= 0
    reflectivity[on_box] = scene.reflectivity[index[on_box]]
    reflectivity[~on_box] = GROUND_REFLECTIVITY[ground_kind(scene, points[~on_box, :2])]
    incidence = np.abs(np.sum(hits.normal[keep] * dirs[keep], -1))
    intensity = reflectivity * (0.25 + 0.75 * incidence) + rng.normal(0.0, 0.01, len(index))
    return np.concatenate([points, np.clip(intensity, 0, 1)[:, None]], 1).astype(np.float32), index


def ground_kind(scene: Scene, xy: np.ndarray) -> np.ndarray:
    """Ground material of ego points ``... x 2``: 0 verge, 1 sidewalk, 2 road, 3 lane marking."""
    kind = np.zeros(xy.shape[:-1], dtype=np.int64)
    for road in scene.roads:
        along, across = road.coords(xy)
        gap = np.abs(across)
        kind = np.maximum(kind, np.where(gap < road.half_width, 2, (gap < road.half_width + road.sidewalk) * 1))
        line = np.round(gap / LANE)
        dashed = (line == 0) | (np.mod(along, 9.0) < 3.0)
        marking = (np.abs(gap - line * LANE) < 0.1) & (line <= road.lanes - (road.parking == 0)) & dashed
        kind = np.where(marking & (gap < road.half_width), 3, kind)
    return kind


# --- cameras --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Camera:
    """A pinhole camera: ``intrinsics`` 3 x 3 and ``extrinsics`` 4 x 4 camera-to-ego (OpenCV axes)."""

    name: str
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    height: int
    width: int

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """The camera centre (ego frame) and unit rays through the pixel centres, ``H x W x 3``."""
        v, u = np.mgrid[0:self.height, 0:self.width] + 0.5
        pixels = np.stack([u, v, np.ones_like(u)], -1)
        dirs = pixels @ np.linalg.inv(self.intrinsics).T @ self.extrinsics[:3, :3].T
        return self.extrinsics[:3, 3].copy(), dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ego points ``N x 3`` -> pixel coordinates ``N x 2`` and depths ``N``."""
        cam = (points - self.extrinsics[:3, 3]) @ self.extrinsics[:3, :3]
        uvw = cam @ self.intrinsics.T
        with np.errstate(divide="ignore", invalid="ignore"):
            return uvw[:, :2] / uvw[:, 2:], cam[:, 2]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "intrinsics": np.round(self.intrinsics, 6).tolist(),
                "extrinsics": np.round(self.extrinsics, 6).tolist()}


def make_cameras(height: int = 96, width: int = 160) -> list[Camera]:
    """The six cameras of :data:`CAMERA_LAYOUT` with ``height x width`` images (square pixels, centred)."""
    cameras = []
    for name, (x, y, yaw_deg, fov) in CAMERA_LAYOUT.items():
        focal = width / 2 / math.tan(math.radians(fov) / 2)
        k = np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
        yaw = math.radians(yaw_deg)
        right, down, forward = (math.sin(yaw), -math.cos(yaw), 0.0), (0.0, 0.0, -1.0), (math.cos(yaw), math.sin(yaw), 0)
        pose = np.eye(4)
        pose[:3, :3] = np.array([right, down, forward]).T
        pose[:3, 3] = (x, y, CAMERA_HEIGHT)
        cameras.append(Camera(name, k, pose, height, width))
    return cameras


def camera_window(corners: np.ndarray, camera: Camera) -> Window | None:
    """The pixel rows and columns whose rays can hit the box with ``corners`` (``8 x 3``)."""
    uv, depth = camera.project(corners)
    if np.all(depth <= 1e-3):
        return None
    if np.any(depth <= 1e-3):
        return slice(None), slice(None)
    u0, v0 = np.floor(uv.min(0)).astype(int)
    u1, v1 = np.ceil(uv.max(0)).astype(int)
    u0, v0, u1, v1 = max(u0, 0), max(v0, 0), min(u1 + 1, camera.width), min(v1 + 1, camera.height)
    return (slice(v0, v1), slice(u0, u1)) if u1 > u0 and v1 > v0 else None


def render(scene: Scene, camera: Camera, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one view: uint8 ``H x W x 3`` and the index of what each pixel shows (box, GROUND or SKY)."""
    origin, dirs = camera.rays()
    hits = trace(origin, dirs, scene, [camera_window(scene.corners(k), camera) for k in range(len(scene.kinds))])
    up = np.clip(dirs[..., 2:] / 0.5, 0, 1)
    image = scene.sky[0] * (1 - up) + scene.sky[1] * up
    ground = hits.index == GROUND
    points = origin + dirs * np.where(np.isfinite(hits.t), hits.t, 0.0)[..., None]
    image[ground] = _ground_colour(scene, points[ground, :2])
    boxes = hits.index >= 0
    image[boxes] = _box_colour(scene, hits.index[boxes], hits.face[boxes], hits.normal[boxes], points[boxes])
    fog = np.exp(-np.where(np.isfinite(hits.t), hits.t, 0.0) / 150.0)[..., None]
    image = image * fog + scene.sky[0] * (1 - fog)
    image += rng.normal(0.0, 2.0, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), hits.index


def _ground_colour(scene: Scene, xy: np.ndarray) -> np.ndarray:
    size = len(scene.texture)
    fine = scene.texture[np.floor(xy[:, 0] / 0.4).astype(int) % size, np.floor(xy[:, 1] / 0.4).astype(int) % size]
    coarse = scene.texture[np.floor(xy[:, 1] / 3).astype(int) % size, np.floor(xy[:, 0] / 3).astype(int) % size]
    return scene.ground[ground_kind(scene, xy)] + (10 * fine + 8 * coarse)[:, None]


def _box_colour(scene: Scene, index: np.ndarray, face: np.ndarray, normal: np.ndarray,
                points: np.ndarray) -> np.ndarray:
    colour = scene.colours[index] * (0.45 + 0.6 * np.clip(normal @ scene.sun, 0, None))[:, None]
    kinds = np.array(scene.kinds)[index]
    vehicle = (kinds == "car") | (kinds == "truck")
    height = (points[:, 2] - scene.centres[index, 2]) / scene.sizes[index, 2] + 0.5  # 0 at the bottom, 1 at the top
    front = vehicle & (face == 1)
    colour[front] = 0.6 * colour[front] + 90  # a heading cue
    colour[(kinds == "car") & (np.abs(face) != 3) & (height > 0.62)] *= 0.45  # windows
    colour[vehicle & (points[:, 2] < 0.3)] *= 0.35  # wheels
    return colour


# --- samples and the corpus -----------------------------------------------------------------------------------


def scene_sample(split: str, index: int, *, seed: int, image_hw: tuple[int, int] = (96, 160),
                 lidar: LidarSpec | None = None, grid_range: float = 32.0) -> dict[str, Any]:
    """The shard sample ``index`` of ``split``: ``lidar.npy``, ``json`` and one ``<camera>.jpg`` per camera."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    scene = random_scene(rng, grid_range)
    points, hit = lidar_sweep(scene, lidar or LidarSpec(), rng)
    counts = np.bincount(hit[hit >= 0], minlength=len(scene.kinds))
    cameras = make_cameras(*image_hw)
    key = f"{split}-{index:07d}"
    boxes = [{"translation": np.round(scene.centres[k], 4).tolist(), "size": np.round(scene.sizes[k], 4).tolist(),
              "rotation": round(float(scene.yaws[k]), 5), "class": kind, "num_lidar_pts": int(counts[k])}
             for k, kind in enumerate(scene.kinds) if kind != CLUTTER]
    buffer = io.BytesIO()
    np.save(buffer, points)
    sample: dict[str, Any] = {"__key__": key, "lidar.npy": buffer.getvalue(), "json": {
        "scene": key, "cameras": [c.to_json() for c in cameras], "boxes": boxes}}
    for camera in cameras:
        image, _ = render(scene, camera, rng)
        jpg = io.BytesIO()
        Image.fromarray(image).save(jpg, format="JPEG", quality=90)
        sample[f"{camera.name}.jpg"] = jpg.getvalue()
    return sample


def make(
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: str = "small",
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    image_size: int | tuple[int, int] = 96,
    shard_size: int = 250,
    workers: int | None = None,
    azimuth_steps: int = 720,
    grid_range: float = 32.0,
    progress: bool = True,
    preview: bool = True,
) -> dict[str, Any]:
    """Write BEV scenes: ``{train,val,test}-NNNNNN.tar``, ``meta.json`` and ``preview.png`` in ``out_dir``.

    Args:
        out_dir: output folder (created; shards of an earlier run there are replaced).
        seed: everything generated is a function of the seed.
        size: ``tiny``, ``small`` or ``medium`` (scenes per split: :data:`SIZES`).
        n_train, n_val, n_test: override the size's scene counts.
        image_size: camera image height (the width is 5/3 of it, rounded to a multiple of 8: 96 -> 160), or (H, W).
        shard_size: scenes per shard.
        workers: generating processes; ``None`` uses up to 8 CPU cores. The output does not depend on it.
        azimuth_steps: LiDAR columns per turn (32 beams each).
        grid_range: annotated objects have centres within ``[-grid_range, grid_range]`` in x and y.
        progress: show tqdm progress bars.
        preview: save ``preview.png`` (the first test scene's six views and its BEV).

    Returns:
        The metadata written to ``meta.json``; shard patterns in it are relative to ``out_dir``.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    hw = (int(image_size), 8 * round(5 * int(image_size) / 24)) if isinstance(image_size, int) else \
        (int(image_size[0]), int(image_size[1]))
    counts = dict(zip(SPLIT_IDS, SIZES[size], strict=True))
    counts.update({k: v for k, v in (("train", n_train), ("val", n_val), ("test", n_test)) if v is not None})
    spec = LidarSpec(azimuth_steps=azimuth_steps)
    tally: dict[str, Counter[str]] = {split: Counter() for split in counts}

    def previewed(out: Path, written: Written) -> dict[str, Any]:
        if not (preview and written.patterns["test"]):
            return {}
        save_preview(out / written.patterns["test"], out / "preview.png", grid_range)
        return {"preview": "preview.png"}

    corpus = Corpus(
        name="bev-scenes",
        splits={split: [(split, i, seed, hw, spec, grid_range) for i in range(n)] for split, n in counts.items()},
        sample=_job,
        shard_size=shard_size,
        header={"seed": seed, "size": size},
        details=lambda: _details(spec, hw, grid_range, tally, sum(counts.values())),
        side_files=previewed,
        inspect=lambda split, sample: _count(sample, tally[split]),
        workers=default_workers(workers),
        chunksize=2,
        timing=Timing("scenes", seconds_digits=2, rate_digits=2),
    )
    return write_corpus(out_dir, corpus, progress=progress)


def _details(spec: LidarSpec, hw: tuple[int, int], grid_range: float, tally: dict[str, Counter[str]],
             scenes: int) -> dict[str, Any]:
    """The metadata after the splits: the sensors, and the objects and points ``tally`` counted per split."""
    return {
        "classes": list(CLASSES), "grid_range": [[-grid_range, grid_range], [-grid_range, grid_range]],
        "cameras": list(CAMERA_LAYOUT), "image_size": list(hw),
        "lidar": {"height": spec.height, "elevations": list(spec.elevations), "azimuth_steps": spec.azimuth_steps,
                  "max_range": spec.max_range, "range_noise": spec.range_noise, "dropout": spec.dropout},
        "objects_per_class": {s: {c: t[c] for c in CLASSES} for s, t in tally.items()},
        "mean_points_per_scene": round(sum(t["points"] for t in tally.values()) / max(scenes, 1), 1),
        "boxes_without_points": sum(t["empty"] for t in tally.values()),
    }


def _job(args: tuple[str, int, int, tuple[int, int], LidarSpec, float]) -> dict[str, Any]:
    split, index, seed, hw, spec, grid_range = args
    return scene_sample(split, index, seed=seed, image_hw=hw, lidar=spec, grid_range=grid_range)


def _count(sample: dict[str, Any], tally: Counter[str]) -> None:
    for box in sample["json"]["boxes"]:
        tally[box["class"]] += 1
        tally["empty"] += box["num_lidar_pts"] == 0
    tally["points"] += len(np.load(io.BytesIO(sample["lidar.npy"])))


def save_preview(shards: str | Path, path: str | Path, grid_range: float = 32.0) -> Path:
    """The first scene of ``shards`` (decoded back from the shards): its six views around a BEV of points and
    boxes. Returns the PNG's path."""
    import webdataset as wds

    item = next(iter(wds.WebDataset(str(shards), shardshuffle=False)))
    info = json.loads(item["json"])
    views = {c["name"]: Image.open(io.BytesIO(item[f"{c['name']}.jpg"])).convert("RGB") for c in info["cameras"]}
    h, w = next(iter(views.values())).height, next(iter(views.values())).width
    side = 2 * h
    sheet = Image.new("RGB", (3 * w, 2 * h + side), (255, 255, 255))
    order = ("cam_front_left", "cam_front", "cam_front_right", "cam_back_left", "cam_back", "cam_back_right")
    for i, name in enumerate(n for n in order if n in views):
        sheet.paste(views[name], ((i % 3) * w, (i // 3) * (h + side)))
    scale = side / (2 * grid_range)
    points = np.load(io.BytesIO(item["lidar.npy"]))
    rows = ((grid_range - points[:, 0]) * scale).astype(int)  # x forward is up, y left is left
    cols = ((grid_range - points[:, 1]) * scale).astype(int)
    inside = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side)
    canvas = np.full((side, side, 3), 20, dtype=np.uint8)
    canvas[rows[inside], cols[inside]] = np.where(points[inside, 2:3] < 0.15, 90, 230)
    bev = Image.fromarray(canvas)
    draw = ImageDraw.Draw(bev)
    for box in info["boxes"]:
        corners = box_corners(box["translation"], box["size"], box["rotation"])[:4]
        draw.polygon([((grid_range - y) * scale, (grid_range - x) * scale) for x, y, _ in corners],
                     outline=CLASS_COLOURS[box["class"]])
    sheet.paste(bev, ((3 * w - side) // 2, h))
    sheet.save(path)
    return Path(path)

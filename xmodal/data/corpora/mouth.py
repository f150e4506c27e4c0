"""Visemes and a procedural mouth region-of-interest renderer driven by phoneme timings.

Phonemes map to visemes many-to-one (:data:`PHONEME_TO_VISEME`): ``p``, ``b`` and ``m`` all close the lips
(``P``), ``f``/``v`` put the upper teeth on the lower lip (``F``), ``t d n l`` differ only inside the mouth
(``T``), and so on, so a lip reader faces the same ambiguity as on real faces, while the audio keeps every phoneme
apart.

Each viseme is a target for five articulatory parameters, all in [0, 1]: ``open`` (jaw and lip opening),
``width`` (spread), ``round`` (rounding and protrusion), ``teeth`` and ``tongue`` (visibility). Coarticulation
follows Cohen and Massaro's dominance model: every segment pulls each parameter toward its target with a
dominance that is flat over the segment and decays exponentially outside it, and a frame's parameter is the
dominance-weighted mean of the targets. Bilabials dominate ``open`` so strongly that the lips close whatever the
context; vowels lend their rounding to the consonants around them.

Stops: the engine's phoneme event for a stop marks its burst; the closure is the silence just before it. The
renderer starts a stop's segment at the start of that silence (:func:`articulation_segments`), so the lips of a
``b`` are closed during the closure and open at the burst. Diphthongs glide between two targets.

The renderer (:func:`render_clip`) draws, per frame, skin with texture and shading, lips (outer contour with a
Cupid's bow, per-speaker thickness, width and colour), the mouth opening with upper and lower teeth, tongue and
cavity, all with anti-aliased edges, then applies head jitter (translation, rotation, scale), lighting changes,
blur and sensor noise. Everything is numpy, vectorised over frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PARAMS = ("open", "width", "round", "teeth", "tongue")

# viseme: (targets open, width, round, teeth, tongue), (dominance per parameter)
VISEMES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "SIL": ((0.0, 0.45, 0.15, 0.0, 0.0), (0.6, 0.6, 0.6, 0.6, 0.6)),
    "P": ((0.0, 0.45, 0.15, 0.0, 0.0), (60.0, 1.0, 0.5, 40.0, 40.0)),
    "F": ((0.14, 0.5, 0.0, 1.0, 0.0), (20.0, 1.5, 2.0, 20.0, 5.0)),
    "TH": ((0.28, 0.55, 0.0, 0.8, 1.0), (6.0, 1.0, 1.0, 6.0, 20.0)),
    "T": ((0.28, 0.55, 0.1, 0.6, 0.5), (0.5, 0.5, 0.3, 1.0, 1.0)),
    "S": ((0.12, 0.7, 0.0, 1.0, 0.0), (4.0, 1.5, 1.0, 6.0, 3.0)),
    "SH": ((0.22, 0.2, 0.85, 0.9, 0.0), (3.0, 4.0, 6.0, 4.0, 2.0)),
    "K": ((0.38, 0.5, 0.1, 0.35, 0.2), (0.4, 0.4, 0.3, 0.6, 0.6)),
    "R": ((0.26, 0.3, 0.65, 0.3, 0.2), (1.5, 2.0, 3.0, 1.0, 1.0)),
    "W": ((0.1, 0.05, 1.0, 0.0, 0.0), (6.0, 8.0, 10.0, 4.0, 2.0)),
    "AA": ((1.0, 0.6, 0.1, 0.45, 0.45), (4.0, 1.2, 1.0, 1.2, 1.2)),
    "EH": ((0.62, 0.68, 0.05, 0.6, 0.35), (3.0, 1.2, 1.0, 1.2, 1.2)),
    "IY": ((0.3, 0.95, 0.0, 0.95, 0.2), (2.0, 2.0, 1.5, 1.5, 1.2)),
    "OW": ((0.7, 0.25, 0.8, 0.2, 0.2), (3.0, 2.0, 3.0, 1.2, 1.2)),
    "UW": ((0.25, 0.08, 1.0, 0.05, 0.1), (1.5, 3.0, 4.0, 1.5, 1.2)),
}
VISEME_NAMES = tuple(VISEMES)

PHONEME_TO_VISEME: dict[str, str] = {
    **dict.fromkeys(("p", "b", "m"), "P"),
    **dict.fromkeys(("f", "v"), "F"),
    **dict.fromkeys(("T", "D"), "TH"),
    **dict.fromkeys(("t", "d", "n", "l", "t#", "d#", "n-", "l/", "L", "?"), "T"),
    **dict.fromkeys(("s", "z", "z#"), "S"),
    **dict.fromkeys(("S", "Z", "tS", "dZ"), "SH"),
    **dict.fromkeys(("k", "g", "N", "h", "j", "x", "@L"), "K"),
    **dict.fromkeys(("r", "r-", "*", "3:", "3", "A@", "O@", "o@"), "R"),
    **dict.fromkeys(("w", "W"), "W"),
    **dict.fromkeys(("a", "A:", "A", "a#", "aa", "V", "aI", "aU", "0"), "AA"),
    **dict.fromkeys(("E", "e", "eI", "e@", "@", "@2", "@5", "a2"), "EH"),
    **dict.fromkeys(("i", "i:", "I", "I2", "I#", "i@", "y"), "IY"),
    **dict.fromkeys(("O:", "O", "oU", "OI", "o"), "OW"),
    **dict.fromkeys(("u:", "U", "U@", "u"), "UW"),
    **dict.fromkeys(("_", "_:", "_!", "_^", "_;", ";"), "SIL"),
}
DIPHTHONG_END: dict[str, str] = {"aI": "IY", "aU": "UW", "eI": "IY", "oU": "UW", "OI": "IY", "i@": "EH", "U@": "EH",
                                 "e@": "EH"}
STOPS = frozenset({"p", "b", "t", "d", "k", "g", "tS", "dZ", "t#", "d#"})
DECAY_S = 0.03  # how far (seconds) a segment's dominance reaches outside it, per e-fold


def viseme_of(phoneme: str) -> str:
    """The viseme of an espeak-ng phoneme mnemonic; unknown mnemonics fall back on their stem, then ``K``."""
    if phoneme in PHONEME_TO_VISEME:
        return PHONEME_TO_VISEME[phoneme]
    stem = phoneme.rstrip("#/-:;0123456789")
    if stem in PHONEME_TO_VISEME:
        return PHONEME_TO_VISEME[stem]
    return PHONEME_TO_VISEME.get(stem[:1], "K")


def closure_start(pcm: np.ndarray, burst: int, earliest: int, sample_rate: int, threshold: int = 200) -> int:
    """Start of the quiet stretch (the stop's closure) ending at sample ``burst``, not before ``earliest``.

    The stretch is found in 5 ms blocks whose peak stays under ``threshold``; when it is shorter than 20 ms (a
    voiced closure), the closure is taken as 50 ms, or half the time since ``earliest``, whichever is shorter.
    """
    block = sample_rate // 200
    start = burst
    while start - block >= earliest and np.abs(pcm[start - block : start]).max(initial=0) < threshold:
        start -= block
    if burst - start < sample_rate // 50:
        start = burst - min(sample_rate // 20, (burst - earliest) // 2)
    return max(start, earliest)


def articulation_segments(
    phonemes: list[tuple[str, int, int]], pcm: np.ndarray, sample_rate: int
) -> list[tuple[str, float, float]]:
    """Viseme segments ``(viseme, start_s, end_s)`` that drive the mouth: stops start at their closure, diphthongs
    split into two targets. ``phonemes`` are the engine's ``(mnemonic, start, end)`` in samples of ``pcm``."""
    segments: list[tuple[str, float, float]] = []
    previous_start = 0
    for name, start, end in phonemes:
        if end <= start:
            continue
        begin = closure_start(pcm, start, previous_start, sample_rate) if name in STOPS else start
        previous_start = start
        viseme = viseme_of(name)
        if name in DIPHTHONG_END:
            middle = start + 0.5 * (end - start)
            segments += [(viseme, begin / sample_rate, middle / sample_rate),
                         (DIPHTHONG_END[name], middle / sample_rate, end / sample_rate)]
        else:
            segments.append((viseme, begin / sample_rate, end / sample_rate))
    return segments


def trajectories(segments: list[tuple[str, float, float]], times: np.ndarray, decay: float = DECAY_S) -> np.ndarray:
    """Coarticulated parameters at ``times`` (seconds): float32 ``T x 5`` (order :data:`PARAMS`).

    Rest (``SIL`` with five times its dominance) is added before the first and after the last segment, so the
    mouth starts and ends closed.
    """
    first, last = min(s for _, s, _ in segments), max(e for _, _, e in segments)
    segments = [("SIL", -1.0, first), *segments, ("SIL", last, last + 1.0)]
    targets = np.array([VISEMES[v][0] for v, _, _ in segments])
    dominance = np.array([VISEMES[v][1] for v, _, _ in segments])
    dominance[[0, -1]] *= 5.0
    starts = np.array([s for _, s, _ in segments])
    ends = np.array([e for _, _, e in segments])
    t = np.asarray(times)[:, None]
    distance = np.maximum(np.maximum(starts - t, t - ends), 0.0)
    weight = dominance[None] * np.exp(-distance / decay)[..., None]
    return ((weight * targets[None]).sum(1) / weight.sum(1)).astype(np.float32)


@dataclass(frozen=True)
class MouthStyle:
    """A speaker's face: colours (RGB 0-255) and geometry (pixels at a 64-pixel ROI, scaled with the ROI)."""

    skin: tuple[float, float, float]
    lip: tuple[float, float, float]
    teeth: tuple[float, float, float]
    half_width: float
    upper: float
    lower: float
    max_open: float
    bow: float
    articulation: float
    texture: float
    texture_seed: int
    centre_y: float


def random_style(rng: np.random.Generator) -> MouthStyle:
    """A random speaker face: skin from light to dark, lip colour related to skin, varied lip geometry."""
    tone = rng.uniform(0.0, 1.0)
    skin = np.array([235, 195, 165]) * (1 - tone) + np.array([105, 70, 50]) * tone + rng.uniform(-12, 12, 3)
    lip = skin * np.array([0.85, 0.55, 0.58]) + np.array([35, 5, 15]) + rng.uniform(-15, 15, 3)
    teeth = np.array([240, 235, 215]) - rng.uniform(0, 35) * np.array([0.6, 0.8, 1.3])
    return MouthStyle(
        skin=_rgb(skin), lip=_rgb(lip), teeth=_rgb(teeth),
        half_width=float(rng.uniform(17.0, 23.0)), upper=float(rng.uniform(3.5, 6.0)),
        lower=float(rng.uniform(4.5, 8.0)), max_open=float(rng.uniform(16.0, 24.0)), bow=float(rng.uniform(0.5, 2.2)),
        articulation=float(rng.uniform(0.75, 1.15)), texture=float(rng.uniform(2.0, 9.0)),
        texture_seed=int(rng.integers(2**31)), centre_y=float(rng.uniform(-3.0, 4.0)),
    )


def _rgb(values: np.ndarray) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in np.clip(values, 0, 255))
    return r, g, b


@dataclass(frozen=True)
class Conditions:
    """Capture conditions of one clip: head motion, lighting, optics and sensor."""

    jitter: float
    rotation: float
    zoom: float
    gain: float
    drift: float
    period: float
    phase: float
    tilt: float
    cast: tuple[float, float, float]
    blur: float
    noise: float


def random_conditions(rng: np.random.Generator) -> Conditions:
    """Random capture conditions (jitter in pixels, rotation in radians, blur sigma in pixels)."""
    return Conditions(
        jitter=float(rng.uniform(0.3, 2.0)), rotation=float(np.radians(rng.uniform(0.5, 5.0))),
        zoom=float(rng.uniform(0.01, 0.05)), gain=float(rng.uniform(0.75, 1.15)), drift=float(rng.uniform(0.0, 0.12)),
        period=float(rng.uniform(0.8, 4.0)), phase=float(rng.uniform(0, 2 * np.pi)),
        tilt=float(rng.uniform(-0.25, 0.25)),
        cast=_rgb(255 * (1 + rng.uniform(-0.08, 0.08, 3))), blur=float(rng.choice([0.0, 0.4, 0.7, 1.0, 1.3])),
        noise=float(rng.uniform(0.5, 4.0)),
    )


def _smooth_noise(rng: np.random.Generator, n: int, smoothing: float = 0.85) -> np.ndarray:
    """Low-pass random walk with unit peak: float ``n``."""
    white = rng.normal(size=n + 20)
    out = np.empty_like(white)
    acc = 0.0
    for i, value in enumerate(white):
        acc = smoothing * acc + (1 - smoothing) * value
        out[i] = acc
    out = out[20:]
    return out / max(np.abs(out).max(), 1e-6)


def _edge(distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (positive inside)."""
    return np.clip(distance + 0.5, 0.0, 1.0)


def _geometry(p: np.ndarray, style: MouthStyle, x: np.ndarray, y: np.ndarray, px: np.ndarray) -> dict[str, np.ndarray]:
    """Coverage maps (``T x H x W`` in [0, 1]) of the mouth parts, from parameters ``p`` (``T x 5``) and local
    coordinates ``x``, ``y`` (ROI units); ``px`` converts ROI units to pixels (``T x 1 x 1``)."""
    opening, width, rounding, teeth, tongue = (p[:, i, None, None] for i in range(5))
    opening = np.clip(opening * style.articulation, 0.0, 1.0)
    half = 0.5 * opening * style.max_open
    a = style.half_width * (1 + 0.3 * (width - 0.5) - 0.32 * rounding)
    inner = a * (0.86 - 0.2 * rounding)
    base = np.sqrt(np.clip(1 - (x / a) ** 2, 0.0, None))
    top = -(0.7 * half + style.upper * (1 + 0.5 * rounding)) * base + style.bow * np.exp(-((x / (0.2 * a)) ** 2))
    bottom = (1.3 * half + style.lower * (1 + 0.35 * rounding)) * base
    outer = _edge(np.minimum(y - top, bottom - y) * px) * _edge((a - np.abs(x)) * px)
    curve = np.clip(1 - (x / inner) ** 2, 0.0, None) ** (0.85 - 0.35 * rounding)
    upper_in, lower_in = -0.7 * half * curve, 1.3 * half * curve
    aperture = _edge(np.minimum(y - upper_in, lower_in - y) * px) * _edge((inner - np.abs(x)) * px)
    upper_teeth = aperture * _edge((upper_in + teeth * 3.5 - y) * px) * _edge((0.8 * inner - np.abs(x)) * px)
    lower_teeth = aperture * _edge((y - lower_in + teeth * 1.6) * px) * _edge((0.65 * inner - np.abs(x)) * px)
    tongue_map = aperture * _edge((y - lower_in + tongue * 0.9 * half) * px) * _edge((0.55 * inner - np.abs(x)) * px)
    return {"outer": outer, "aperture": aperture, "upper_teeth": upper_teeth, "lower_teeth": lower_teeth,
            "tongue": tongue_map, "top": top, "bottom": bottom, "rounding": rounding, "half": half}


def _texture(style: MouthStyle, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The speaker's skin texture (a sum of four random gratings) on the pixel grid: ``H x W``."""
    rng = np.random.default_rng(style.texture_seed)
    texture = np.zeros_like(xs)
    for _ in range(4):
        fx, fy = rng.uniform(0.3, 1.4, 2) * rng.choice([-1, 1], 2)
        texture += np.sin(fx * xs + fy * ys + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return style.texture / 255 * texture


def _skin(style: MouthStyle, x: np.ndarray, y: np.ndarray, g: dict[str, np.ndarray]) -> np.ndarray:
    """Skin shading (``T x H x W`` multiplier of the skin colour), without the texture."""
    shade = 1.04 - 0.004 * y
    philtrum = np.exp(-((x / 3.0) ** 2)) * np.exp(-(((y - g["top"].min() + 6) / 4.0) ** 2))
    under_lip = np.exp(-(((y - g["bottom"] - 2.5) / 2.2) ** 2)) * np.exp(-((x / (0.6 * style.half_width)) ** 2))
    return shade - 0.06 * philtrum - 0.16 * under_lip


def _compose(style: MouthStyle, x: np.ndarray, y: np.ndarray, g: dict[str, np.ndarray], texture: np.ndarray
             ) -> np.ndarray:
    """The mouth picture before lighting and optics: float ``T x H x W x 3`` in 0-255."""
    skin = np.asarray(style.skin, np.float32)
    lip = np.asarray(style.lip, np.float32)
    highlight = 1 + 0.14 * np.exp(-(((y - 0.6 * g["bottom"]) / 1.6) ** 2))
    lip_shade = np.where(y < 0, 0.84, highlight) * (1 - 0.1 * g["rounding"])
    depth = np.clip(np.abs(y) / np.maximum(g["half"], 0.5), 0, 1)
    image = (_skin(style, x, y, g) + texture)[..., None] * skin
    _blend(image, lip * lip_shade[..., None], g["outer"])
    _blend(image, np.array([70, 22, 26], np.float32) * (0.55 + 0.45 * depth)[..., None], g["aperture"])
    _blend(image, np.array([185, 85, 90], np.float32), g["tongue"])
    teeth = np.asarray(style.teeth, np.float32)
    _blend(image, teeth * 0.85, g["lower_teeth"])
    _blend(image, teeth, g["upper_teeth"])
    return image


def _blend(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    """``image = image * (1 - alpha) + colour * alpha``, in place."""
    a = alpha[..., None]
    image -= (image - colour) * a


def render_clip(
    params: np.ndarray, style: MouthStyle, conditions: Conditions, rng: np.random.Generator, size: int = 64,
    fps: float = 25.0,
) -> np.ndarray:
    """Render the mouth ROI for per-frame parameters ``params`` (``T x 5``, :func:`trajectories` at frame times).

    Returns:
        uint8 ``T x size x size x 3`` RGB frames.
    """
    from scipy.ndimage import gaussian_filter

    n = len(params)
    k = size / 64
    c = conditions
    dx, dy = ((c.jitter * k * _smooth_noise(rng, n)).astype(np.float32) for _ in range(2))
    theta = (c.rotation * _smooth_noise(rng, n)).astype(np.float32)
    zoom = ((1 + c.zoom * _smooth_noise(rng, n)) * k).astype(np.float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5 - size / 2
    cos, sin = (f(theta)[:, None, None] for f in (np.cos, np.sin))
    sx, sy = xs[None] - dx[:, None, None], ys[None] - dy[:, None, None]
    px = zoom[:, None, None]
    x, y = (cos * sx + sin * sy) / px, (-sin * sx + cos * sy) / px - style.centre_y
    g = _geometry(params.astype(np.float32), style, x, y, px)
    image = _compose(style, x, y, g, _texture(style, xs / k, ys / k))
    t = np.arange(n) / fps
    light = (c.gain * (1 + c.drift * np.sin(2 * np.pi * t / c.period + c.phase))).astype(np.float32)
    image *= light[:, None, None, None]
    image *= ((1 + c.tilt * xs / size)[..., None] * (np.asarray(c.cast) / 255)).astype(np.float32)
    if c.blur > 0:
        image = gaussian_filter(image, sigma=(0, c.blur * k, c.blur * k, 0), mode="nearest")
    image += c.noise * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def frame_visemes(segments: list[tuple[str, float, float]], num_frames: int, fps: float = 25.0) -> list[str]:
    """The viseme whose segment holds each frame's centre time (the later one where a stop's closure overlaps the
    segment before it; ``SIL`` outside all segments)."""
    labels = []
    for index in range(num_frames):
        t = (index + 0.5) / fps
        labels.append(next((v for v, s, e in reversed(segments) if s <= t < e), "SIL"))
    return labels


def contact_sheet(
    rows: list[tuple[str, np.ndarray, list[str]]], path: str | Path, max_frames: int = 40, zoom: int = 2
) -> Path:
    """Save a PNG with one row per clip: its title, then its frames with the viseme of each under it.

    Args:
        rows: ``(title, frames uint8 T x H x W x 3, visemes per frame)`` per clip.
        path: the PNG to write. max_frames: frames shown per row. zoom: pixel magnification.

    Returns:
        The path written.
    """
    from PIL import Image, ImageDraw

    size = rows[0][1].shape[1] * zoom
    cols = min(max_frames, max(len(frames) for _, frames, _ in rows))
    row_h = size + 26
    sheet = Image.new("RGB", (cols * size, len(rows) * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (title, frames, labels) in enumerate(rows):
        top = r * row_h
        draw.text((2, top), title, fill=(0, 0, 0))
        for i, frame in enumerate(frames[:cols]):
            tile = Image.fromarray(frame).resize((size, size), Image.Resampling.NEAREST)
            sheet.paste(tile, (i * size, top + 12))
            draw.text((i * size + 2, top + 12 + size), labels[i] if i < len(labels) else "", fill=(200, 0, 0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out

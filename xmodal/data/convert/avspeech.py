"""What the audio-visual speech converters (LRS2/LRS3, GRID, CMLR) share: reading a clip, mouth crops, the sample.

A converted clip is written exactly as the ``avspeech-grid`` corpus writes one
(:mod:`xmodal.data.corpora.avspeech`), so the lip-reading recipes run on it unchanged:

``mp4``
    the mouth crop, ``ROI_SIZE x ROI_SIZE`` (64 x 64) RGB at 25 fps, MPEG-4 part 2. A source at another frame rate
    is re-timed to 25 fps by nearest frame.
``flac``
    the audio, mono 16-bit at 16 kHz: the video's audio track (LRS2/LRS3, GRID) or the clip's own audio file
    (CMLR's ``audio/...wav``), resampled.
``txt``
    the transcript, normalised by :func:`xmodal.modalities.transcript.normalize_transcript` (Unicode-aware: CMLR's
    Chinese characters are kept).
``json``
    ``id`` (the dataset's clip id), ``speaker``, ``split``, ``duration_s``, ``num_frames``, ``source_fps``,
    ``crop`` (how the mouth was cropped) and ``words`` (``[word, start_s, end_s]``, when the dataset gives timings).

Mouth crops (``--crop`` / ``--crop-boxes``), in pixels of the source frame, ``x0,y0,x1,y1`` (x1, y1 exclusive):

``full``
    the whole frame (its centred square): for sources that already show only the mouth.
``lrs2-mouth``
    the lower-centre region of a face-centred LRS2/LRS3 frame, x 20-80% and y 40-100% of the frame (on the
    160 x 160 LRS2 video: ``32,64,128,160``, a 96 x 96 square). A fixed approximation of where the mouth of a
    frontal face lies, not a landmark detector: pass ``--crop-boxes`` where heads move or turn.
``fixed:x0,y0,x1,y1``
    the same box in every frame of every clip.
``--crop-boxes FILE``
    per clip, from a landmark or face detector: JSON ``{"<clip id>": [x0, y0, x1, y1]}`` (one box for the clip) or
    ``{"<clip id>": [[x0, y0, x1, y1], ...]}`` (one per source frame), or CSV with a header ``id,x0,y0,x1,y1`` and
    an optional ``frame`` column (one row per frame). A clip the file does not name falls back to ``--crop``.

A box is clipped to the frame; a box that is not square is cut to its centred square before it is resized (as
:func:`xmodal.modalities.video.resize_frames` does), so the crop is never stretched.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.data.convert.base import Conversion, ConvertError, SkipSample, sample_key
from xmodal.sources import module_constant

# The corpus's clip format, read from its module's source: importing xmodal.data.corpora imports torch, which
# `xmodal data convert FORMAT --help` should not wait for.
CORPUS_MODULE = "xmodal.data.corpora.avspeech"
FPS: int = module_constant(CORPUS_MODULE, "FPS")
ROI_SIZE: int = module_constant(CORPUS_MODULE, "ROI_SIZE")
SAMPLE_RATE: int = module_constant(CORPUS_MODULE, "SAMPLE_RATE")

Box = tuple[float, float, float, float]
Crop = Box | tuple[Box, ...] | None  # one box for the clip, one per source frame, or None for the whole frame
NAMED_CROPS: dict[str, Box] = {"lrs2-mouth": (0.2, 0.4, 0.8, 1.0)}  # fractions of the frame's width and height


@dataclass(frozen=True)
class Clip:
    """One utterance to convert: where its files are and how to crop it (a job of a converter)."""

    id: str
    split: str
    speaker: str
    video: Path
    transcript: Path
    audio: Path | None = None  # None: the video's audio track
    crop: Crop = None
    crop_name: str = "full"
    crop_fraction: bool = False  # ``crop`` is in fractions of the frame (a named crop)


@dataclass(frozen=True)
class CropChoice:
    """The parsed ``--crop``/``--crop-boxes`` options: a default crop and per-clip boxes."""

    default: Crop
    default_name: str
    boxes: dict[str, Crop]
    fraction: bool = False  # the default box is in fractions of the frame (a named crop)

    def for_clip(self, clip_id: str) -> dict[str, Any]:
        """The :class:`Clip` crop fields of ``clip_id``."""
        if clip_id in self.boxes:
            return {"crop": self.boxes[clip_id], "crop_name": "boxes", "crop_fraction": False}
        return {"crop": self.default, "crop_name": self.default_name, "crop_fraction": self.fraction}


def add_crop_arguments(parser: argparse.ArgumentParser, default: str = "full") -> None:
    """``--crop`` and ``--crop-boxes`` (meanings in this module's docstring)."""
    parser.add_argument("--crop", default=default, help=(
        "mouth crop for clips --crop-boxes does not name: 'full' (whole frame), 'lrs2-mouth' (lower-centre region "
        "of a face-centred LRS2/LRS3 frame: x 20-80%%, y 40-100%%, i.e. 32,64,128,160 on 160x160 video) or "
        f"'fixed:x0,y0,x1,y1' (pixels); resized to {ROI_SIZE}x{ROI_SIZE} (default: %(default)s)"))
    parser.add_argument("--crop-boxes", type=Path, default=None, help=(
        "JSON {clip_id: [x0,y0,x1,y1] or [[x0,y0,x1,y1] per frame]} or CSV id,x0,y0,x1,y1[,frame] of mouth "
        "boxes in source pixels"))


def crop_choice(crop: str, boxes_file: Path | None) -> CropChoice:
    """Parse ``--crop`` and read ``--crop-boxes`` (:class:`ConvertError` for a malformed value or file)."""
    boxes = read_crop_boxes(boxes_file) if boxes_file is not None else {}
    if crop == "full":
        return CropChoice(None, "full", boxes)
    if crop in NAMED_CROPS:
        return CropChoice(NAMED_CROPS[crop], crop, boxes, fraction=True)
    if crop.startswith("fixed:"):
        return CropChoice(_box(crop[len("fixed:"):].split(","), "--crop"), crop, boxes)
    raise ConvertError(f"--crop must be 'full', {', '.join(repr(n) for n in NAMED_CROPS)} or 'fixed:x0,y0,x1,y1', "
                       f"got {crop!r}")


def _box(values: Sequence[Any], where: str) -> Box:
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError) as error:
        raise ConvertError(f"{where}: a box is four numbers x0,y0,x1,y1, got {list(values)!r}") from error
    if not (x1 > x0 and y1 > y0):
        raise ConvertError(f"{where}: a box needs x1 > x0 and y1 > y0, got {[x0, y0, x1, y1]}")
    return x0, y0, x1, y1


def read_crop_boxes(path: Path) -> dict[str, Crop]:
    """Per-clip mouth boxes from a JSON or CSV file (formats in the module docstring)."""
    if not path.is_file():
        raise ConvertError(f"{path}: crop-box file not found")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConvertError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(data, dict):
            raise ConvertError(f"{path}: expected an object {{clip_id: box or [boxes]}}")
        return {str(k): _clip_boxes(v, f"{path}: clip {k!r}") for k, v in data.items()}
    return _read_csv_boxes(path)


def _clip_boxes(value: Any, where: str) -> Crop:
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return tuple(_box(v, where) for v in value)
    return _box(value if isinstance(value, list) else [value], where)


def _read_csv_boxes(path: Path) -> dict[str, Crop]:
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    missing = {"id", "x0", "y0", "x1", "y1"} - set(rows[0] if rows else {})
    if missing:
        raise ConvertError(f"{path}: CSV needs a header with id,x0,y0,x1,y1 (missing {', '.join(sorted(missing))})")
    per_frame: dict[str, list[tuple[int, Box]]] = {}
    for line, row in enumerate(rows, start=2):
        box = _box([row["x0"], row["y0"], row["x1"], row["y1"]], f"{path}:{line}")
        frame = row.get("frame") or ""
        try:
            index = int(frame) if frame.strip() else -1
        except ValueError as error:
            raise ConvertError(f"{path}:{line}: frame must be an integer, got {frame!r}") from error
        per_frame.setdefault(row["id"], []).append((index, box))
    boxes: dict[str, Crop] = {}
    for clip, entries in per_frame.items():
        if len(entries) == 1 and entries[0][0] < 0:
            boxes[clip] = entries[0][1]
        else:
            boxes[clip] = tuple(box for _, box in sorted(entries))
    return boxes


def crop_frames(frames: np.ndarray, crop: Crop, fraction: bool = False, video: Path = Path()) -> np.ndarray:
    """uint8 ``T x H x W x 3`` -> the mouth crops, uint8 ``T x ROI_SIZE x ROI_SIZE x 3``.

    Raises:
        SkipSample: per-frame boxes that are fewer than the frames, or a box outside the frame.
    """
    import torch

    from xmodal.modalities.video import resize_frames

    height, width = frames.shape[1:3]
    if crop is None:
        boxes: Sequence[Box] = [(0.0, 0.0, float(width), float(height))] * len(frames)
    elif isinstance(crop[0], tuple):
        boxes = crop  # type: ignore[assignment]
        if len(boxes) < len(frames):
            raise SkipSample(video, "fewer crop boxes than frames")
    else:
        box: Box = crop  # type: ignore[assignment]
        if fraction:
            box = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
        boxes = [box] * len(frames)
    out = np.empty((len(frames), ROI_SIZE, ROI_SIZE, 3), np.uint8)
    for i, (frame, (x0, y0, x1, y1)) in enumerate(zip(frames, boxes, strict=False)):
        left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
        right, bottom = min(width, math.ceil(x1)), min(height, math.ceil(y1))
        if right <= left or bottom <= top:
            raise SkipSample(video, "crop box outside the frame")
        patch = torch.from_numpy(np.ascontiguousarray(frame[top:bottom, left:right])).permute(2, 0, 1)[None]
        out[i] = resize_frames(patch, ROI_SIZE)[0].permute(1, 2, 0).numpy()
    return out


def read_video(path: Path) -> tuple[np.ndarray, float]:
    """All frames of a video file (decord, PyAV fallback): uint8 ``T x H x W x 3`` and the native frame rate.

    Raises:
        SkipSample: a missing or undecodable file.
    """
    import av

    from xmodal.modalities.video import decode_video

    if not path.is_file():
        raise SkipSample(path, "missing video")
    try:
        with av.open(str(path)) as container:
            fps = float(container.streams.video[0].average_rate or 0.0)
        frames = decode_video(path.read_bytes(), num_frames=1 << 30, size=None)
    except Exception as error:  # PyAV and decord raise many types for a corrupt file
        raise SkipSample(path, "corrupt video") from error
    if len(frames) == 0:
        raise SkipSample(path, "corrupt video")
    return frames.permute(0, 2, 3, 1).numpy(), fps or float(FPS)


def retime(frames: np.ndarray, fps: float) -> np.ndarray:
    """Frames at ``fps`` -> frames at the corpus' 25 fps (nearest frame)."""
    from xmodal.modalities.video import frame_indices

    if abs(fps - FPS) < 1e-3:
        return frames
    return frames[frame_indices(len(frames), fps, 1 << 30, float(FPS), "first")]


def read_audio(video: Path, audio: Path | None) -> np.ndarray:
    """Mono float32 at 16 kHz: ``audio`` when given (wav/flac), else the video's audio track.

    Raises:
        SkipSample: a missing or undecodable audio file, or a video without an audio track.
    """
    if audio is not None:
        from xmodal.modalities.audio import INT16_SCALE, decode_audio

        if not audio.is_file():
            raise SkipSample(audio, "missing audio")
        try:
            return decode_audio(audio.read_bytes(), SAMPLE_RATE).numpy().astype(np.float32) / INT16_SCALE
        except Exception as error:  # soundfile raises LibsndfileError, RuntimeError, ValueError
            raise SkipSample(audio, "corrupt audio") from error
    try:
        wave = _audio_track(video)
    except Exception as error:
        raise SkipSample(video, "corrupt audio track") from error
    if wave is None or len(wave) == 0:
        raise SkipSample(video, "no audio track")
    return wave


def _audio_track(video: Path) -> np.ndarray | None:
    import av

    with av.open(str(video)) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks = []
        for frame in container.decode(audio=0):
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32) if chunks else None


def read_clip_text(path: Path, what: str) -> list[str]:
    """The lines of a clip's text file; :class:`SkipSample` ``missing <what>`` or ``malformed <what>`` (not UTF-8)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise SkipSample(path, f"missing {what}") from error
    except UnicodeDecodeError as error:
        raise SkipSample(path, f"malformed {what}") from error


def clip_sample(clip: Clip, text: str, words: Sequence[tuple[str, float, float]],
                language: str = "en") -> dict[str, Any]:
    """The shard sample of ``clip`` with its transcript ``text`` and word timings (fields in the module docstring).

    Raises:
        SkipSample: a missing or corrupt video or audio, or an empty transcript.
    """
    from xmodal.modalities.audio import encode_audio
    from xmodal.modalities.transcript import normalize_transcript
    from xmodal.modalities.video import encode_mp4

    transcript = normalize_transcript(text, language)
    if not transcript:
        raise SkipSample(clip.transcript, "empty transcript")
    frames, fps = read_video(clip.video)
    mouths = retime(crop_frames(frames, clip.crop, clip.crop_fraction, clip.video), fps)
    wave = read_audio(clip.video, clip.audio)
    meta = {
        "id": clip.id, "speaker": clip.speaker, "split": clip.split,
        "duration_s": round(len(wave) / SAMPLE_RATE, 4), "num_frames": len(mouths), "source_fps": round(fps, 3),
        "crop": clip.crop_name, "words": [[w, round(s, 4), round(e, 4)] for w, s, e in words],
    }
    return {"__key__": sample_key(clip.id), "mp4": encode_mp4(mouths, FPS), "flac": encode_audio(wave, SAMPLE_RATE),
            "txt": transcript, "json": meta}


def clip_sources(clip: Clip) -> list[Path]:
    """The files a clip is read from (for the manifest's digest of the source list)."""
    return [p for p in (clip.video, clip.transcript, clip.audio) if p is not None]


def av_conversion(name: str, clips: dict[str, list[Clip]], sample: Callable[[Clip], dict[str, Any]],
                  choice: CropChoice, **options: Any) -> Conversion[Clip]:
    """The conversion of an audio-visual dataset's ``clips``; the manifest's options name the crop and
    ``options``."""
    return Conversion(format=name, splits=dict(clips), sample=sample, sources=clip_sources, options={
        "crop": choice.default_name, "crop_boxes": len(choice.boxes), "fps": FPS, "roi_size": ROI_SIZE,
        "sample_rate": SAMPLE_RATE, **options})

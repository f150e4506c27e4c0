"""GRID (``xmodal data convert grid SRC --out DIR``): 34 speakers saying six-word command sentences.

Layout read: the videos ``s<N>/<clip>.mpg`` (or ``.mp4``) and, per clip, an alignment ``<clip>.align`` found at
``align/s<N>/``, ``s<N>/align/``, ``alignments/s<N>/`` or ``align/`` (GRID's per-speaker archives all unpack to
``align/``, so a flat ``align/`` only works for one speaker). An alignment is ``start end word`` lines in units of
1/1000 of a 25 fps frame (``sil``/``sp`` pauses are dropped; the words become the transcript and the json's word
timings in seconds). The audio is the video's track, or ``audio/s<N>/<clip>.wav`` / ``s<N>/<clip>.wav`` when
such a file exists.

GRID has no official split: ``--test-speakers`` (default ``s1,s2,s20,s22``, the unseen speakers of LipNet's
evaluation) and ``--val-speakers`` (default none) pick them, every other speaker is ``train``. GRID video shows
the whole face: crop the mouth with ``--crop fixed:...`` or ``--crop-boxes`` (see
:mod:`xmodal.data.convert.avspeech`); the default ``full`` keeps the whole frame.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from xmodal.data.convert import avspeech
from xmodal.data.convert.base import Conversion, ConvertError, SkipSample

VIDEO_SUFFIXES = (".mpg", ".mp4")
PAUSES = frozenset({"sil", "sp"})
ALIGN_UNITS_PER_SECOND = 25_000  # 1000 units per frame at 25 fps
DEFAULT_TEST_SPEAKERS = "s1,s2,s20,s22"
SPEAKER = re.compile(r"s\d+")


def read_alignment(path: Path) -> list[tuple[str, float, float]]:
    """The spoken words of a ``.align`` file with their times in seconds (pauses dropped).

    Raises:
        SkipSample: a missing file, or a line that is not ``start end word``.
    """
    lines = avspeech.read_clip_text(path, "alignment")
    words = []
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        try:
            start, end, word = int(fields[0]), int(fields[1]), fields[2]
        except (IndexError, ValueError) as error:
            raise SkipSample(path, "malformed alignment") from error
        if len(fields) != 3 or end < start:
            raise SkipSample(path, "malformed alignment")
        if word not in PAUSES:
            words.append((word, start / ALIGN_UNITS_PER_SECOND, end / ALIGN_UNITS_PER_SECOND))
    if not words:
        raise SkipSample(path, "malformed alignment")
    return words


def sample(clip: avspeech.Clip) -> dict[str, Any]:
    """The shard sample of one GRID clip."""
    words = read_alignment(clip.transcript)
    return avspeech.clip_sample(clip, " ".join(word for word, _, _ in words), words)


def _alignment_of(src: Path, speaker: str, clip: str) -> Path:
    candidates = [src / "align" / speaker, src / speaker / "align", src / "alignments" / speaker, src / "align"]
    paths = [folder / f"{clip}.align" for folder in candidates]
    return next((path for path in paths if path.is_file()), paths[0])  # missing: skipped and counted


def _audio_of(src: Path, speaker: str, clip: str) -> Path | None:
    return next((path for path in (src / "audio" / speaker / f"{clip}.wav", src / speaker / f"{clip}.wav")
                 if path.is_file()), None)


def speaker_split(speaker: str, val: set[str], test: set[str]) -> str:
    return "test" if speaker in test else "val" if speaker in val else "train"


def build_clips(src: Path, choice: avspeech.CropChoice, val: set[str],
                test: set[str]) -> dict[str, list[avspeech.Clip]]:
    """The clips of each split (``train``, ``val``, ``test``), speakers in numeric order, clips by name."""
    folders = sorted((p for p in src.iterdir() if p.is_dir() and SPEAKER.fullmatch(p.name)),
                     key=lambda p: int(p.name[1:])) if src.is_dir() else []
    if not folders:
        raise ConvertError(f"{src}: no speaker folders s<N>/: not a GRID folder")
    clips: dict[str, list[avspeech.Clip]] = {"train": [], "val": [], "test": []}
    for folder in folders:
        speaker = folder.name
        split = speaker_split(speaker, val, test)
        for video in sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
            clip_id = f"{speaker}/{video.stem}"
            clips[split].append(avspeech.Clip(id=clip_id, split=split, speaker=speaker, video=video,
                                              transcript=_alignment_of(src, speaker, video.stem),
                                              audio=_audio_of(src, speaker, video.stem), **choice.for_clip(clip_id)))
    return clips


def _speakers(text: str) -> set[str]:
    return {s.strip() for s in text.split(",") if s.strip()}


class GridConverter:
    name = "grid"
    help = "GRID: s<N>/<clip>.mpg videos with their .align files; speaker splits; mouth crops by --crop"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        avspeech.add_crop_arguments(parser, default="full")
        parser.add_argument("--test-speakers", default=DEFAULT_TEST_SPEAKERS,
                            help="comma-separated test speakers (default: %(default)s, LipNet's unseen speakers)")
        parser.add_argument("--val-speakers", default="", help="comma-separated validation speakers (default: none)")

    def build(self, src: Path, args: argparse.Namespace) -> Conversion[avspeech.Clip]:
        choice = avspeech.crop_choice(args.crop, args.crop_boxes)
        val, test = _speakers(args.val_speakers), _speakers(args.test_speakers)
        if val & test:
            raise ConvertError(f"speakers {', '.join(sorted(val & test))} are both val and test speakers")
        clips = build_clips(src, choice, val, test)
        return avspeech.av_conversion(self.name, clips, sample, choice, val_speakers=sorted(val),
                                      test_speakers=sorted(test))


CONVERTERS = [GridConverter()]

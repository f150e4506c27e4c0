"""LRS2 and LRS3 (``xmodal data convert lrs2|lrs3 SRC --out DIR``): BBC and TED clips with their transcripts.

Layout read:

* split lists ``train.txt``, ``val.txt``, ``test.txt`` (and ``pretrain.txt``), one clip id a line
  (``5535415699068794046/00001``, possibly followed by a flag such as ``NF`` or ``MV``, which is ignored); a listed
  clip is ``main/<id>.mp4`` (LRS2) or ``<split>/<id>.mp4``;
* without lists (LRS3), the split folders ``pretrain/``, ``trainval/`` and ``test/``, every ``<id>.mp4`` in them,
  each folder one split under its own name.

Beside each ``<id>.mp4`` is ``<id>.txt``: its first line ``Text:  WORDS``, then ``Conf:`` and, in LRS2's pretrain
set and in LRS3, a ``WORD START END ASDSCORE`` table of word timings (kept in the json's ``words``). The audio is
the mp4's own track. The video is face-centred but not a mouth crop: the default ``--crop lrs2-mouth`` takes the
lower-centre region of the frame (see :mod:`xmodal.data.convert.avspeech` for it and for ``--crop-boxes``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmodal.data.convert import avspeech
from xmodal.data.convert.base import Conversion, ConvertError, SkipSample, read_lines

LIST_SPLITS = ("pretrain", "train", "val", "test")
FOLDER_SPLITS = ("pretrain", "trainval", "test")
VIDEO_FOLDERS = ("main",)  # LRS2 keeps its train/val/test clips here; a split's own folder is tried next
TIMINGS_HEADER = "WORD START END"


def read_transcript(path: Path) -> tuple[str, list[tuple[str, float, float]]]:
    """The ``Text:`` line and the word timings (``[]`` when the file has none) of an LRS ``<id>.txt``.

    Raises:
        SkipSample: a missing file, or one whose first line is not ``Text: ...`` or whose timings are malformed.
    """
    lines = avspeech.read_clip_text(path, "transcript")
    if not lines or not lines[0].startswith("Text:"):
        raise SkipSample(path, "malformed transcript")
    words: list[tuple[str, float, float]] = []
    header = next((i for i, line in enumerate(lines) if line.startswith(TIMINGS_HEADER)), None)
    for line in lines[header + 1:] if header is not None else ():
        if not line.strip():
            continue
        fields = line.split()
        try:
            words.append((fields[0], float(fields[1]), float(fields[2])))
        except (IndexError, ValueError) as error:
            raise SkipSample(path, "malformed transcript") from error
    return lines[0][len("Text:"):].strip(), words


def sample(clip: avspeech.Clip) -> dict[str, Any]:
    """The shard sample of one LRS clip."""
    text, words = read_transcript(clip.transcript)
    return avspeech.clip_sample(clip, text, words)


def read_split_list(path: Path) -> list[str]:
    """Clip ids of a split list (``<video>/<clip>`` and an optional flag a line); blank lines are skipped.

    Raises:
        ConvertError: a line whose first field is not ``<video>/<clip>``.
    """
    ids = []
    for number, line in read_lines(path, "split list"):
        fields = line.split()
        parts = fields[0].split("/")
        if len(parts) != 2 or not all(parts) or len(fields) > 2:
            raise ConvertError(f"{path}:{number}: expected '<video>/<clip>' and an optional flag, got {line!r}")
        ids.append(fields[0])
    return ids


def find_clips(src: Path, splits: list[str] | None) -> dict[str, list[tuple[str, Path]]]:
    """``(clip id, video path)`` per split, from the split lists, or else from the split folders."""
    lists = {split: src / f"{split}.txt" for split in LIST_SPLITS if (src / f"{split}.txt").is_file()}
    if lists:
        found = {split: [(clip, _video_of(src, split, clip)) for clip in read_split_list(path)]
                 for split, path in lists.items()}
    else:
        found = {split: [(str(p.relative_to(src / split).with_suffix("")), p)
                         for p in sorted((src / split).glob("*/*.mp4"))]
                 for split in FOLDER_SPLITS if (src / split).is_dir()}
    if not found:
        raise ConvertError(f"{src}: no split lists ({', '.join(s + '.txt' for s in LIST_SPLITS)}) and no split "
                           f"folders ({', '.join(FOLDER_SPLITS)}): not an LRS2/LRS3 folder")
    if splits is not None:
        unknown = sorted(set(splits) - set(found))
        if unknown:
            raise ConvertError(f"{src}: no split {', '.join(unknown)} (found {', '.join(found)})")
        found = {split: found[split] for split in splits}
    return found


def _video_of(src: Path, split: str, clip: str) -> Path:
    candidates = [src / folder / f"{clip}.mp4" for folder in (*VIDEO_FOLDERS, split)]
    existing = next((path for path in candidates if path.is_file()), None)
    if existing is not None:
        return existing
    return candidates[0] if (src / VIDEO_FOLDERS[0]).is_dir() else candidates[-1]  # missing: skipped and counted


def build_clips(src: Path, choice: avspeech.CropChoice,
                splits: list[str] | None = None) -> dict[str, list[avspeech.Clip]]:
    """The clips of each split, with their crops."""
    return {split: [avspeech.Clip(id=clip, split=split, speaker=clip.split("/")[0], video=video,
                                  transcript=video.with_suffix(".txt"), **choice.for_clip(clip))
                    for clip, video in clips]
            for split, clips in find_clips(src, splits).items()}


@dataclass(frozen=True)
class LRSConverter:
    """LRS2 or LRS3: the same layout reader under the dataset's name."""

    name: str
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        avspeech.add_crop_arguments(parser, default="lrs2-mouth")
        parser.add_argument("--splits", default=None, help=(
            "comma-separated splits to convert (default: every split list, or every split folder, found)"))

    def build(self, src: Path, args: argparse.Namespace) -> Conversion[avspeech.Clip]:
        choice = avspeech.crop_choice(args.crop, args.crop_boxes)
        splits = args.splits.split(",") if args.splits else None
        clips = build_clips(src, choice, splits)
        return avspeech.av_conversion(self.name, clips, sample, choice, splits=list(clips))


CONVERTERS = [
    LRSConverter("lrs2", "LRS2: split lists + main/<id>.mp4 with <id>.txt 'Text:' lines; mouth crops by --crop"),
    LRSConverter("lrs3", "LRS3: pretrain/, trainval/, test/ folders of <id>.mp4 + <id>.txt; mouth crops by --crop"),
]

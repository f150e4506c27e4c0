"""CMLR (``xmodal data convert cmlr SRC --out DIR``): Chinese Mandarin news sentences, 11 speakers.

Layout read: the lists ``train.csv``, ``val.csv`` and ``test.csv``, one clip a line (``s1/20170121/section_1_000.00_
002.04``: speaker, date, clip; further comma-separated fields and a header line without a ``/`` are ignored), and
per clip ``video/<id>.mp4``, ``audio/<id>.wav`` and ``text/<id>.txt``, whose first line is the sentence in Chinese
characters. The transcript is normalised with the Unicode-aware
:func:`xmodal.modalities.transcript.normalize_transcript` (``language="zh"``: the characters are kept, punctuation
becomes a space; digits are not spelled out). CMLR video is not a mouth crop: see ``--crop`` and ``--crop-boxes``
(:mod:`xmodal.data.convert.avspeech`); the default ``full`` keeps the whole frame.

The lip-reading student's default character vocabulary is English a-z, so a recipe that trains on CMLR names the
corpus' own: beside the shards, ``vocabulary.json`` lists the characters of the train split's transcripts, most
frequent first (:func:`xmodal.modalities.transcript.corpus_vocabulary`); ``configs/lipreading/cmlr.yaml`` reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xmodal.data.convert import avspeech
from xmodal.data.convert.base import Conversion, ConvertError, SkipSample, read_lines

SPLITS = ("train", "val", "test")
LANGUAGE = "zh"


def read_sentence(path: Path) -> str:
    """The first non-empty line of a CMLR ``text/<id>.txt``.

    Raises:
        SkipSample: a missing, empty or undecodable file.
    """
    sentence = next((line.strip() for line in avspeech.read_clip_text(path, "transcript") if line.strip()), "")
    if not sentence:
        raise SkipSample(path, "malformed transcript")
    return sentence


def sample(clip: avspeech.Clip) -> dict[str, Any]:
    """The shard sample of one CMLR clip."""
    return avspeech.clip_sample(clip, read_sentence(clip.transcript), [], language=LANGUAGE)


def read_list(path: Path) -> list[str]:
    """Clip ids (``speaker/date/clip``) of a CMLR split list.

    Raises:
        ConvertError: a line whose first field is not ``speaker/date/clip`` (a first line without ``/`` is a header).
    """
    ids = []
    for number, line in read_lines(path, "split list"):
        first = line.split(",")[0].strip()
        if number == 1 and "/" not in first:
            continue
        parts = first.split("/")
        if len(parts) != 3 or not all(parts):
            raise ConvertError(f"{path}:{number}: expected 'speaker/date/clip', got {line!r}")
        ids.append(first)
    return ids


def build_clips(src: Path, choice: avspeech.CropChoice) -> dict[str, list[avspeech.Clip]]:
    """The clips of each split list found."""
    lists = {split: src / f"{split}.csv" for split in SPLITS if (src / f"{split}.csv").is_file()}
    if not lists:
        raise ConvertError(f"{src}: no split lists ({', '.join(s + '.csv' for s in SPLITS)}): not a CMLR folder")
    return {split: [avspeech.Clip(id=clip, split=split, speaker=clip.split("/")[0],
                                  video=src / "video" / f"{clip}.mp4", transcript=src / "text" / f"{clip}.txt",
                                  audio=src / "audio" / f"{clip}.wav", **choice.for_clip(clip))
                    for clip in read_list(path)]
            for split, path in lists.items()}


def shard_transcripts(out: Path, split: str) -> Iterator[str]:
    """The ``txt`` of every sample in the ``{split}-NNNNNN.tar`` shards of ``out``."""
    from xmodal.data.shards import existing_shards  # imports torch (through webdataset): not at module level

    for shard in existing_shards(out, split):
        with tarfile.open(shard) as tar:
            for member in tar:
                file = tar.extractfile(member) if member.name.endswith(".txt") else None
                if file is not None:
                    yield file.read().decode("utf-8")


def write_vocabulary(out: Path) -> dict[str, Any]:
    """``vocabulary.json``: the characters of the written train samples' transcripts, most frequent first."""
    from xmodal.modalities.transcript import VOCABULARY_FILE, corpus_vocabulary  # imports torch

    vocabulary = corpus_vocabulary(shard_transcripts(out, "train"), LANGUAGE)
    (out / VOCABULARY_FILE).write_text(json.dumps(vocabulary, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return {"vocabulary": {"file": VOCABULARY_FILE, "characters": len(vocabulary["chars"])}}


class CMLRConverter:
    name = "cmlr"
    help = "CMLR: {train,val,test}.csv + video/, audio/, text/ per clip; Chinese transcripts; mouth crops by --crop"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        avspeech.add_crop_arguments(parser, default="full")

    def build(self, src: Path, args: argparse.Namespace) -> Conversion[avspeech.Clip]:
        choice = avspeech.crop_choice(args.crop, args.crop_boxes)
        clips = build_clips(src, choice)
        conversion = avspeech.av_conversion(self.name, clips, sample, choice, language=LANGUAGE)
        return dataclasses.replace(conversion, side_files=write_vocabulary)


CONVERTERS = [CMLRConverter()]

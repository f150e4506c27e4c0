"""Speech in the LibriSpeech layout: ``SRC/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utterance>.flac``,
each chapter folder with ``<speaker>-<chapter>.trans.txt`` (``<utterance id> <TRANSCRIPT>`` per line).

Subsets become splits by name (``train-clean-100``, ``train-clean-360``, ``train-other-500`` -> ``train``;
``dev-*`` -> ``val``; ``test-*`` -> ``test``), or as ``--splits SUBSET=SPLIT ...`` says. Each utterance is one
sample, in the fields of the speech corpora (:mod:`xmodal.data.corpora.avspeech`) that the ASR recipes read:

``flac``
    the audio, mono 16-bit at ``--sample-rate`` (16 kHz): the source bytes when the source already is that, else
    mixed down and resampled (torchaudio) and re-encoded.
``txt``
    the transcript, normalised by :func:`xmodal.modalities.transcript.normalize_transcript` (lower case).
``json``
    ``id``, ``speaker``, ``chapter``, ``subset``, ``text`` (the transcript as the dataset writes it),
    ``duration_s``, ``sample_rate`` and ``source_sample_rate``.

An utterance whose audio is missing or does not decode, or whose chapter has no transcript file, is skipped and
counted; a transcript file with a malformed line stops the conversion, naming the file and line.
"""

from __future__ import annotations

import argparse
import functools
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from xmodal.data.convert.base import Conversion, ConvertError, Sample, SkipSample, read_lines

SAMPLE_RATE = 16000
SPLIT_PREFIXES = {"train": "train", "dev": "val", "test": "test"}  # subset name prefix -> split
UTTERANCE_ID = re.compile(r"(\d+)-(\d+)-(\d+)")
TRANSCRIPTS = "{speaker}-{chapter}.trans.txt"


@dataclass(frozen=True)
class Utterance:
    """One utterance: its audio file, transcript (``None`` when its chapter has no transcript file), the
    transcript file, and where it sits in the dataset."""

    audio: str
    text: str | None
    transcripts: str
    id: str
    subset: str


def speech_sample(job: Utterance, sample_rate: int = SAMPLE_RATE) -> Sample:
    """The shard sample of ``job`` (fields in the module docstring)."""
    from xmodal.modalities.transcript import normalize_transcript  # imports torch: not at module level

    if job.text is None:
        raise SkipSample(job.transcripts, "missing transcript file")
    flac, source_rate, seconds = read_audio(Path(job.audio), sample_rate)
    speaker, chapter, _ = job.id.split("-")
    meta = {"id": job.id, "speaker": speaker, "chapter": chapter, "subset": job.subset, "text": job.text,
            "duration_s": round(seconds, 4), "sample_rate": sample_rate, "source_sample_rate": source_rate}
    return {"__key__": job.id, "flac": flac, "txt": normalize_transcript(job.text, "en"), "json": meta}


def read_audio(path: Path, sample_rate: int) -> tuple[bytes, int, float]:
    """``(FLAC bytes of mono 16-bit audio at sample_rate, the source's rate, seconds)``; the source's own bytes
    when it already is such a FLAC.

    Raises:
        SkipSample: when the file is missing, does not decode or holds no samples.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SkipSample(path, "missing audio") from None
    try:
        info = sf.info(io.BytesIO(data))
        wave, source_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError):
        raise SkipSample(path, "corrupt audio") from None
    if wave.shape[0] == 0:
        raise SkipSample(path, "empty audio")
    seconds = wave.shape[0] / source_rate
    if (info.format, info.subtype, info.channels, source_rate) == ("FLAC", "PCM_16", 1, sample_rate):
        return data, source_rate, seconds
    return _encoded(wave.mean(axis=1), source_rate, sample_rate), source_rate, seconds


def _encoded(mono: np.ndarray, source_rate: int, sample_rate: int) -> bytes:
    import torch
    import torchaudio

    from xmodal.modalities.audio import encode_audio

    if source_rate != sample_rate:
        mono = torchaudio.functional.resample(torch.from_numpy(mono), source_rate, sample_rate).numpy()
    return encode_audio(np.clip(mono, -1.0, 1.0), sample_rate)


def read_transcripts(path: Path, speaker: str, chapter: str) -> dict[str, str]:
    """Utterance id -> transcript from a ``.trans.txt`` file; :class:`ConvertError` naming the file and line
    when a line is not ``<speaker>-<chapter>-<utterance> <TEXT>`` for this chapter."""
    texts = {}
    for number, line in read_lines(path, "transcript file"):
        parts = line.split(maxsplit=1)
        match = UTTERANCE_ID.fullmatch(parts[0])
        if len(parts) != 2 or match is None or match.group(1, 2) != (speaker, chapter):
            raise ConvertError(f"{path}:{number}: expected '{speaker}-{chapter}-<utterance> <TRANSCRIPT>', "
                               f"got {line[:80]!r}")
        texts[parts[0]] = parts[1].strip()
    return texts


def subset_jobs(subset_dir: Path) -> list[Utterance]:
    """The utterances of one subset folder: speakers, chapters and utterances in numeric order; those of the
    transcript files, plus any ``.flac`` in a chapter without one."""
    jobs = []
    for chapter_dir in sorted(subset_dir.glob("*/*"), key=lambda d: (_number(d.parent.name), _number(d.name))):
        if not chapter_dir.is_dir():
            continue
        speaker, chapter = chapter_dir.parent.name, chapter_dir.name
        transcripts = chapter_dir / TRANSCRIPTS.format(speaker=speaker, chapter=chapter)
        if transcripts.is_file():
            texts: Mapping[str, str | None] = read_transcripts(transcripts, speaker, chapter)
        else:
            texts = {f.stem: None for f in chapter_dir.glob("*.flac")}
        for utterance in sorted(texts, key=lambda u: _number(u.rsplit("-", 1)[-1])):
            jobs.append(Utterance(str(chapter_dir / f"{utterance}.flac"), texts[utterance], str(transcripts),
                                  utterance, subset_dir.name))
    return jobs


def _number(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (-1, name)


def speech_sources(job: Utterance) -> list[Path]:
    return [Path(job.audio), Path(job.transcripts)]


def subset_splits(src: Path, asked: Sequence[str] | None) -> dict[str, str]:
    """Subset folder -> split: ``asked`` (``SUBSET=SPLIT`` items) or every subset named ``train-*``/``dev-*``/
    ``test-*`` in ``src``."""
    if asked:
        pairs = [item.split("=", 1) for item in asked]
        if any(len(pair) != 2 or not all(pair) for pair in pairs):
            raise ConvertError(f"--splits: expected SUBSET=SPLIT items, got {list(asked)}")
        mapping = {subset: split for subset, split in pairs}
    else:
        mapping = {d.name: SPLIT_PREFIXES[d.name.split("-")[0]] for d in sorted(src.iterdir())
                   if d.is_dir() and d.name.split("-")[0] in SPLIT_PREFIXES} if src.is_dir() else {}
    missing = [subset for subset in mapping if not (src / subset).is_dir()]
    if not mapping or missing:
        raise ConvertError(f"{src}: no LibriSpeech subset folder {', '.join(missing) or '(train-*, dev-*, test-*)'}")
    return mapping


@dataclass(frozen=True)
class LibriSpeech:
    """The LibriSpeech layout (also LibriTTS-free corpora laid out the same way)."""

    name: str = "librispeech"
    help: str = ("LibriSpeech: SRC/<subset>/<speaker>/<chapter>/*.flac with <speaker>-<chapter>.trans.txt; "
                 "train-*/dev-*/test-* subsets to train/val/test")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--splits", nargs="+", metavar="SUBSET=SPLIT",
                            help="subset folders and the split each goes to, e.g. dev-clean=val test-clean=test "
                                 "(default: every train-*, dev-*, test-* folder to train, val, test)")
        parser.add_argument("--sample-rate", type=int, default=SAMPLE_RATE, help="audio rate written (Hz)")

    def build(self, src: Path, args: argparse.Namespace) -> Conversion[Utterance]:
        mapping = subset_splits(src, args.splits)
        splits: dict[str, list[Utterance]] = {}
        for subset, split in mapping.items():
            splits.setdefault(split, []).extend(subset_jobs(src / subset))
        options = {"splits": mapping, "sample_rate": args.sample_rate}
        return Conversion(self.name, splits, functools.partial(speech_sample, sample_rate=args.sample_rate),
                          speech_sources, options, None)


CONVERTERS = [LibriSpeech()]

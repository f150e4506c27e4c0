"""AVSpeech-GRID: an offline audio-visual speech corpus, GRID-style sentences spoken by espeak-ng, with a rendered
mouth driven by the engine's own phoneme timings (speech teacher -> lip-reading student).

It is synthetic and says so: the voices are espeak-ng's, the faces are drawn. It is hard where lip reading is
hard: the audio keeps every phoneme apart, the lips do not (``p``/``b``/``m`` look alike, ``t``/``d``/``n``/``l``
differ only inside the mouth, see :mod:`xmodal.data.corpora.mouth`).

Sentences
    The GRID grammar: command, colour, preposition, letter (a-z without w), digit, adverb, e.g. "bin blue at f two
    now" (64,000 combinations). Like GRID, the corpus uses a pool of 1,000 sentences (drawn with the seed);
    12.5% of the pool (125 sentences) is held out and spoken only by test speakers.
Speakers and splits
    A speaker is an espeak-ng voice and variant (``en-us+m3``), a speaking rate range, pitch, pitch range and word
    gap, plus a face (lip shape, colour and size, skin, teeth, articulation strength). Splits are disjoint by
    speaker. Train and val speakers say sentences from the seen part of the pool; test speakers say half seen and
    half held-out sentences (``unseen_sentence`` in the json).
Audio (``flac``)
    The sentence is synthesised in one engine call (never word by word) at 22050 Hz with phoneme events, padded
    with 0.15-0.35 s of silence at each end, resampled to 16 kHz (polyphase 320/441), and mixed with white, pink
    or brown noise at the sample's SNR (measured over the speech, pauses excluded): uniform in 5-30 dB for train
    and val, 5, 10, 15, 20, 25 and 30 dB in turn for test.
Video (``mp4``)
    25 fps, 64 x 64 RGB, one frame per 40 ms covering the whole clip (frame ``i`` shows time ``(i + 0.5) / 25``),
    MPEG-4 part 2 through :func:`xmodal.modalities.video.encode_mp4`.
``txt`` and ``json``
    The normalised transcript; the speaker, voice, rate, pitch, SNR, split, sentence id, whether the sentence is
    held out, the duration, and the phoneme, word and viseme timings in seconds (sample-exact from the engine).

Sizes: ``tiny`` (3/1/1 speakers x 8 utterances, for tests), ``small`` (12/2/2 speakers x 200: 3,200 utterances,
303 MB; about 0.07 CPU-seconds per utterance, so a few minutes on two idle cores; 9.6 minutes measured on two
cores heavily loaded by other jobs), ``medium`` (24/4/4 x 500: 16,000). The output is a function of the seed (and
the espeak-ng, FFmpeg and libsndfile builds), whatever the number of workers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.data.corpora import espeak, mouth
from xmodal.data.corpora.writer import Corpus, Timing, write_corpus

COMMANDS = ("bin", "lay", "place", "set")
COLOURS = ("blue", "green", "red", "white")
PREPOSITIONS = ("at", "by", "in", "with")
LETTERS = tuple("abcdefghijklmnopqrstuvxyz")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ADVERBS = ("again", "now", "please", "soon")
SLOTS = (COMMANDS, COLOURS, PREPOSITIONS, LETTERS, DIGITS, ADVERBS)
NUM_SENTENCES = int(np.prod([len(slot) for slot in SLOTS]))
POOL_SIZE = 1000
HELD_OUT = 125
SAMPLE_RATE = 16000
FPS = 25
ROI_SIZE = 64
SIZES: dict[str, tuple[tuple[int, int, int], int]] = {  # speakers (train, val, test), utterances per speaker
    "tiny": ((3, 1, 1), 8),
    "small": ((12, 2, 2), 200),
    "medium": ((24, 4, 4), 500),
}
VOICE_BASES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
VOICE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
TEST_SNRS = (5.0, 10.0, 15.0, 20.0, 25.0, 30.0)
NOISES = ("white", "pink", "brown")
SPOKEN = {"a": "[['eI]]"}  # the letter a is read as the article unless given as phonemes


def sentence_words(sentence_id: int) -> list[str]:
    """The six words of GRID sentence ``sentence_id`` (mixed radix over the slots, the adverb varying fastest)."""
    if not 0 <= sentence_id < NUM_SENTENCES:
        raise ValueError(f"sentence_id must be in 0..{NUM_SENTENCES - 1}, got {sentence_id}")
    words = []
    for slot in reversed(SLOTS):
        sentence_id, index = divmod(sentence_id, len(slot))
        words.append(slot[index])
    return words[::-1]


def normalise_transcript(text: str) -> str:
    """Lowercase words separated by single spaces, digits as words (``"Bin BLUE at F 2 now."`` -> ``"bin blue at f
    two now"``); every other character that is not a letter becomes a space."""
    text = re.sub(r"\d", lambda m: f" {DIGITS[int(m.group())]} ", text.lower())
    return " ".join(re.sub(r"[^a-z']+", " ", text).replace("'", "").split())


def sentence_pool(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seen and held-out sentence ids (``POOL_SIZE - HELD_OUT`` and ``HELD_OUT``), sorted.

    Every word of every slot occurs in the seen part; the held-out part is spoken by test speakers only.
    """
    rng = np.random.default_rng([seed, 7])
    for _ in range(100):
        pool = rng.choice(NUM_SENTENCES, size=POOL_SIZE, replace=False)
        seen, held = np.sort(pool[HELD_OUT:]), np.sort(pool[:HELD_OUT])
        covered = [set(words) for words in zip(*(sentence_words(int(s)) for s in seen), strict=True)]
        if all(len(c) == len(slot) for c, slot in zip(covered, SLOTS, strict=True)):
            return seen, held
    raise RuntimeError("no sentence pool covers the vocabulary")  # pragma: no cover - 100 tries never all fail


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: a voice with its prosody ranges, and a face."""

    id: str
    voice: str
    rate: tuple[int, int]
    pitch: int
    range: int
    wordgap: int
    style: mouth.MouthStyle

    def settings(self, rng: np.random.Generator) -> espeak.VoiceSettings:
        """Voice settings for one utterance: a rate in the speaker's range, the pitch jittered by up to 4."""
        rate = int(rng.integers(self.rate[0], self.rate[1] + 1))
        pitch = int(np.clip(self.pitch + rng.integers(-4, 5), 0, 100))
        return espeak.VoiceSettings(self.voice, rate, pitch, self.range, self.wordgap)


def make_speakers(seed: int, counts: Sequence[int]) -> dict[str, list[Speaker]]:
    """Speakers ``s01``, ``s02``... for train, val and test (``counts``), each with a distinct voice."""
    rng = np.random.default_rng([seed, 11])
    voices = [f"{base}+{variant}" for base in VOICE_BASES for variant in VOICE_VARIANTS]
    order = rng.permutation(len(voices))
    if sum(counts) > len(voices):
        raise ValueError(f"at most {len(voices)} speakers, asked for {sum(counts)}")
    speakers: dict[str, list[Speaker]] = {}
    index = 0
    for split, count in zip(("train", "val", "test"), counts, strict=True):
        speakers[split] = []
        for _ in range(count):
            r = np.random.default_rng([seed, 13, index])
            low = int(r.integers(120, 165))
            speakers[split].append(Speaker(
                id=f"s{index + 1:02d}", voice=voices[order[index]], rate=(low, low + int(r.integers(10, 30))),
                pitch=int(r.integers(25, 76)), range=int(r.integers(30, 81)), wordgap=int(r.integers(1, 8)),
                style=mouth.random_style(r),
            ))
            index += 1
    return speakers


@dataclass(frozen=True)
class Job:
    """One utterance to generate."""

    seed: int
    split: str
    speaker: Speaker
    index: int
    sentence_id: int
    unseen: bool
    snr_db: float | None  # None: drawn uniformly in 5-30 dB


def make_jobs(seed: int, split: str, speakers: list[Speaker], per_speaker: int, seen: np.ndarray,
              held: np.ndarray) -> list[Job]:
    """The utterances of ``split``: each speaker says ``per_speaker`` distinct sentences (half held out in test)."""
    jobs: list[Job] = []
    for number, speaker in enumerate(speakers):
        rng = np.random.default_rng([seed, 17, int(speaker.id[1:])])
        n_held = per_speaker // 2 if split == "test" else 0
        chosen = [(int(s), False) for s in _draw(rng, seen, per_speaker - n_held)]
        chosen += [(int(s), True) for s in _draw(rng, held, n_held)]
        order = rng.permutation(len(chosen))
        for index, k in enumerate(order):
            sentence_id, unseen = chosen[k]
            snr = TEST_SNRS[(number + index) % len(TEST_SNRS)] if split == "test" else None
            jobs.append(Job(seed, split, speaker, index, sentence_id, unseen, snr))
    return jobs


def _draw(rng: np.random.Generator, ids: np.ndarray, n: int) -> np.ndarray:
    """``n`` ids, distinct until the pool runs out, then cycling through fresh permutations."""
    reps = -(-n // len(ids)) if n else 0
    return np.concatenate([rng.permutation(ids) for _ in range(reps)])[:n] if n else np.zeros(0, np.int64)


def resample(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM at 22050 Hz -> float32 at 16 kHz in [-1, 1] (polyphase 320/441; ``ceil(S * 320 / 441)`` samples)."""
    from scipy.signal import resample_poly

    return resample_poly(pcm.astype(np.float64) / 32768.0, 320, 441).astype(np.float32)


def coloured_noise(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """Unit-power ``white``, ``pink`` (1/f power) or ``brown`` (1/f^2) noise: float ``n``."""
    white = rng.normal(size=n)
    if kind != "white":
        spectrum = np.fft.rfft(white)
        freqs = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
        spectrum /= freqs ** (0.5 if kind == "pink" else 1.0)
        spectrum[0] = 0.0
        white = np.fft.irfft(spectrum, n)
    return white / max(float(np.sqrt(np.mean(white**2))), 1e-12)


def add_noise(rng: np.random.Generator, wave: np.ndarray, speech: np.ndarray, snr_db: float, kind: str) -> np.ndarray:
    """``wave`` plus ``kind`` noise at ``snr_db`` relative to the power of ``speech`` (boolean mask of ``wave``).

    The result is scaled down if it would clip.
    """
    power = float(np.mean(wave[speech] ** 2)) if speech.any() else float(np.mean(wave**2))
    noisy = wave + coloured_noise(rng, kind, len(wave)) * np.sqrt(power / 10 ** (snr_db / 10))
    peak = float(np.abs(noisy).max(initial=0.0))
    return (noisy * (0.98 / peak) if peak > 0.98 else noisy).astype(np.float32)


def spoken_text(words: Sequence[str]) -> str:
    """The text given to the engine: the words, with the letter ``a`` as phonemes."""
    return " ".join(SPOKEN.get(word, word) for word in words)


def word_spans(words: Sequence[str], synthesis: espeak.Synthesis) -> list[tuple[str, int, int]]:
    """``(word, start, end)`` in engine samples: a word starts at its word event (for a stop, the closure) and
    ends with its last non-pause phoneme before the next word event. Stray empty word events are dropped."""
    events = [sample for _, length, sample in synthesis.words if length > 0][: len(words)]
    if len(events) != len(words):
        raise RuntimeError(f"{len(events)} word events for {len(words)} words")
    spans = []
    for i, (word, start) in enumerate(zip(words, events, strict=True)):
        limit = events[i + 1] if i + 1 < len(events) else synthesis.end_sample
        ends = [e for p, s, e in synthesis.phonemes if start <= s < limit and p not in espeak.PAUSES and e > s]
        spans.append((word, start, min(ends[-1], limit) if ends else limit))
    return spans


def _seconds(sample: int) -> float:
    return round(sample / espeak.SAMPLE_RATE, 4)


def _speech_mask(phonemes: list[tuple[str, int, int]], length: int) -> np.ndarray:
    """Samples of a 16 kHz wave (``length``) inside non-pause phonemes given in engine samples."""
    mask = np.zeros(length, bool)
    for name, start, end in phonemes:
        if name not in espeak.PAUSES:
            mask[start * 320 // 441 : end * 320 // 441] = True
    return mask


def synthesise(
    words: Sequence[str], settings: espeak.VoiceSettings, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """The sentence, padded with silence: int16 PCM at 22050 Hz, and phoneme and word spans in its samples."""
    synthesis = espeak.synthesize(spoken_text(words), settings, seed=int(rng.integers(2**31)))
    lead, trail = (int(rng.uniform(0.15, 0.35) * espeak.SAMPLE_RATE) for _ in range(2))
    pcm = np.concatenate([np.zeros(lead, np.int16), synthesis.pcm, np.zeros(trail, np.int16)])
    phonemes = [(p, s + lead, e + lead) for p, s, e in synthesis.phonemes if e > s]
    spans = [(w, s + lead, e + lead) for w, s, e in word_spans(words, synthesis)]
    return pcm, phonemes, spans


def sample(job: Job) -> dict[str, Any]:
    """The shard sample of ``job``: ``flac``, ``mp4``, ``txt`` and ``json`` (see the module docstring)."""
    from xmodal.modalities.audio import encode_audio
    from xmodal.modalities.video import encode_mp4

    rng = np.random.default_rng([job.seed, 19, int(job.speaker.id[1:]), job.index])
    settings = job.speaker.settings(rng)
    transcript = sentence_words(job.sentence_id)
    pcm, phonemes, words = synthesise(transcript, settings, rng)
    snr = float(job.snr_db) if job.snr_db is not None else round(float(rng.uniform(5.0, 30.0)), 2)
    noise = NOISES[int(rng.integers(len(NOISES)))]
    wave = resample(pcm)
    wave = add_noise(rng, wave, _speech_mask(phonemes, len(wave)), snr, noise)
    num_frames = int(np.ceil(len(wave) / SAMPLE_RATE * FPS))
    segments = mouth.articulation_segments(phonemes, pcm, espeak.SAMPLE_RATE)
    params = mouth.trajectories(segments, (np.arange(num_frames) + 0.5) / FPS)
    frames = mouth.render_clip(params, job.speaker.style, mouth.random_conditions(rng), rng, ROI_SIZE, FPS)
    meta = {
        "speaker": job.speaker.id, "voice": settings.voice, "rate": settings.rate, "pitch": settings.pitch,
        "range": settings.range, "wordgap": settings.wordgap, "snr_db": snr, "noise": noise, "split": job.split,
        "sentence_id": job.sentence_id, "unseen_sentence": job.unseen, "duration_s": round(len(wave) / SAMPLE_RATE, 4),
        "num_frames": num_frames,
        "phonemes": [[p, _seconds(s), _seconds(e)] for p, s, e in phonemes],
        "words": [[w, _seconds(s), _seconds(e)] for w, s, e in words],
        "visemes": [[mouth.viseme_of(p), _seconds(s), _seconds(e)] for p, s, e in phonemes],
    }
    return {
        "__key__": f"{job.speaker.id}_u{job.index:06d}",
        "flac": encode_audio(wave, SAMPLE_RATE),
        "mp4": encode_mp4(frames, FPS),
        "txt": " ".join(transcript),
        "json": meta,
    }


def make(
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: str = "small",
    shard_size: int = 500,
    workers: int = 2,
    utterances_per_speaker: int | None = None,
    progress: bool = True,
    preview: bool = True,
) -> dict[str, Any]:
    """Write AVSpeech-GRID: ``{train,val,test}-NNNNNN.tar``, ``meta.json`` and ``preview.png`` in ``out_dir``.

    Args:
        out_dir: output folder (created; shards of an earlier run there are replaced).
        seed: everything generated is a function of the seed.
        size: ``tiny``, ``small`` or ``medium`` (speakers per split and utterances per speaker: :data:`SIZES`).
        shard_size: utterances per shard.
        workers: generating processes, each with its own espeak-ng engine; the output does not depend on it.
        utterances_per_speaker: overrides the size's count (even, for test speakers' half held-out sentences).
        progress: show tqdm progress bars.
        preview: save ``preview.png``, a contact sheet of the first test utterances (frames with visemes).

    Returns:
        The metadata written to ``meta.json``; shard patterns in it are relative to ``out_dir``.

    Raises:
        ValueError: for an unknown size. OSError: when libespeak-ng is missing.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if not espeak.available():
        raise OSError("avspeech-grid needs libespeak-ng (Debian/Ubuntu: apt-get install espeak-ng)")
    counts, per_speaker = SIZES[size]
    per_speaker = utterances_per_speaker or per_speaker
    speakers = make_speakers(seed, counts)
    seen, held = sentence_pool(seed)
    corpus = Corpus(
        name="avspeech-grid",
        splits={split: make_jobs(seed, split, speakers[split], per_speaker, seen, held)
                for split in ("train", "val", "test")},
        sample=sample,
        shard_size=shard_size,
        header={"seed": seed, "size": size},
        details=lambda: _details(speakers, held),
        workers=workers,
        chunksize=4,
        timing=Timing("utterances", seconds_digits=2, rate_digits=2),
    )
    meta = write_corpus(out_dir, corpus, progress=progress)
    if preview and meta["patterns"]["test"]:  # after meta.json, which does not list it
        save_preview(Path(out_dir) / meta["patterns"]["test"], Path(out_dir) / "preview.png")
        meta["preview"] = "preview.png"
    return meta


def _details(speakers: dict[str, list[Speaker]], held: np.ndarray) -> dict[str, Any]:
    return {
        "speakers": {split: [s.id for s in group] for split, group in speakers.items()},
        "voices": {s.id: {"voice": s.voice, "rate": list(s.rate), "pitch": s.pitch, "range": s.range,
                          "wordgap": s.wordgap} for group in speakers.values() for s in group},
        "sample_rate": SAMPLE_RATE, "engine_sample_rate": espeak.SAMPLE_RATE, "fps": FPS, "roi_size": ROI_SIZE,
        "channels": 3, "vocabulary": {name: list(slot) for name, slot in zip(
            ("command", "colour", "preposition", "letter", "digit", "adverb"), SLOTS, strict=True)},
        "sentence_pool": POOL_SIZE, "unseen_sentence_ids": [int(s) for s in held],
        "visemes": list(mouth.VISEME_NAMES), "test_snrs_db": list(TEST_SNRS), "noises": list(NOISES),
    }


def save_preview(shards: str | Path, path: str | Path, count: int = 4, max_frames: int = 40) -> Path:
    """Contact sheet of the first ``count`` utterances of ``shards`` (decoded back from the shards): one row per
    utterance, its frames with the viseme at each frame's time. Returns the PNG's path."""
    import webdataset as wds

    from xmodal.modalities.video import decode_video

    rows = []
    for item in wds.WebDataset(str(shards), shardshuffle=False):
        info = json.loads(item["json"])
        frames = decode_video(item["mp4"], num_frames=10_000, size=None).permute(0, 2, 3, 1).numpy()
        segments = [(v, s, e) for v, s, e in info["visemes"]]
        title = f"{item['__key__']} {info['voice']} snr {info['snr_db']}: {item['txt'].decode()}"
        rows.append((title, frames, mouth.frame_visemes(segments, len(frames), FPS)))
        if len(rows) == count:
            break
    return mouth.contact_sheet(rows, path, max_frames=max_frames)

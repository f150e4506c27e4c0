"""Fuzz the training decode path with truncated and mutated bytes (seeded, a fixed number of cases).

Every case must either decode or fail with an ``Exception`` (which :class:`~xmodal.data.wds.SampleBatcher`, the
per-sample decode stage of the WebDataset pipeline, skips and counts); nothing may escape it or hang, and the
skip count must equal the number of cases that fail to decode.
"""

from __future__ import annotations

import io
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from PIL import Image

from xmodal.contracts import Modality
from xmodal.data.decoders import CorruptSample, decode_sample
from xmodal.data.wds import SKIPPED, SampleBatcher
from xmodal.modalities.audio import AudioModality, encode_audio
from xmodal.modalities.bev import BEVModality
from xmodal.modalities.image import ImageModality

SEEDS = range(25)
TIME_LIMIT_S = 5


class Hang(BaseException):
    """Raised by the alarm; a ``BaseException`` so that the skip handler cannot swallow a hang as a skip."""


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"decoding took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def mutations(data: bytes, header: int, seed: int) -> list[bytes]:
    """Truncations (0 bytes, header only, random lengths), bit flips (anywhere, in the header) and random bytes."""
    rng = random.Random(seed)
    flipped, header_flipped = bytearray(data), bytearray(data)
    for _ in range(rng.randint(1, 8)):
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    for _ in range(rng.randint(1, 3)):
        header_flipped[rng.randrange(header)] = rng.randrange(256)
    return [
        b"", data[:header], data[: rng.randrange(1, len(data))], data[: rng.randrange(header, len(data))],
        bytes(flipped), bytes(header_flipped), rng.randbytes(rng.randint(1, 2 * len(data))),
        data[:header] + rng.randbytes(len(data) - header),
    ]


def png_bytes() -> tuple[bytes, int]:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue(), 33  # signature + IHDR


def jpg_bytes() -> tuple[bytes, int]:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    return data, data.index(b"\xff\xda")  # up to the start of scan


def audio_bytes(fmt: str) -> tuple[bytes, int]:
    wave = np.sin(np.linspace(0, 200, 4000)).astype(np.float32) * 0.5
    return encode_audio(wave, 8000, format=fmt), 42 if fmt == "FLAC" else 44  # STREAMINFO / RIFF header


def npy_bytes(array: np.ndarray) -> tuple[bytes, int]:
    buf = io.BytesIO()
    np.save(buf, array)
    data = buf.getvalue()
    return data, len(data) - array.nbytes


def mp4_bytes() -> tuple[bytes, int]:
    pytest.importorskip("av")
    from xmodal.modalities.video import encode_mp4

    frames = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    data = encode_mp4(frames, fps=10)
    return data, data.index(b"mdat") + 4


def video_modality() -> Modality:
    from xmodal.modalities.video import VideoModality

    return VideoModality(num_frames=4, size=16)


POINTS = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
CACHED = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float16)

# name -> (modality list, field, valid bytes + header length)
CASES: dict[str, tuple[Callable[[], list[Modality]], str, Callable[[], tuple[bytes, int]]]] = {
    "png": (lambda: [ImageModality(size=16)], "png", png_bytes),
    "jpg": (lambda: [ImageModality(size=16)], "jpg", jpg_bytes),
    "flac": (lambda: [AudioModality(sample_rate=16000, max_seconds=1.0)], "flac", lambda: audio_bytes("FLAC")),
    "wav": (lambda: [AudioModality(sample_rate=8000, max_seconds=1.0)], "wav", lambda: audio_bytes("WAV")),
    "mp4": (lambda: [video_modality()], "mp4", mp4_bytes),
    "points": (lambda: [BEVModality(cameras=False, max_points=32)], "npy", lambda: npy_bytes(POINTS)),
    "cached": (lambda: [], "teacher.logits.npy", lambda: npy_bytes(CACHED)),
}


def make_sample(key: str, field: str, data: bytes) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": key, field: data}
    if field == "npy":
        sample["json"] = b'{"boxes": []}'
    return sample


@pytest.mark.parametrize("name", list(CASES))
def test_mutated_bytes_decode_or_are_skipped_and_counted(name: str) -> None:
    modalities_of, field, valid = CASES[name]
    data, header = valid()
    modalities = modalities_of()
    samples = [make_sample("valid", field, data)]
    samples += [make_sample(f"s{seed}m{i}", field, case) for seed in SEEDS
                for i, case in enumerate(mutations(data, header, seed))]

    failed: dict[str, type[Exception]] = {}
    for sample in samples:
        with time_limit(TIME_LIMIT_S):
            try:
                decode_sample(sample, modalities)
            except Exception as error:  # what SampleBatcher skips; anything else escapes and fails the test
                failed[sample["__key__"]] = type(error)
    assert "valid" not in failed
    if field.endswith("npy"):  # .npy decoding reports every corruption as CorruptSample
        assert {e for e in failed.values() if not issubclass(e, CorruptSample)} == set()

    with time_limit(TIME_LIMIT_S * len(samples)):
        batches = list(SampleBatcher(modalities, batch_size=1, drop_last=False)(iter(samples)))
    decoded = [key for batch in batches for key in batch["__key__"]]
    assert sum(batch[SKIPPED] for batch in batches) == len(failed)
    assert decoded == [s["__key__"] for s in samples if s["__key__"] not in failed]


@pytest.mark.parametrize("shape", [(2**62, 4), (2**31, 2**31, 4), (10**6, 10**6)])
def test_npy_header_claiming_a_giant_shape_is_corrupt_without_allocating(shape: tuple[int, ...]) -> None:
    data, header = npy_bytes(POINTS)
    text = data[:header].decode("latin1").replace(str(POINTS.shape), str(shape))
    forged = data[:8] + len(text[10:]).to_bytes(2, "little") + text[10:].encode("latin1") + data[header:]
    with time_limit(TIME_LIMIT_S), pytest.raises(CorruptSample, match="declares"):
        decode_sample(make_sample("giant", "npy", forged), [BEVModality(cameras=False)])

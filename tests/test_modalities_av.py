"""Audio, video and BEV modalities, their towers, the Hugging Face teacher, the video student and the AVSync corpus."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds
from PIL import Image

from xmodal.contracts import Modality, Student, Teacher
from xmodal.data.corpora import avsync
from xmodal.modalities import video as video_module
from xmodal.modalities.audio import AlignmentHead, AudioEncoder, AudioModality, LogMel, encode_audio
from xmodal.modalities.bev import BEVModality, yaw_of
from xmodal.modalities.video import VideoEncoder, VideoModality, encode_mp4, frame_indices
from xmodal.students.av import VideoStudent
from xmodal.teachers.common import state_dict_sha256
from xmodal.teachers.hf import HFTeacher

TINY_WAV2VEC2 = {
    "model_type": "wav2vec2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "conv_dim": [16, 16], "conv_kernel": [10, 3], "conv_stride": [5, 2],
    "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2,
}


def read_shard(path: Path) -> list[dict]:
    return list(wds.WebDataset(str(path), shardshuffle=False))


def write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * math.pi * 440 * t)
    return np.stack([wave] * channels, axis=1).astype(np.float32) if channels > 1 else wave.astype(np.float32)


def clip(frames: int, h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def check_grads(module: torch.nn.Module) -> None:
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


@pytest.fixture
def av_shard(tmp_path: Path) -> Path:
    stereo = io.BytesIO()
    sf.write(stereo, tone(0.5, 8000, channels=2), 8000, format="WAV", subtype="PCM_16")
    return write_tar(tmp_path / "av-000000.tar", [
        {"__key__": "a", "flac": encode_audio(tone(0.3, 16000), 16000), "mp4": encode_mp4(clip(5), 25), "txt": "a"},
        {"__key__": "b", "wav": stereo.getvalue(), "mp4": encode_mp4(clip(8, seed=1), 25), "txt": "b"},
    ])


def test_modalities_follow_the_protocol() -> None:
    for modality in (AudioModality(), VideoModality(), BEVModality()):
        assert isinstance(modality, Modality)


def test_audio_decode_collate_and_encoder(av_shard: Path) -> None:
    modality = AudioModality(sample_rate=16000, gain_db=6.0)
    items = [modality.decode(s) for s in read_shard(av_shard)]
    assert [i["audio"].dtype for i in items] == [torch.int16, torch.int16]
    assert [len(i["audio"]) for i in items] == [4800, 8000]  # 0.3 s at 16 kHz; 0.5 s stereo at 8 kHz resampled
    batch = modality.collate(items)
    assert batch["audio"].shape == (2, 8000) and batch["audio"].dtype == torch.int16
    assert batch["audio_lengths"].tolist() == [4800, 8000]
    assert batch["audio"][0, 4800:].eq(0).all()
    batch = modality.on_device(batch, train=True)
    assert batch["audio"].dtype == torch.float32 and batch["audio"].abs().max() <= 1.0
    assert 0.2 < batch["audio"][1].abs().max() < 1.0

    encoder = AudioEncoder(dim=32, depth=1, heads=2, stride=4, n_mels=16)
    feats, lengths = encoder(batch["audio"], batch["audio_lengths"])
    frames = encoder.logmel.num_frames(batch["audio_lengths"])
    assert frames.tolist() == [31, 51]
    assert lengths.tolist() == [8, 13] and feats.shape == (2, 13, 32)
    assert feats[0, 8:].eq(0).all()
    feats.sum().backward()
    check_grads(encoder)


def test_audio_max_seconds_and_logmel() -> None:
    data = encode_audio(tone(1.0, 16000), 16000)
    assert len(AudioModality(max_seconds=0.25).decode({"flac": data})["audio"]) == 4000
    logmel = LogMel(n_mels=16)
    wave = torch.from_numpy(tone(0.2, 16000))[None]
    feats, frames = logmel(wave, torch.tensor([3200]))
    assert feats.shape == (1, 16, 21) and frames.tolist() == [21]
    assert feats.mean().abs() < 1e-4 and torch.isfinite(feats).all()
    assert AlignmentHead(8, 4, hidden=16)(torch.zeros(2, 3, 8)).shape == (2, 3, 4)


def test_video_decode_collate_and_encoder(av_shard: Path) -> None:
    modality = VideoModality(num_frames=6, size=16)
    items = [modality.decode(s) for s in read_shard(av_shard)]
    assert [tuple(i["video"].shape) for i in items] == [(5, 3, 16, 16), (6, 3, 16, 16)]
    batch = modality.collate(items)
    assert batch["video"].shape == (2, 6, 3, 16, 16) and batch["video"].dtype == torch.uint8
    assert batch["video_lengths"].tolist() == [5, 6] and batch["video"][0, 5].eq(0).all()
    batch = modality.on_device(batch, train=True)
    assert batch["video"].dtype == torch.float32 and 0 <= batch["video"].min() and batch["video"].max() <= 1

    encoder = VideoEncoder(dim=32, depth=1, heads=2, channels=4)
    feats, lengths = encoder(batch["video"], batch["video_lengths"])
    assert feats.shape == (2, 6, 32) and lengths.tolist() == [5, 6] and feats[0, 5].eq(0).all()
    feats.sum().backward()
    check_grads(encoder)


def test_video_encoder_ignores_batch_padding() -> None:
    torch.manual_seed(0)
    encoder = VideoEncoder(dim=16, depth=1, heads=2, channels=4).eval()
    video = torch.rand(2, 7, 3, 16, 16)
    with torch.no_grad():
        padded, _ = encoder(video, torch.tensor([4, 7]))
        alone, _ = encoder(video[:1, :4], torch.tensor([4]))
    torch.testing.assert_close(padded[0, :4], alone[0], atol=1e-5, rtol=1e-4)


def test_video_pyav_fallback_matches_decord(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_mp4(clip(4, 32, 32), 25)
    from_decord = video_module.decode_video(data, num_frames=4, size=None)

    def broken(*args: object) -> None:
        raise RuntimeError("decord is broken")

    monkeypatch.setattr(video_module, "_read_decord", broken)
    from_pyav = video_module.decode_video(data, num_frames=4, size=None)
    assert from_pyav.shape == from_decord.shape == (4, 3, 32, 32)
    assert (from_pyav.float() - from_decord.float()).abs().mean() < 2.0


def test_frame_indices() -> None:
    assert frame_indices(10, 25.0, 4, None, "first").tolist() == [0, 1, 2, 3]
    assert frame_indices(10, 25.0, 4, None, "uniform").tolist() == [0, 3, 6, 9]
    assert frame_indices(10, 20.0, 8, 10.0, "first").tolist() == [0, 2, 4, 6, 8]
    assert frame_indices(3, 25.0, 8, None, "uniform").tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        frame_indices(0, 25.0, 4, None, "first")


@pytest.mark.parametrize("field", ["flac", "mp4"])
def test_corrupt_payloads_raise(field: str) -> None:
    good = encode_audio(tone(0.2, 16000), 16000) if field == "flac" else encode_mp4(clip(4), 25)
    modality = AudioModality() if field == "flac" else VideoModality()
    for bad in (b"not a media file" * 8, good[: len(good) // 3]):
        with pytest.raises(Exception):  # noqa: B017 - any decoder error is fine: the loader catches and counts it
            modality.decode({"__key__": "bad", field: bad})
    with pytest.raises(KeyError):
        modality.decode({"__key__": "empty", "txt": b"x"})


def png(h: int, w: int, value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bev_sample(key: str, n_points: int, boxes: list[dict]) -> dict:
    cameras = [
        {"name": name, "intrinsics": [[30.0, 0, 15.0], [0, 30.0, 10.0], [0, 0, 1]], "extrinsics": np.eye(4).tolist()}
        for name in ("front", "back")
    ]
    points = np.random.default_rng(n_points).normal(size=(n_points, 5)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, points)
    return {"__key__": key, "npy": buf.getvalue(), "json": json.dumps({"cameras": cameras, "boxes": boxes}),
            "front.png": png(20, 30, 10), "back.png": png(20, 30, 200)}


def test_bev_decode_and_collate(tmp_path: Path) -> None:
    quarter_turn = [math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]
    boxes = [
        {"translation": [1, 2, 0], "size": [2, 4, 1.5], "rotation": quarter_turn, "velocity": [1, 0], "class": "car"},
        {"translation": [5, 0, 0], "size": [1, 1, 2], "rotation": 0.3, "category_name": "pedestrian"},
        {"translation": [9, 9, 0], "size": [1, 1, 1], "rotation": 0.0, "class": "tree"},  # not a class: dropped
    ]
    shard = write_tar(tmp_path / "bev-000000.tar", [bev_sample("a", 50, boxes), bev_sample("b", 30, [])])
    modality = BEVModality(classes=["car", "pedestrian"], max_points=40, image_size=(10, 15))
    batch = modality.collate([modality.decode(s) for s in read_shard(shard)])
    assert batch["lidar"].shape == (2, 40, 4) and batch["lidar_counts"].tolist() == [40, 30]
    assert batch["lidar"][1, 30:].eq(0).all()
    assert batch["camera"].shape == (2, 2, 3, 10, 15) and batch["camera"].dtype == torch.uint8
    assert batch["camera"][0, 1].eq(200).all()
    assert batch["intrinsics"].shape == (2, 2, 3, 3) and batch["extrinsics"].shape == (2, 2, 4, 4)
    torch.testing.assert_close(batch["intrinsics"][0, 0, :2], torch.tensor([[15.0, 0, 7.5], [0, 15.0, 5.0]]))
    assert batch["boxes"].shape == (2, 2, 9) and batch["box_counts"].tolist() == [2, 0]
    assert batch["box_labels"].tolist() == [[0, 1], [-1, -1]]
    torch.testing.assert_close(batch["boxes"][0, 0], torch.tensor([1, 2, 0, 2, 4, 1.5, math.pi / 2, 1, 0]))
    assert batch["boxes"][0, 1, 6].item() == pytest.approx(0.3)
    assert modality.on_device(batch, train=False)["camera"].dtype == torch.float32
    assert yaw_of([1.0, 0.0, 0.0, 0.0]) == 0.0

    lidar_only = BEVModality(classes=["car", "pedestrian"], cameras=False)
    assert "camera" not in lidar_only.collate([lidar_only.decode(s) for s in read_shard(shard)])


def tiny_teacher(**kwargs: object) -> HFTeacher:
    return HFTeacher(config=TINY_WAV2VEC2, **kwargs)  # type: ignore[arg-type]


def audio_batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    audio = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        audio[i, :n] = torch.randn(n, generator=gen) * 0.1
    return {"audio": audio, "audio_lengths": torch.tensor(lengths)}


def test_hf_teacher_is_frozen_and_deterministic() -> None:
    teacher = tiny_teacher()
    assert isinstance(teacher, Teacher)
    assert teacher.output_keys == ("audio.feat", "audio.mask")
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    batch = audio_batch([1600, 1200])
    out = teacher(batch)
    assert out["audio.feat"].shape == (2, 159, 32) and out["audio.feat"].dtype == torch.float32
    assert out["audio.mask"].sum(-1).tolist() == [159, 119]
    assert not out["audio.feat"].requires_grad
    torch.testing.assert_close(teacher(batch)["audio.feat"], out["audio.feat"], rtol=0, atol=0)
    torch.testing.assert_close(tiny_teacher()(batch)["audio.feat"], out["audio.feat"], rtol=0, atol=0)
    assert not teacher.manifest()["preprocessing"]["return_attention_mask"]  # group-norm wav2vec2: no mask


def test_hf_teacher_manifest_hash() -> None:
    teacher = tiny_teacher()
    manifest = teacher.manifest()
    assert manifest == tiny_teacher().manifest()
    assert manifest["output_keys"] == ["audio.feat", "audio.mask"] and manifest["dtype"] == "float32"
    assert manifest["weights_sha256"] == state_dict_sha256(teacher.model)
    json.dumps(manifest)
    with torch.no_grad():
        next(teacher.model.parameters())[0].add_(1e-3)
    assert teacher.manifest()["weights_sha256"] != manifest["weights_sha256"]
    assert tiny_teacher(seed=1).manifest()["weights_sha256"] != manifest["weights_sha256"]


def test_hf_teacher_masked_model_ignores_padding_and_resamples() -> None:
    teacher = HFTeacher(config={**TINY_WAV2VEC2, "feat_extract_norm": "layer"}, model_class="AutoModelForCTC",
                        logits_key="audio.logits")
    assert teacher.preprocessing["return_attention_mask"]
    batch = audio_batch([1600, 1000])
    padded = teacher(batch)
    alone = teacher({"audio": batch["audio"][1:, :1000], "audio_lengths": torch.tensor([1000])})
    n = int(alone["audio.mask"].sum())
    assert padded["audio.mask"][1].sum() == n
    torch.testing.assert_close(padded["audio.feat"][1, :n], alone["audio.feat"][0, :n], atol=1e-4, rtol=1e-4)
    assert padded["audio.logits"].shape[:2] == padded["audio.feat"].shape[:2]

    slow = HFTeacher(config=TINY_WAV2VEC2, input_sample_rate=8000, hidden_layer=1)
    out = slow({"audio": batch["audio"][:, :800], "audio_lengths": torch.tensor([800, 500])})
    assert out["audio.mask"].sum(-1).tolist() == [159, 99] and out["audio.feat"].shape == (2, 159, 32)


def test_hf_text_teacher(tmp_path: Path) -> None:
    from xmodal.modalities.text import build_word_tokenizer

    tokenizer = build_word_tokenizer(["a red blob", "a blue blob pulsing"], tmp_path / "tok")
    config = {"model_type": "bert", "vocab_size": 16, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32}
    teacher = HFTeacher(config=config, input_field="caption", output_key="text.feat", feature_extractor=str(tokenizer))
    out = teacher({"caption": ["a red blob", "blob"]})
    assert out["text.feat"].shape == (2, 5, 16) and out["text.mask"].sum(-1).tolist() == [5, 3]


def test_video_student_pairs_with_the_audio_teacher(av_shard: Path) -> None:
    modality = VideoModality(num_frames=6, size=16)
    batch = modality.on_device(modality.collate([modality.decode(s) for s in read_shard(av_shard)]), train=True)
    student = VideoStudent(out_dim=32, dim=16, depth=1, heads=2, channels=4, head_hidden=24)
    assert isinstance(student, Student)
    out = student(batch)
    assert set(out) == set(student.output_keys)
    assert out["video.feat"].shape == (2, 6, 32) and out["video.mask"].sum(-1).tolist() == [5, 6]
    out["video.feat"].pow(2).mean().backward()
    check_grads(student)


def test_avsync_corpus_is_deterministic_and_readable(tmp_path: Path) -> None:
    sizes = {"n_train": 3, "n_val": 1, "n_test": 1, "shard_size": 2, "progress": False}
    meta = avsync.make(tmp_path / "a", seed=3, **sizes)
    avsync.make(tmp_path / "b", seed=3, **sizes)
    avsync.make(tmp_path / "c", seed=4, **sizes)
    assert meta["shards"] == {"train": 2, "val": 1, "test": 1}
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / names[1]).read_bytes() != (tmp_path / "c" / names[1]).read_bytes()

    samples = read_shard(tmp_path / "a" / "train-000000.tar") + read_shard(tmp_path / "a" / "train-000001.tar")
    audio, video = AudioModality(), VideoModality(num_frames=16, size=32)
    for sample in samples:
        info = json.loads(sample["json"])
        assert info["label"] == info["pulses"] - 1 and len(info["envelope"]) == 16
        assert info["colour"] in sample["txt"].decode()
        assert audio.decode(sample)["audio"].shape == (16000,)
        frames = video.decode(sample)["video"]
        assert frames.shape == (16, 3, 32, 32)
        brightness = frames.float().mean(dim=(1, 2, 3))  # the picture follows the envelope
        assert np.corrcoef(brightness.numpy(), info["envelope"])[0, 1] > 0.8

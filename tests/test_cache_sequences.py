"""Caching a speech teacher: variable-length frames, token states and hypotheses are stored trimmed per sample and
padded back per batch, masks stay bool, ids stay integers, and a LIBS loss on the cached outputs equals the loss on
the live teacher."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import torch

from xmodal.contracts import key_list
from xmodal.data.cache import cache_teacher
from xmodal.data.decoders import pad_stack
from xmodal.data.shards import write_shards
from xmodal.data.wds import make_pipeline, prepare_on_device
from xmodal.losses.libs import LIBSContextLoss, LIBSFrameLoss
from xmodal.modalities.audio import AudioModality
from xmodal.modalities.speech_nets import ConformerASR
from xmodal.modalities.transcript import TranscriptModality
from xmodal.teachers.cached import CachedTeacher
from xmodal.teachers.conformer import ConformerTeacher

SECONDS = (0.5, 1.7, 0.9, 1.2, 0.6, 1.5, 0.8)
TEXTS = ("bin blue", "set red by g nine again", "lay", "place white at t", "now", "bin green with z two soon", "ok")


def test_pad_stack_pads_the_sequence_dimension_and_refuses_any_other_mismatch() -> None:
    a, b = torch.ones(2, 3), torch.full((4, 3), 2.0)
    out = pad_stack([a, b])
    assert out.shape == (2, 4, 3)
    assert torch.equal(out[0], torch.tensor([[1.0, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]]))
    assert torch.equal(out[1], b)
    masks = pad_stack([torch.tensor([True, True]), torch.tensor([True])])
    assert masks.dtype == torch.bool and masks.tolist() == [[True, True], [True, False]]
    same = [torch.randn(3), torch.randn(3)]
    assert torch.equal(pad_stack(same, ragged=False), torch.stack(same))
    with pytest.raises(ValueError, match="ranks"):
        pad_stack([torch.zeros(2), torch.zeros(2, 2)])
    with pytest.raises(ValueError, match=r"teacher/audio.frames: samples disagree in trailing shapes"):
        pad_stack([torch.zeros(2, 3), torch.zeros(4, 1)], "teacher/audio.frames")
    with pytest.raises(ValueError, match=r"teacher/image.emb: .*not a masked sequence"):  # a wrong-size cached output
        pad_stack([torch.zeros(16), torch.zeros(12)], "teacher/image.emb", ragged=False)


def test_collate_pads_only_cached_outputs_that_have_a_mask() -> None:
    from xmodal.data.decoders import collate_items

    def item(key: str, frames: int) -> dict:
        return {"__key__": key, "teacher/audio.frames": torch.ones(frames, 3),
                "teacher/audio.frames_mask": torch.ones(frames).bool(), "teacher/image.emb": torch.ones(4)}

    items = [item("a", 2), item("b", 3)]
    batch = collate_items(items, [])
    assert batch["teacher/audio.frames"].shape == (2, 3, 3) and batch["teacher/image.emb"].shape == (2, 4)
    items[1]["teacher/image.emb"] = torch.ones(3)
    with pytest.raises(ValueError, match="teacher/image.emb"):
        collate_items(items, [])


def flac_bytes(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * 16000)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.shape)
    buffer = io.BytesIO()
    soundfile.write(buffer, wave.astype(np.float32), 16000, format="FLAC")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def speech_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ConformerTeacher]:
    """Seven utterances of different lengths cached by a tiny random conformer teacher in batches of 4 and 3."""
    root = tmp_path_factory.mktemp("speech")
    samples = [{"__key__": f"utt{i:02d}", "flac": flac_bytes(s, i), "txt": text}
               for i, (s, text) in enumerate(zip(SECONDS, TEXTS, strict=True))]
    write_shards(samples, root / "raw", "train")
    torch.manual_seed(0)
    ConformerASR(dim=16, depth=1, heads=2, decoder_depth=1, kernel=5, dropout=0.0, max_chars=64).export(root / "asr")
    teacher = ConformerTeacher(str(root / "asr"))
    cache_teacher(teacher, modalities(), str(root / "raw" / "train-*.tar"), root / "cache", batch_size=4)
    return root, teacher


def modalities() -> list[Any]:
    return [AudioModality(), TranscriptModality()]


def cached_fields(tar: Path) -> dict[str, dict[str, np.ndarray]]:
    fields: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(tar) as archive:
        for member in archive.getmembers():
            key, _, field = member.name.partition(".")
            if field.startswith("teacher.") and field.endswith(".npy"):
                data = archive.extractfile(member)
                assert data is not None
                fields.setdefault(key, {})[field] = np.load(io.BytesIO(data.read()))
    return fields


def test_sequences_are_stored_trimmed_with_bool_masks(speech_cache: tuple[Path, ConformerTeacher]) -> None:
    root, _ = speech_cache
    fields = cached_fields(next((root / "cache").glob("train-*.tar")))
    assert len(fields) == len(SECONDS)
    for key, arrays in fields.items():
        i = int(key.removeprefix("utt"))
        frames, mask = arrays["teacher.audio.frames.npy"], arrays["teacher.audio.frames_mask.npy"]
        assert mask.dtype == np.bool_ and mask.all() and frames.shape[0] == mask.shape[0]
        token_mask = arrays["teacher.audio.token_states_mask.npy"]
        assert token_mask.dtype == np.bool_ and token_mask.shape == (len(TEXTS[i]),)
        assert arrays["teacher.audio.token_states.npy"].shape == (len(TEXTS[i]), 16)
        assert arrays["teacher.audio.char_token.npy"].tolist() == list(range(len(TEXTS[i])))
        assert arrays["teacher.audio.hypothesis_chars.npy"].dtype == np.int32
        assert arrays["teacher.audio.frames.npy"].dtype == np.float16
    lengths = [fields[f"utt{i:02d}"]["teacher.audio.frames.npy"].shape[0] for i in range(len(SECONDS))]
    by_duration = [lengths[i] for i in np.argsort(SECONDS)]
    assert by_duration == sorted(by_duration) and by_duration[0] < by_duration[-1]  # longer audio, more frames


def test_the_manifest_holds_the_statistics_of_the_cached_values(speech_cache: tuple[Path, ConformerTeacher]) -> None:
    """Stats of every cached float output over its valid positions only, equal to numpy on the stored values."""
    root, teacher = speech_cache
    cached = CachedTeacher(str(root / "cache"), teacher)
    fields = cached_fields(next((root / "cache").glob("train-*.tar")))
    assert sorted(cached.stats) == ["audio.frames", "audio.sequence", "audio.token_states"]
    for key in cached.stats:
        rows = []
        for arrays in fields.values():
            value = arrays[f"teacher.{key}.npy"].astype(np.float64)
            mask = arrays.get(f"teacher.{key}_mask.npy")
            rows.append(value[mask] if mask is not None else value[None])
        data = np.concatenate(rows)
        stats = cached.stats[key]
        assert stats.count == len(data)
        assert np.allclose(stats.mean.numpy(), data.mean(0), atol=1e-6)
        assert np.allclose(stats.std.numpy(), data.std(0), atol=1e-6)
        assert np.allclose(stats.quantiles()["0.5"], np.quantile(data, 0.5, axis=0))


def test_cached_batches_mix_lengths_and_match_the_live_teacher(speech_cache: tuple[Path, ConformerTeacher]) -> None:
    root, teacher = speech_cache
    mods = modalities()
    cached = CachedTeacher(str(root / "cache"), teacher)
    frame_loss = LIBSFrameLoss(student_dim=16, teacher_dim=16, alignment="interpolate", max_cer=1.0)
    context_loss = LIBSContextLoss(student_dim=16, teacher_dim=16, max_cer=1.0)
    batches = make_pipeline(str(root / "cache" / "train-*.tar"), mods, batch_size=3, train=False)
    seen = 0
    for batch in batches:  # batches of 3 straddle the cache's batches of 4: lengths come from different paddings
        batch = prepare_on_device(batch, mods, train=False)
        served, live = cached(batch), teacher(batch)
        assert served["audio.frame_rate"].item() == live["audio.frame_rate"].item() == 25.0
        for key in ("audio.frames_mask", "audio.token_states_mask", "audio.char_token_mask",
                    "audio.hypothesis_chars_mask"):
            assert served[key].dtype == torch.bool and torch.equal(served[key], live[key])
        for key in ("audio.token_ids", "audio.char_token", "audio.hypothesis_chars"):
            assert not served[key].is_floating_point() and torch.equal(served[key].long(), live[key]), key
        for key in ("audio.frames", "audio.token_states", "audio.sequence"):
            assert served[key].shape == live[key].shape
            assert torch.allclose(served[key], live[key], atol=2e-3, rtol=2e-3), key
        n_video = (batch["audio_lengths"] * 25 // 16000).clamp(min=1)  # 25 fps video of the same utterances
        video_mask = torch.arange(int(n_video.max()))[None] < n_video[:, None]
        video = torch.randn(len(n_video), video_mask.shape[1], 16)
        char_mask = live["audio.char_token_mask"]
        chars = torch.randn(*char_mask.shape, 16)
        for loss, student in ((frame_loss, (video, video_mask)), (context_loss, (chars, char_mask))):
            cached_value = loss(student, tuple(served[k] for k in key_list(loss.teacher_key)), batch)
            cached_kept = loss.last_metrics["kept_fraction"]
            live_value = loss(student, tuple(live[k] for k in key_list(loss.teacher_key)), batch)
            assert torch.allclose(cached_value, live_value, rtol=1e-3), loss.name
            assert torch.equal(cached_kept, loss.last_metrics["kept_fraction"])
        seen += len(batch["transcript"])
    assert seen == len(SECONDS)


def test_a_cached_whisper_teacher_serves_its_generic_outputs(tmp_path: Path) -> None:
    """Token ids, the character -> token map and the hypotheses survive the cache as integers, and the LIBS losses
    (which derive the per-character context and the CER filter from them) give the live teacher's values."""
    from tests.test_whisper_teacher import write_tiny_tokenizer
    from xmodal.teachers.whisper import WhisperTeacher

    tokens = write_tiny_tokenizer(tmp_path)
    config = {"model_type": "whisper", "vocab_size": 48, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
              "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32,
              "decoder_ffn_dim": 32, "max_target_positions": 64, "decoder_start_token_id": tokens["sot"],
              "eos_token_id": tokens["eos"], "pad_token_id": tokens["eos"], "bos_token_id": tokens["eos"]}
    teacher = WhisperTeacher(config=config, tokenizer=str(tmp_path / "tokenizer.json"), seconds=2.0,
                             suppress_ids=[], suppress_ids_begin=[], max_new_tokens=4)
    samples = [{"__key__": f"utt{i:02d}", "flac": flac_bytes(s, i), "txt": text}
               for i, (s, text) in enumerate(zip(SECONDS, TEXTS, strict=True))]
    write_shards(samples, tmp_path / "raw", "train")
    cache_teacher(teacher, modalities(), str(tmp_path / "raw" / "train-*.tar"), tmp_path / "cache", batch_size=4)
    cached = CachedTeacher(str(tmp_path / "cache"), teacher)
    losses = [LIBSContextLoss(student_dim=16, teacher_dim=16, max_cer=2.0),
              LIBSFrameLoss(student_dim=16, teacher_dim=16, alignment="interpolate", max_cer=2.0)]
    for batch in make_pipeline(str(tmp_path / "cache" / "train-*.tar"), modalities(), batch_size=3, train=False):
        batch = prepare_on_device(batch, modalities(), train=False)
        served, live = cached(batch), teacher(batch)
        assert set(served) == set(live) == set(teacher.output_keys)
        for key in ("audio.token_ids", "audio.char_token", "audio.hypothesis_ids", "audio.hypothesis_chars"):
            mask = live[key + "_mask"]
            assert torch.equal(served[key + "_mask"], mask), key
            assert torch.equal(served[key].long() * mask, live[key] * mask), key
        student = {"video.context": torch.randn(*live["audio.char_token"].shape, 16),
                   "video.context_mask": live["audio.char_token_mask"],
                   "video.frames": torch.randn(len(batch["transcript"]), 20, 16),
                   "video.frames_mask": torch.ones(len(batch["transcript"]), 20, dtype=torch.bool)}
        for loss in losses:
            s, t_served = loss.select(student, served)
            cached_value = loss(s, t_served, batch)
            kept = loss.last_metrics["kept_fraction"]
            live_value = loss(s, loss.select(student, live)[1], batch)
            assert torch.allclose(cached_value, live_value, rtol=1e-3), loss.name
            assert torch.equal(kept, loss.last_metrics["kept_fraction"])


def audio_front_ends() -> dict[str, Any]:
    from xmodal.modalities.audio import AudioEncoder
    from xmodal.students.lipreader import AudioFrontend

    torch.manual_seed(0)
    asr = ConformerASR(dim=16, depth=1, heads=2, decoder_depth=1, kernel=5, dropout=0.0).eval()
    return {"conformer": asr.encode, "audio-encoder": AudioEncoder(dim=16, depth=1, heads=2, stride=4,
                                                                   dropout=0.0).eval(),
            "lipreader-audio": AudioFrontend(dim=16, stride=4)}


@pytest.mark.parametrize("name", ["conformer", "audio-encoder", "lipreader-audio"])
def test_a_clips_audio_features_do_not_depend_on_its_batch(name: str) -> None:
    """Alone or padded into a batch with a longer clip, a clip's frames are the same (the STFT's reflect padding
    and every conv's zero padding see the clip's own end, not the batch's)."""
    encode = audio_front_ends()[name]
    torch.manual_seed(1)
    long, short = torch.randn(20000) * 0.3, torch.randn(12345) * 0.3
    batch = torch.stack([long, nn_pad(short, 20000)])
    with torch.no_grad():
        together, lengths = encode(batch, torch.tensor([20000, 12345]))
        alone, alone_lengths = encode(short[None], torch.tensor([12345]))
    n = int(alone_lengths[0]) if alone_lengths.dim() == 1 else int(alone_lengths[0].sum())
    assert int(lengths[1]) == n if lengths.dim() == 1 else int(lengths[1].sum()) == n
    assert torch.allclose(together[1, :n], alone[0, :n], atol=1e-5)
    assert n < together.shape[1]


def nn_pad(wave: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(wave, (0, length - wave.shape[0]))

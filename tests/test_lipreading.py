"""Lip reading: the LipReader student, LIBS losses (alignment across rates, filtering), MixSpeech, ``eval asr``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmodal.callbacks import MixSpeechSchedule
from xmodal.losses.libs import (
    CharCELoss,
    CharCTCLoss,
    FrameAligner,
    LIBSContextLoss,
    LIBSFrameLoss,
    LIBSSequenceLoss,
    char_vectors,
    interpolation_weights,
    teacher_cer,
)
from xmodal.losses.mixspeech import MixSpeechLoss, mix_ratio, mixed_kl
from xmodal.modalities.audio import lengths_to_mask, resample_to
from xmodal.modalities.transcript import (
    CharVocab,
    TranscriptModality,
    cer,
    codepoints_to_texts,
    decoder_targets,
    texts_to_codepoints,
    wer,
)
from xmodal.students.lipreader import LipReader, LipReaderAudioTeacher

ROOT = Path(__file__).resolve().parent.parent
TINY = {"dim": 16, "channels": 4, "depth": 1, "max_len": 12, "dropout": 0.0}
TEXTS = ["bin blue", "at f two now"]


def make_batch(frames: tuple[int, int] = (10, 7), size: int = 32, seconds: float = 0.4) -> dict[str, Any]:
    torch.manual_seed(0)
    samples = int(seconds * 16000)
    return {
        "video": torch.rand(2, max(frames), 3, size, size), "video_lengths": torch.tensor(frames),
        "audio": torch.rand(2, samples) * 2 - 1, "audio_lengths": torch.tensor([samples, samples * 3 // 4]),
        "transcript": list(TEXTS),
    }


# --- the student -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoder", ["gru", "transformer"])
def test_lipreader_output_shapes(encoder: str) -> None:
    model = LipReader(**TINY, encoder=encoder, heads=2, ctc=True)
    out = model(make_batch())
    length = max(len(CharVocab().encode(t)) for t in TEXTS)
    assert set(out) == set(model.output_keys)
    assert out["video.frames"].shape == (2, 10, 16) and out["video.frames_mask"].sum(1).tolist() == [10, 7]
    assert out["video.frames"][1, 7:].abs().sum() == 0  # zero at padding
    assert out["video.sequence"].shape == (2, 16)
    assert out["video.context"].shape == (2, length, 16)
    assert out["video.context_mask"].sum(1).tolist() == [len(t) for t in TEXTS]
    assert out["video.char_logits"].shape == (2, length + 1, len(CharVocab()))
    assert out["video.ctc_logits"].shape == (2, 10, len(CharVocab()))


def test_decoder_targets_and_char_ce_match_cross_entropy() -> None:
    vocab = CharVocab()
    inputs, targets, lengths = decoder_targets(vocab, ["ab", "a"])
    assert inputs.tolist() == [[1, 5, 6], [1, 5, 0]]
    assert targets.tolist() == [[5, 6, 2], [5, 2, -100]] and lengths.tolist() == [2, 1]
    logits = torch.randn(2, 3, len(vocab), requires_grad=True)
    loss = CharCELoss()(logits, None, {"transcript": ["ab", "a"]})
    expected = F.cross_entropy(logits.reshape(-1, len(vocab)), targets.reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    ctc = CharCTCLoss()((torch.randn(2, 6, len(vocab)), torch.ones(2, 6, dtype=torch.bool)), None,
                        {"transcript": ["ab", "a"]})
    assert torch.isfinite(ctc) and ctc > 0


def sequence_scores(model: LipReader, batch: dict[str, Any], texts: list[str]) -> torch.Tensor:
    """Length-normalised log-probability of ``texts`` (+ ``<eos>``) under teacher forcing: ``B``."""
    states, mask = model.encode(batch)
    with torch.no_grad():
        inputs, targets, _ = decoder_targets(model.vocab, texts)
        logits, _ = model.decoder(states, mask, inputs)
    valid = targets != -100
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid
    return logp.sum(1) / valid.sum(1)


def test_beam_search_scores_at_least_greedy_and_decodes_valid_text() -> None:
    torch.manual_seed(1)
    model = LipReader(**TINY).eval()
    batch = make_batch()
    greedy = model.transcribe(batch, beam_size=1)
    states, mask = model.encode(batch)
    assert model.beam_decode(states, mask, beam_size=1) == greedy
    beams = model.transcribe(batch, beam_size=4)
    assert len(beams) == 2 and all(len(text) <= model.max_len for text in beams)
    assert all(set(text) <= set(" 'abcdefghijklmnopqrstuvwxyz") for text in greedy + beams)
    assert (sequence_scores(model, batch, beams) >= sequence_scores(model, batch, greedy) - 1e-5).all()


def test_audio_teacher_produces_the_libs_contract() -> None:
    teacher = LipReaderAudioTeacher(lipreader={**TINY, "audio_stride": 2})
    out = teacher(make_batch(seconds=0.4))
    assert set(out) == set(LipReaderAudioTeacher.output_keys)
    assert out["audio.frames"].shape == (2, 21, 16)  # 50 Hz: 6400 samples -> 41 mel frames -> 21
    assert out["audio.frames_mask"].sum(1).tolist() == [21, 16]
    assert out["audio.frame_rate"].item() == 50.0
    assert out["audio.token_states"].shape[:2] == out["audio.token_states_mask"].shape == (2, 12)
    assert torch.equal(out["audio.token_ids"][1], torch.tensor(CharVocab().encode(TEXTS[1])))
    assert out["audio.char_token"][1].tolist() == list(range(12))
    assert out["audio.char_token_mask"].sum(1).tolist() == [8, 12]
    assert out["audio.sequence"].shape == (2, 16)
    hypotheses = codepoints_to_texts(out["audio.hypothesis_chars"], out["audio.hypothesis_chars_mask"])
    assert hypotheses == teacher.model.greedy_decode(out["audio.frames"], out["audio.frames_mask"])
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.train().training
    assert teacher.manifest()["output_keys"] == list(LipReaderAudioTeacher.output_keys)


def test_transcript_modality_normalises_and_collates() -> None:
    modality = TranscriptModality()
    items = [modality.decode({"txt": b"Bin blue at F2, now."}), modality.decode({"txt": "Set red"})]
    assert modality.collate(items) == {"transcript": ["bin blue at f two now", "set red"]}


# --- frame-level alignment across rates --------------------------------------------------------------------------

@pytest.mark.parametrize("audio_rate", [50, 100])
@pytest.mark.parametrize("alignment", ["attention", "interpolate"])
def test_alignment_shapes_across_rates(audio_rate: int, alignment: str) -> None:
    video_frames = torch.tensor([25, 15])  # 1 s and 0.6 s at 25 fps
    audio_frames = video_frames * audio_rate // 25
    s_mask, t_mask = lengths_to_mask(video_frames, 25), lengths_to_mask(audio_frames, int(audio_frames.max()))
    s = torch.randn(2, 25, 8) * s_mask[..., None]
    t = torch.randn(2, int(audio_frames.max()), 12) * t_mask[..., None]
    loss = LIBSFrameLoss(student_dim=8, teacher_dim=12, alignment=alignment)  # type: ignore[arg-type]
    value = loss((s, s_mask), (t, t_mask), {})
    weights = loss.last_attention
    assert weights is not None and weights.shape == (2, 25, audio_rate)
    assert torch.allclose(weights.sum(-1), s_mask.float(), atol=1e-5)  # rows sum to 1, padded rows to 0
    assert weights[1, :, int(audio_frames[1]):].abs().sum() == 0  # no weight on padded audio frames
    assert torch.isfinite(value)


def test_interpolation_weights_reproduce_resample_to() -> None:
    s_mask, t_mask = lengths_to_mask(torch.tensor([25, 10]), 25), lengths_to_mask(torch.tensor([100, 40]), 100)
    t = torch.randn(2, 100, 6) * t_mask[..., None]
    expected = resample_to(t, t_mask.sum(1), s_mask.sum(1), 25) * s_mask[..., None]
    assert torch.allclose(interpolation_weights(s_mask, t_mask) @ t, expected, atol=1e-5)


def test_diagonal_prior_puts_attention_on_the_linear_time_diagonal() -> None:
    aligner = FrameAligner(8, 8, prior_sigma=0.02)
    torch.nn.init.zeros_(aligner.query.weight)
    torch.nn.init.zeros_(aligner.query.bias)  # content scores 0: the prior alone decides
    s_mask, t_mask = torch.ones(1, 25, dtype=torch.bool), torch.ones(1, 100, dtype=torch.bool)
    weights = aligner(torch.randn(1, 25, 8), s_mask, torch.randn(1, 100, 8), t_mask)
    peaks = weights[0].argmax(-1).float()
    diagonal = (torch.arange(25) + 0.5) * 4 - 0.5
    assert (peaks - diagonal).abs().max() <= 0.5


def test_band_keeps_attention_near_the_diagonal_whatever_the_scores() -> None:
    aligner = FrameAligner(4, 4, prior_sigma=None, max_offset=0.1)
    s_mask, t_mask = lengths_to_mask(torch.tensor([25, 5]), 25), lengths_to_mask(torch.tensor([100, 3]), 100)
    s, t = torch.randn(2, 25, 4) * 100, torch.randn(2, 100, 4) * 100  # scores far larger than any prior
    weights = aligner(s, s_mask, t, t_mask)
    assert torch.allclose(weights.sum(-1), s_mask.float(), atol=1e-5)  # every valid row still has a frame
    position = (torch.arange(100).float() + 0.5) / 100
    offset = (((torch.arange(25).float() + 0.5) / 25)[:, None] - position[None, :]).abs()
    assert weights[0][offset > 0.1 + 1e-5].abs().max() == 0


def test_coverage_penalty_hand_computed_and_logged() -> None:
    from xmodal.losses.libs import coverage_penalty

    s_mask, t_mask = torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)
    uniform = torch.full((1, 2, 4), 0.25)
    hub = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0]]])  # both video frames on audio frame 0
    assert coverage_penalty(uniform, s_mask, t_mask).item() == pytest.approx(0.0)
    assert coverage_penalty(hub, s_mask, t_mask).item() == pytest.approx(((4 - 1) ** 2 + 3 * 1) / 4)  # share 0.5
    loss = LIBSFrameLoss(4, 4, coverage_weight=0.5)
    loss((torch.randn(1, 2, 4), s_mask), (torch.randn(1, 4, 4), t_mask), {})
    assert "coverage" in loss.last_metrics


def test_frame_attention_trains_queries_and_keys_but_not_the_teacher() -> None:
    loss = LIBSFrameLoss(student_dim=8, teacher_dim=12, detach_query=False)
    s = torch.randn(2, 10, 8, requires_grad=True)
    t = torch.randn(2, 20, 12, requires_grad=True)
    mask_s, mask_t = torch.ones(2, 10, dtype=torch.bool), torch.ones(2, 20, dtype=torch.bool)
    loss((s, mask_s), (t, mask_t), {}).backward()
    assert loss.aligner.query.weight.grad is not None and loss.aligner.key.weight.grad.abs().sum() > 0
    assert s.grad is not None and t.grad is None


# --- filtering ---------------------------------------------------------------------------------------------------

REFERENCE = "abcdefghij"


def hypotheses_with_errors(*errors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher hypotheses (code points + mask) with ``errors[i]`` substituted characters of :data:`REFERENCE`,
    i.e. a CER of ``errors[i] / 10`` against it."""
    return texts_to_codepoints(["x" * n + REFERENCE[n:] for n in errors])


def filtered_cases() -> list[tuple[Any, Any, Any]]:
    torch.manual_seed(0)
    hyp = hypotheses_with_errors(1, 5, 2)  # CER 0.1, 0.5, 0.2
    m = torch.ones(3, 4, dtype=torch.bool)
    chars = torch.arange(4).expand(3, 4)
    return [
        (LIBSSequenceLoss(max_cer=0.3), torch.randn(3, 6), (torch.randn(3, 6), *hyp)),
        (LIBSContextLoss(max_cer=0.3), (torch.randn(3, 4, 6), m), (torch.randn(3, 4, 6), chars, m, *hyp)),
        (LIBSFrameLoss(6, 6, max_cer=0.3), (torch.randn(3, 4, 6), m), (torch.randn(3, 8, 6), m.repeat(1, 2), *hyp)),
    ]


@pytest.mark.parametrize("case", range(3), ids=["sequence", "context", "frame"])
def test_filtering_keeps_fraction_and_zeroes_gradients_over_threshold(case: int) -> None:
    loss, s, t = filtered_cases()[case]
    assert loss.teacher_key[-2:] == ["audio.hypothesis_chars", "audio.hypothesis_chars_mask"]
    feats = (s if isinstance(s, torch.Tensor) else s[0]).requires_grad_(True)
    value = loss(feats if isinstance(s, torch.Tensor) else (feats, s[1]), t, {"transcript": [REFERENCE] * 3})
    assert loss.last_metrics["kept_fraction"].item() == pytest.approx(2 / 3)
    value.backward()
    assert feats.grad[1].abs().sum() == 0  # CER 0.5 > 0.3: no gradient
    assert feats.grad[0].abs().sum() > 0 and feats.grad[2].abs().sum() > 0


def test_filtered_sequence_loss_hand_computed_and_empty_batch() -> None:
    s, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    loss = LIBSSequenceLoss(max_cer=0.5)
    batch = {"transcript": [REFERENCE] * 2}
    value = loss(s, (target, *hypotheses_with_errors(2, 9)), batch)
    assert value.item() == pytest.approx((1 + 4) / 2)  # CER 0.2 and 0.9: only row 0 kept
    assert LIBSSequenceLoss()(s, (target,), {}).item() == pytest.approx(((1 + 4) / 2 + 25) / 2)  # no filter
    s.requires_grad_(True)
    none = loss(s, (target, *hypotheses_with_errors(9, 9)), batch)
    none.backward()
    assert none.item() == 0.0 and loss.last_metrics["kept_fraction"].item() == 0.0 and s.grad.abs().sum() == 0


def test_context_loss_hand_computed_with_masks() -> None:
    s = torch.zeros(1, 3, 2)
    t = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    assert LIBSContextLoss()((s, mask), (t, torch.tensor([[0, 1, 2]]), mask), {}).item() == pytest.approx((1 + 4) / 2)


def test_context_loss_gives_each_character_its_token_state() -> None:
    # characters "ab c" held by tokens [" ab", " c"]: the teacher's per-character targets are [t0, t0, t1, t1]
    tokens = torch.tensor([[[1.0], [3.0]]])
    char_token, mask = torch.tensor([[0, 0, 1, 1, 0]]), torch.tensor([[True, True, True, True, False]])
    assert torch.equal(char_vectors(tokens, char_token, mask), torch.tensor([[[1.0], [1.0], [3.0], [3.0], [0.0]]]))
    s = torch.zeros(1, 5, 1)
    value = LIBSContextLoss()((s, torch.ones(1, 5, dtype=torch.bool)), (tokens, char_token, mask), {})
    assert value.item() == pytest.approx((1 + 1 + 9 + 9) / 4)


def test_teacher_cer_of_the_hypotheses_against_the_transcripts() -> None:
    cers = teacher_cer(*hypotheses_with_errors(0, 3, 10), ["ABCdefghij.", REFERENCE, REFERENCE])
    assert cers.tolist() == pytest.approx([0.0, 0.3, 1.0])  # references are normalised first
    texts = ["café привет", "", "x"]
    assert codepoints_to_texts(*texts_to_codepoints(texts)) == texts  # any script survives the tensor form


def test_distiller_logs_the_kept_fraction() -> None:
    from xmodal.distiller import Distiller

    student = LipReader(**TINY)
    teacher = LipReaderAudioTeacher(lipreader={**TINY, "audio_stride": 2})
    losses = [CharCELoss(), LIBSSequenceLoss(max_cer=10.0)]
    distiller = Distiller(student, losses, teacher=teacher)
    logged: dict[str, float] = {}
    distiller.log = lambda name, value, **kw: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    distiller.training_step(make_batch(), 0)
    assert logged["train/libs_sequence/kept_fraction"] == 1.0 and "train/char_ce" in logged


# --- MixSpeech ---------------------------------------------------------------------------------------------------

def test_mix_ratio_schedule_values() -> None:
    assert [mix_ratio(s, 10) for s in (0, 5, 10, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert [mix_ratio(s, 10, hold=4) for s in (0, 4, 9, 14)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert mix_ratio(5, 10, shape="cosine") == pytest.approx(0.5)
    assert mix_ratio(2, 10, shape="cosine") == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.2)))
    assert mix_ratio(5, 10, start=0.8, end=0.2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        mix_ratio(0, 10, shape="step")  # type: ignore[arg-type]


def test_schedule_callback_sets_lambda_on_the_student() -> None:
    student = LipReader(**TINY, audio_frontend=True)
    logged: dict[str, float] = {}
    module = SimpleNamespace(student=student, log=lambda name, value, **kw: logged.__setitem__(name, value))
    MixSpeechSchedule(steps=8).on_train_batch_start(SimpleNamespace(global_step=2), module, {}, 0)  # type: ignore[arg-type]
    assert student.mix_lambda == pytest.approx(0.75) and logged["train/mix_lambda"] == pytest.approx(0.75)


def test_mixed_stream_is_visual_at_lambda_zero_and_audio_at_one() -> None:
    model = LipReader(**TINY, audio_frontend=True).eval()
    batch = make_batch()
    model.mix_lambda = 0.0
    out = model(batch)
    assert torch.equal(out["av.char_logits"], out["video.char_logits"])
    loss = MixSpeechLoss(kl_weight=1.0, ce_weight=0.0)
    assert loss((out["video.char_logits"], out["av.char_logits"]), None, batch).item() == pytest.approx(0, abs=1e-6)
    lengths = batch["video_lengths"]
    visual = model.visual_features(batch["video"], lengths)
    model.mix_lambda = 1.0
    mixed = model.mixed_features(visual, lengths, batch["audio"], batch["audio_lengths"])
    audio, audio_lengths = model.audio_features(batch["audio"], batch["audio_lengths"])
    expected = resample_to(audio, audio_lengths, lengths, visual.shape[1]) * lengths_to_mask(lengths, 10)[..., None]
    assert torch.allclose(mixed, expected)


def test_mixspeech_loss_is_ce_plus_kl() -> None:
    torch.manual_seed(0)
    visual, mixed = torch.randn(2, 13, 31), torch.randn(2, 13, 31)
    batch = {"transcript": list(TEXTS)}
    ce = CharCELoss("av.char_logits")(mixed, None, batch)
    _, targets, _ = decoder_targets(CharVocab(), TEXTS)
    valid = targets != -100
    kl = F.kl_div(visual[valid].log_softmax(-1), mixed[valid].log_softmax(-1), log_target=True, reduction="batchmean")
    value = MixSpeechLoss(ce_weight=0.5, kl_weight=2.0)((visual, mixed), None, batch)
    assert value.item() == pytest.approx(0.5 * ce.item() + 2.0 * kl.item(), rel=1e-5)
    assert mixed_kl(visual[valid], mixed[valid]).item() == pytest.approx(kl.item(), rel=1e-5)


# --- evaluation --------------------------------------------------------------------------------------------------

def test_cer_and_wer_match_jiwer() -> None:
    jiwer = pytest.importorskip("jiwer")
    refs = ["bin blue at f two now", "place red by a nine again", "set white with p four please"]
    hyps = ["bin blue at f too now", "place red a nine again soon", "sat white with four please"]
    assert cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))
    assert wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
    from xmodal.eval.metrics import error_rates

    assert error_rates(refs, hyps) == pytest.approx({"cer": jiwer.cer(refs, hyps), "wer": jiwer.wer(refs, hyps)})


@pytest.fixture
def file_list(tmp_path: Path) -> Path:
    """A GRID-style list of two tiny clips (mp4 + wav) under ``tmp_path/data``."""
    from xmodal.modalities.audio import encode_audio
    from xmodal.modalities.video import encode_mp4

    rng = np.random.default_rng(0)
    (tmp_path / "data/s1").mkdir(parents=True)
    for name, frames in (("bbaf2n", 8), ("lrae3s", 6)):
        encode = encode_mp4(rng.integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8), fps=25)
        (tmp_path / f"data/s1/{name}.mp4").write_bytes(encode)
        wave = (rng.standard_normal(frames * 640) * 0.1).astype(np.float32)
        (tmp_path / f"data/s1/{name}.wav").write_bytes(encode_audio(wave, 16000, "WAV"))
    listing = "# GRID test list\ns1/bbaf2n Bin blue at F2 now.\n\ns1/lrae3s.mp4 lay red at E three soon\n"
    (tmp_path / "data/test.txt").write_text(listing)
    return tmp_path / "data/test.txt"


def test_read_file_list(file_list: Path) -> None:
    from xmodal.data.eval_sets import read_file_list

    items = read_file_list(file_list)
    assert [(p.name, text) for p, text in items] == [("bbaf2n.mp4", "bin blue at f two now"),
                                                       ("lrae3s.mp4", "lay red at e three soon")]
    bad = file_list.parent / "bad.txt"
    bad.write_text("s1/only_a_path\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_file_list(bad)


def test_eval_asr_on_a_file_list(file_list: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xmodal.commands.eval import eval_main
    from xmodal.zoo import save_pretrained

    torch.manual_seed(0)
    model = LipReader(**TINY)
    save_pretrained(model, model.init_args, tmp_path / "model", name="tiny-lipreader")
    out = tmp_path / "results.json"
    eval_main(["asr", "--model", str(tmp_path / "model"), "--list", str(file_list), "--size", "32", "--beam-size",
               "2", "--device", "cpu", "--out", str(out)])
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["utterances"] == 2
    hyps = [e["greedy"] for e in metrics["examples"]]
    refs = ["bin blue at f two now", "lay red at e three soon"]
    assert metrics["greedy_cer"] == pytest.approx(cer(refs, hyps))
    assert metrics["greedy_wer"] == pytest.approx(wer(refs, hyps))
    assert {"beam_cer", "beam_wer"} <= set(metrics) and "greedy_cer" in capsys.readouterr().out


def test_eval_asr_rejects_plot_without_a_recipe(file_list: Path) -> None:
    from xmodal.commands.eval import eval_main

    with pytest.raises(SystemExit) as exit_info:
        eval_main(["asr", "--model", "x", "--list", str(file_list), "--plot", "out"])
    assert exit_info.value.code == 2


def test_alignment_plot_from_a_recipe(file_list: Path, tmp_path: Path) -> None:
    from xmodal.commands.eval_asr import asr_modalities
    from xmodal.data.eval_sets import list_batches, read_file_list, to_device
    from xmodal.render import alignment_maps, plot_alignments
    from xmodal.zoo.loading import load_distiller

    distiller = load_distiller(ROOT / "configs/tiny/lipreading.yaml").eval()
    args = SimpleNamespace(num_frames=75, size=32, fps=25.0)
    modalities = asr_modalities(args, with_audio=True)  # type: ignore[arg-type]
    batch = to_device(next(list_batches(read_file_list(file_list), modalities, 2)), torch.device("cpu"), modalities)
    maps = alignment_maps(distiller, batch, count=2)
    assert [tuple(m.shape) for m in maps] == [(8, 17), (6, 13)]  # 25 fps video vs the teacher's 50 Hz frames
    path = plot_alignments(maps, batch["transcript"], tmp_path / "plots/alignment.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_lipreading_granularity_is_a_yaml_toggle() -> None:
    import yaml

    names = ["student_alone", "libs_frame", "libs_context", "libs_sequence", "libs_full", "libs_no_filter",
             "libs_interpolate", "mixspeech"]
    configs = {name: yaml.safe_load((ROOT / f"configs/lipreading/{name}.yaml").read_text()) for name in names}
    losses = {name: {loss["class_path"].rsplit(".", 1)[-1] for loss in cfg["model"]["losses"]}
              for name, cfg in configs.items()}
    assert losses["student_alone"] == {"CharCELoss"}
    for granularity, loss in (("frame", "LIBSFrameLoss"), ("context", "LIBSContextLoss"),
                              ("sequence", "LIBSSequenceLoss")):
        assert losses[f"libs_{granularity}"] == {"CharCELoss", loss}
    assert losses["libs_full"] == losses["libs_no_filter"] == {"CharCELoss", "LIBSFrameLoss", "LIBSContextLoss",
                                                                "LIBSSequenceLoss"}
    no_filter = [loss.get("init_args", {}) for loss in configs["libs_no_filter"]["model"]["losses"]]
    assert all(args.get("max_cer") is None for args in no_filter)
    assert "MixSpeechLoss" in losses["mixspeech"]


def test_eval_asr_cli_with_a_recipe_writes_the_alignment_png(file_list: Path, tmp_path: Path) -> None:
    from xmodal.commands.eval import eval_main

    out = tmp_path / "results.json"
    eval_main(["asr", "--config", str(ROOT / "configs/tiny/lipreading.yaml"), "--list", str(file_list), "--size", "32",
               "--beam-size", "1", "--device", "cpu", "--plot", str(tmp_path / "plots"), "--plot-count", "2",
               "--out", str(out)])
    metrics = json.loads(out.read_text())["metrics"]
    assert Path(metrics["alignment_png"]).read_bytes()[:4] == b"\x89PNG" and "beam_cer" not in metrics

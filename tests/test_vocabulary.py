"""The configurable character vocabulary (issue 26): the English default is today's, other vocabularies load from a
list, a file or a converted corpus, and the CMLR recipe learns from Mandarin shards with the corpus' vocabulary."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT
from tests.test_configs import assert_one_finite_step, record_fits
from tests.test_convert_av import convert, make_cmlr
from xmodal.losses import libs
from xmodal.losses.libs import CharCELoss, CharCTCLoss
from xmodal.losses.mixspeech import MixSpeechLoss
from xmodal.modalities.transcript import (
    CharVocab,
    TranscriptModality,
    corpus_vocabulary,
    load_vocabulary,
    normalize_transcript,
)
from xmodal.students.lipreader import LipReader

CMLR_SENTENCE = "今天，中央气象台发布了 2 条预警。"  # the transcript of tests/test_convert_av.make_cmlr's clips
CMLR_RECIPE = ROOT / "configs/lipreading/cmlr.yaml"


def test_default_vocabulary_is_the_english_one_of_before() -> None:
    vocab = CharVocab()
    assert vocab.itos == ["<blank>", "<sos>", "<eos>", " ", "'", *"abcdefghijklmnopqrstuvwxyz"]
    assert vocab.encode("Place blue at F2, don't!") == [20, 16, 5, 7, 9, 3, 6, 16, 25, 9, 3, 5, 24, 3, 10, 3, 24, 27,
                                                         19, 3, 8, 19, 18, 4, 24]
    assert load_vocabulary(None).itos == vocab.itos and vocab.is_default
    student = LipReader(dim=16, channels=4, depth=1, ctc=True)
    assert "vocabulary" not in student.init_args  # saved configs of the existing recipes are unchanged
    assert student.decoder.out.out_features == student.ctc_head.out_features == 31  # type: ignore[union-attr]
    assert TranscriptModality().language == "en"


def test_a_chinese_vocabulary_round_trips_a_cmlr_transcript() -> None:
    vocabulary = corpus_vocabulary([CMLR_SENTENCE, "中央电视台"], "zh")
    assert vocabulary["chars"][:4] == [" ", "中", "台", "央"]  # most frequent first (3, 2, 2, 2), ties by code point
    assert vocabulary["counts"][" "] == 3 and vocabulary["transcripts"] == 2
    vocab = load_vocabulary(vocabulary)
    ids = vocab.encode(CMLR_SENTENCE)
    assert len(ids) == len(normalize_transcript(CMLR_SENTENCE, "zh")) and min(ids) >= len(CharVocab.specials)
    assert vocab.decode(ids + [vocab.eos, ids[0]]) == "今天 中央气象台发布了 2 条预警"
    assert CharVocab().decode(CharVocab().encode(CMLR_SENTENCE)) == "  two "  # the bug: a-z keeps no Chinese


def test_vocabularies_load_from_a_list_a_file_or_a_folder(tmp_path: Path) -> None:
    assert load_vocabulary(["中", "央"]).itos[3:] == ["中", "央"]
    (tmp_path / "chars.txt").write_text("中\n \n央\n", encoding="utf-8")
    assert load_vocabulary(str(tmp_path / "chars.txt")).chars == ["中", " ", "央"]
    (tmp_path / "list.json").write_text(json.dumps(["a", "b"]))
    assert load_vocabulary(str(tmp_path / "list.json")).chars == ["a", "b"]
    (tmp_path / "vocabulary.json").write_text(json.dumps({"chars": ["中", "2"], "language": "zh"}))
    folder = load_vocabulary(str(tmp_path))
    assert folder.chars == ["中", "2"] and folder.language == "zh" and folder.encode("中 2") == [3, 4]
    assert load_vocabulary(folder.to_json()).itos == folder.itos


@pytest.mark.parametrize(("spec", "message"), [
    (["A"], "single characters"), (["ab"], "single characters"), (["2"], "single characters"),
    (["a", "a"], "repeated"), ({"letters": ["a"]}, "needs 'chars'"),
])
def test_unusable_vocabularies_fail_clearly(spec: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_vocabulary(spec)


def test_missing_or_malformed_vocabulary_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="vocabulary.json"):
        load_vocabulary(str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_vocabulary(str(tmp_path / "bad.json"))


def test_cer_on_chinese_counts_characters() -> None:
    from xmodal.eval.metrics import error_rates

    rates = error_rates(["今天，中央气象台。"], ["今天中央气象"], "zh")  # reference "今天 中央气象台": 8 characters
    assert rates["cer"] == pytest.approx(2 / 8)  # the space and 台 missing
    assert rates["wer"] == 1.0  # whitespace runs, not words: WER is no measure for Mandarin


def test_a_student_saves_its_vocabulary_and_losses_check_theirs(tmp_path: Path) -> None:
    from xmodal.zoo import create_model

    spec = {"chars": ["今", "天", " "], "language": "zh"}
    student = LipReader(dim=16, channels=4, depth=1, vocabulary=spec)
    student.save_pretrained(tmp_path / "student")
    assert student.init_args["vocabulary"] == spec
    assert create_model(str(tmp_path / "student")).vocab.itos == student.vocab.itos  # rebuilt without the file
    logits = torch.zeros(1, 5, len(student.vocab))  # 4 characters and <eos>
    batch = {"transcript": ["今天 天"]}
    assert torch.isfinite(CharCELoss(vocabulary=spec)(logits, None, batch))
    with pytest.raises(ValueError, match="logits over 6 classes but the vocabulary has 31"):
        CharCELoss()(logits, None, batch)
    with pytest.raises(ValueError, match="no character of the batch's transcripts"):
        CharCTCLoss()((torch.zeros(1, 5, 31), torch.ones(1, 5, dtype=torch.bool)), None, {"transcript": ["今天"]})
    with pytest.raises(ValueError, match="logits over 6 classes"):
        MixSpeechLoss()((logits, logits), None, batch)


# ------------------------------------------------------------------------------ the CMLR recipe on converted shards


@pytest.fixture(scope="module")
def cmlr_workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working directory whose ``runs/data/cmlr`` holds the converted CMLR miniature (the recipe's paths)."""
    work = tmp_path_factory.mktemp("cmlr_work")
    manifest = convert("cmlr", make_cmlr(work / "src"), work / "runs/data/cmlr")
    assert manifest["vocabulary"] == {"file": "vocabulary.json", "characters": 15}  # 14 characters and the space
    yield work


def test_the_converter_writes_the_train_split_vocabulary(cmlr_workspace: Path) -> None:
    written = json.loads((cmlr_workspace / "runs/data/cmlr/vocabulary.json").read_text(encoding="utf-8"))
    assert written == corpus_vocabulary([CMLR_SENTENCE], "zh")  # one train clip written (the other lacks audio)
    assert written["chars"][0] == " " and written["transcripts"] == 1
    assert json.loads((cmlr_workspace / "runs/data/cmlr/meta.json").read_text())["vocabulary"]["characters"] == 15


def test_the_cmlr_recipe_trains_on_non_empty_targets(cmlr_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xmodal.commands.main import main

    seen: list[torch.Tensor] = []
    targets_of = libs.decoder_targets

    def recording_targets(vocab: CharVocab, texts: Any) -> Any:
        out = targets_of(vocab, texts)
        seen.append(out[1])
        return out

    monkeypatch.setattr(libs, "decoder_targets", recording_targets)
    monkeypatch.chdir(cmlr_workspace)
    trainers = record_fits(monkeypatch)
    main(["fit", "--config", str(CMLR_RECIPE), "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu",
          "--data.batch_size=1", "--data.num_workers=0", "--model.student.init_args.dim=32",
          "--model.student.init_args.channels=4", "--model.student.init_args.depth=1"])
    assert_one_finite_step(trainers)
    characters = seen[0][(seen[0] != -100) & (seen[0] > 2)]  # labels that are characters (not padding or <eos>)
    assert len(characters) == len(normalize_transcript(CMLR_SENTENCE, "zh"))
    assert "val/cer" in trainers[0].callback_metrics


def test_the_lip_reader_overfits_one_cmlr_batch(cmlr_workspace: Path) -> None:
    from xmodal.data.wds import make_pipeline
    from xmodal.modalities.video import VideoModality

    folder = str(cmlr_workspace / "runs/data/cmlr")
    modalities = [VideoModality(num_frames=32, size=64, fps=25), TranscriptModality(vocabulary=folder)]
    batch = next(iter(make_pipeline(f"{folder}/train-*.tar", modalities, 1, train=False)))
    for modality in modalities:
        batch = modality.on_device(batch, train=False)
    torch.manual_seed(0)
    student = LipReader(dim=32, channels=4, depth=1, dropout=0.0, vocabulary=folder)
    loss_fn = CharCELoss(vocabulary=folder)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = loss_fn(student(batch)["video.char_logits"], None, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses  # measured: 2.88 -> 1.14


def test_eval_asr_scores_in_the_models_language() -> None:
    """``evaluate_asr`` normalises in the lip reader's vocabulary language (Mandarin here), not English."""
    from torch import nn

    from xmodal.eval.loops import evaluate_asr, transcript_language
    from xmodal.eval.metrics import error_rates
    from xmodal.modalities.transcript import load_vocabulary

    class FakeReader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vocab = load_vocabulary({"chars": list("今天气2"), "language": "zh"})

        def transcribe(self, batch: dict, beam_size: int = 1) -> list[str]:
            return ["今天"] * len(batch["transcript"])

    references = ["今天2", "今天气"]
    model = FakeReader()
    assert transcript_language(model) == "zh" and transcript_language(nn.Linear(1, 1)) == "en"
    scores = evaluate_asr(model, [{"transcript": references}], [], beam_size=1)
    expected, english = error_rates(references, ["今天"] * 2, "zh"), error_rates(references, ["今天"] * 2, "en")
    assert scores["greedy_cer"] == pytest.approx(expected["cer"])
    assert expected["cer"] != pytest.approx(english["cer"])  # the language matters for this pair

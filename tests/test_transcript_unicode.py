"""Unicode-aware transcript normalisation and CER/WER on non-English text, checked against jiwer."""

from __future__ import annotations

import unicodedata

import pytest

from xmodal.modalities.transcript import CharVocab, TranscriptModality, cer, normalize_transcript, wer

CAFE_NFC = unicodedata.normalize("NFC", "Café crème")
CAFE_NFD = unicodedata.normalize("NFD", "Café crème")

# (language, references, hypotheses)
CASES = [
    ("ru", ["Привет, мир!", "Москва — столица России."], ["привет мир", "москва столица росии"]),
    ("zh", ["我爱北京天安门。", "今天天气很好"], ["我爱北京天安门", "今天天汽很好啊"]),
    ("de", ["Die Straße ist lang.", "Größe 42"], ["die strasse ist lang", "grösse 24"]),
    ("fr", [CAFE_NFC, "L'été à Noël"], [CAFE_NFD, "l'ete a noel"]),
    ("mixed", ["Hello мир 你好 café", "ΣΟΦΊΑ σοφία"], ["hello мир 你们好 cafe", "σοφια σοφία"]),
    ("hi", ["नमस्ते दुनिया"], ["नमस्ते दुनिय"]),
]


def test_english_behaviour_unchanged() -> None:
    assert normalize_transcript("Bin blue at F2, now.") == "bin blue at f two now"
    assert normalize_transcript("Place  blue-at\tF 2 now!") == "place blue at f two now"
    assert normalize_transcript("Don't STOP") == "don't stop"
    assert normalize_transcript("") == ""
    assert normalize_transcript("F2", "en-US") == normalize_transcript("F2", "english") == "f two"


def test_every_script_is_kept() -> None:
    assert normalize_transcript("Привет, мир!", "ru") == "привет мир"
    assert normalize_transcript("我爱北京天安门。", "zh") == "我爱北京天安门"
    assert normalize_transcript("Straße", "de") == "strasse"  # casefold, not "stra e"
    assert normalize_transcript(CAFE_NFD, "fr") == normalize_transcript(CAFE_NFC, "fr") == "café crème"
    assert normalize_transcript("नमस्ते!", "hi") == "नमस्ते"  # combining vowel signs stay attached
    assert normalize_transcript("Привет") == "привет"  # default (English) keeps other scripts too


def test_digits_become_words_only_in_english() -> None:
    assert normalize_transcript("Größe 42", "de") == "grösse 42"
    assert normalize_transcript("2 кота", "ru") == "2 кота"
    assert normalize_transcript("size 42") == "size four two"


def test_hand_computed_rates() -> None:
    # 10 reference characters (space included), all substituted or deleted.
    assert cer(["привет мир"], ["hello"]) == 1.0
    assert wer(["привет мир"], ["hello"]) == 1.0
    # NFC vs NFD spellings are the same text.
    assert cer([CAFE_NFC], [CAFE_NFD], "fr") == 0.0 and wer([CAFE_NFC], [CAFE_NFD], "fr") == 0.0
    # Mandarin: one substituted character out of 7; the unspaced sentence is a single "word".
    assert cer(["我爱北京天安门"], ["我爱北京天安们"], "zh") == pytest.approx(1 / 7)
    assert wer(["我爱北京天安门"], ["我爱北京天安们"], "zh") == 1.0


@pytest.mark.parametrize(("language", "refs", "hyps"), CASES, ids=[case[0] for case in CASES])
def test_cer_wer_match_jiwer(language: str, refs: list[str], hyps: list[str]) -> None:
    jiwer = pytest.importorskip("jiwer")
    norm_refs = [normalize_transcript(t, language) for t in refs]
    norm_hyps = [normalize_transcript(t, language) for t in hyps]
    assert cer(refs, hyps, language) == pytest.approx(jiwer.cer(norm_refs, norm_hyps))
    assert wer(refs, hyps, language) == pytest.approx(jiwer.wer(norm_refs, norm_hyps))
    assert cer(refs, hyps, language) > 0


def test_jiwer_hand_value() -> None:
    jiwer = pytest.importorskip("jiwer")
    assert jiwer.cer(["привет мир"], ["hello"]) == pytest.approx(1.0)


def test_vocab_skips_unknown_characters_and_modality_language() -> None:
    assert CharVocab().decode(CharVocab().encode("Café 2")) == "caf two"
    assert TranscriptModality(language="de").decode({"txt": "Straße 2".encode()}) == {"transcript": "strasse 2"}

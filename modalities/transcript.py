"""Transcripts for speech and lip reading: normalisation, a character vocabulary, and CER/WER.

Batch field: ``transcript`` (``list[str]``, one normalised sentence per sample). Every recognizer in xmodal
(a lip reader, a from-scratch ASR, Whisper's decoded text) is scored on :func:`normalize_transcript` output, so
"Place blue at F 2 now." and "place blue at f two now" count as the same sentence.

Normalisation is Unicode-aware: letters, digits and combining marks of every script are kept (NFC, casefolded),
so Cyrillic, Chinese or "café" (composed or decomposed) survive; only English spells digits as words.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from xmodal.contracts import Batch, Modality

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ENGLISH = frozenset({"en", "eng", "english"})


def is_english(language: str) -> bool:
    """Whether a language tag (``"en"``, ``"en-US"``, ``"en_GB"``, ``"english"``) names English."""
    return re.split(r"[-_]", language.strip().lower(), maxsplit=1)[0] in ENGLISH


def _keep(char: str) -> bool:
    """Letters (L*), numbers (N*), combining marks (M*) of any script, and the apostrophe."""
    return char == "'" or unicodedata.category(char)[0] in "LNM"


def normalize_transcript(text: str, language: str = "en") -> str:
    """NFC, casefold, every character but letters/numbers/marks/apostrophe to a space, whitespace collapsed.

    For English (``language`` ``"en"``, the default) each decimal digit is also written as a word; other
    languages keep their digits. Examples: ``"Bin blue at F2, now."`` -> ``"bin blue at f two now"``,
    ``normalize_transcript("Straße, Привет!", "de")`` -> ``"strasse привет"``.
    """
    text = unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())
    text = "".join(char if _keep(char) else " " for char in text)
    if is_english(language):
        text = re.sub(r"\d", lambda m: f" {DIGIT_WORDS[int(m.group())]} ", text)
    return " ".join(text.split())


class CharVocab:
    """Characters ``a-z``, space and apostrophe, plus ``<blank>`` (0, also padding), ``<sos>`` and ``<eos>``.

    Index 0 doubles as the CTC blank and the padding value of target tensors.
    """

    specials = ("<blank>", "<sos>", "<eos>")

    def __init__(self, chars: str = " 'abcdefghijklmnopqrstuvwxyz") -> None:
        self.itos = list(self.specials) + list(chars)
        self.stoi = {token: index for index, token in enumerate(self.itos)}
        self.blank, self.sos, self.eos = 0, 1, 2

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Character ids of ``normalize_transcript(text)`` (no sos/eos); characters outside the vocabulary
        (e.g. "é" or Cyrillic with the default English one) are skipped."""
        return [self.stoi[c] for c in normalize_transcript(text) if c in self.stoi]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of ``ids``, stopping at ``<eos>`` and skipping blanks/sos."""
        chars = []
        for index in (ids.tolist() if isinstance(ids, Tensor) else ids):
            if index == self.eos:
                break
            if index >= len(self.specials):
                chars.append(self.itos[index])
        return "".join(chars)

    def batch_targets(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Padded ids ``B x L`` (0-padded, no sos/eos) and lengths ``B``."""
        encoded = [self.encode(text) for text in texts]
        lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
        targets = torch.zeros(len(encoded), int(lengths.max()) if encoded else 0, dtype=torch.long)
        for row, ids in enumerate(encoded):
            targets[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return targets, lengths


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions each cost 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_item in enumerate(reference, start=1):
        current = [i] + [0] * len(hypothesis)
        for j, hyp_item in enumerate(hypothesis, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_item != hyp_item))
        previous = current
    return previous[-1]


def error_counts(
    references: Sequence[str], hypotheses: Sequence[str], unit: str, language: str = "en"
) -> tuple[int, int]:
    """Summed edit distance and reference length over a corpus, in ``unit`` ``"char"`` or ``"word"``, of the
    :func:`normalize_transcript` (in ``language``) texts."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = total = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref, hyp = normalize_transcript(ref, language), normalize_transcript(hyp, language)
        ref_units, hyp_units = (list(ref), list(hyp)) if unit == "char" else (ref.split(), hyp.split())
        errors += edit_distance(ref_units, hyp_units)
        total += len(ref_units)
    return errors, total


def cer(references: Sequence[str], hypotheses: Sequence[str], language: str = "en") -> float:
    """Corpus character error rate: total character edits / total reference characters (spaces included).

    Characters are NFC code points, as in ``jiwer.cer``; this is the usual metric for Mandarin and other
    scripts written without spaces.
    """
    errors, total = error_counts(references, hypotheses, "char", language)
    return errors / max(total, 1)


def wer(references: Sequence[str], hypotheses: Sequence[str], language: str = "en") -> float:
    """Corpus word error rate: total word edits / total reference words.

    Words are whitespace-separated, as in ``jiwer.wer``: in unsegmented text (Chinese, Japanese, Thai) a whole
    run between spaces counts as one word, so use :func:`cer` there.
    """
    errors, total = error_counts(references, hypotheses, "word", language)
    return errors / max(total, 1)


def sentence_cer(reference: str, hypothesis: str, language: str = "en") -> float:
    """CER of one sentence (used to filter a teacher's outputs)."""
    return cer([reference], [hypothesis], language)


def pad_ids(rows: Sequence[Sequence[int]], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Integer rows of varying length -> int64 ``B x N`` (0-padded) and bool mask ``B x N``."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    ids = torch.zeros(len(rows), int(lengths.max()) if len(rows) else 0, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    return ids.to(device), mask.to(device)


def texts_to_codepoints(texts: Sequence[str], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Texts as Unicode code points, int64 ``B x N`` + bool mask: a tensor form of any text that a cache can store."""
    return pad_ids([[ord(char) for char in text] for text in texts], device)


def codepoints_to_texts(codepoints: Tensor, mask: Tensor) -> list[str]:
    """The inverse of :func:`texts_to_codepoints`."""
    return ["".join(map(chr, row[valid].tolist())) for row, valid in zip(codepoints, mask.bool(), strict=True)]


def identity_char_tokens(mask: Tensor) -> Tensor:
    """The character -> token map of a character-level decoder (token ``i`` is character ``i``), 0 at padding."""
    return torch.arange(mask.shape[1], device=mask.device)[None, :] * mask.long()


def decoder_targets(vocab: CharVocab, texts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forcing inputs and next-character targets of an attention decoder.

    Args:
        vocab: the character vocabulary. texts: ``B`` transcripts (normalised here again).

    Returns:
        ``inputs`` long ``B x (L+1)`` (``<sos>`` then the characters, 0-padded), ``targets`` long ``B x (L+1)``
        (the characters then ``<eos>``, padded with -100, the cross-entropy ignore index) and ``lengths`` ``B``
        (characters, without ``<eos>``); ``L`` is the longest encoding in the batch.
    """
    chars, lengths = vocab.batch_targets(texts)
    b = chars.shape[0]
    inputs = torch.cat([torch.full((b, 1), vocab.sos, dtype=torch.long), chars], dim=1)
    targets = torch.cat([chars, torch.zeros(b, 1, dtype=torch.long)], dim=1)
    rows = torch.arange(b)
    targets[rows, lengths] = vocab.eos
    positions = torch.arange(targets.shape[1])[None, :]
    targets[positions > lengths[:, None]] = -100
    return inputs, targets, lengths


class TranscriptModality(Modality):
    """Decode ``txt`` to ``transcript`` (:func:`normalize_transcript` applied) and collate to ``list[str]``.

    Nothing happens on the device: the batch field stays a list of strings.
    """

    name = "transcript"
    fields = ("transcript",)

    def __init__(self, field: str = "txt", language: str = "en") -> None:
        self.field = field
        self.language = language

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        data = sample[self.field]
        text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
        return {"transcript": normalize_transcript(text, self.language)}

    def collate(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        return {"transcript": [item["transcript"] for item in items]}

    def on_device(self, batch: Batch, train: bool) -> Batch:
        return batch

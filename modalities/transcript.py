"""Transcripts for speech and lip reading: normalisation, a character vocabulary, and CER/WER.

Batch field: ``transcript`` (``list[str]``, one normalised sentence per sample). Every recognizer in xmodal
(a lip reader, a from-scratch ASR, Whisper's decoded text) is scored on :func:`normalize_transcript` output, so
"Place blue at F 2 now." and "place blue at f two now" count as the same sentence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from xmodal.contracts import Batch, Modality

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_NON_WORD = re.compile(r"[^a-z0-9' ]+")


def normalize_transcript(text: str) -> str:
    """Lowercase, drop punctuation, write each digit as a word, collapse whitespace.

    Example: ``"Bin blue at F2, now."`` -> ``"bin blue at f two now"``.
    """
    text = _NON_WORD.sub(" ", text.lower().replace("-", " "))
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
        """Character ids of ``normalize_transcript(text)`` (no sos/eos)."""
        return [self.stoi[c] for c in normalize_transcript(text)]

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


def error_counts(references: Sequence[str], hypotheses: Sequence[str], unit: str) -> tuple[int, int]:
    """Summed edit distance and reference length over a corpus, in ``unit`` ``"char"`` or ``"word"``."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = total = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref, hyp = normalize_transcript(ref), normalize_transcript(hyp)
        ref_units, hyp_units = (list(ref), list(hyp)) if unit == "char" else (ref.split(), hyp.split())
        errors += edit_distance(ref_units, hyp_units)
        total += len(ref_units)
    return errors, total


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus character error rate: total character edits / total reference characters (spaces included)."""
    errors, total = error_counts(references, hypotheses, "char")
    return errors / max(total, 1)


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate: total word edits / total reference words."""
    errors, total = error_counts(references, hypotheses, "word")
    return errors / max(total, 1)


def sentence_cer(reference: str, hypothesis: str) -> float:
    """CER of one sentence (used to filter a teacher's outputs)."""
    return cer([reference], [hypothesis])


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

    def __init__(self, field: str = "txt") -> None:
        self.field = field

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        data = sample[self.field]
        text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
        return {"transcript": normalize_transcript(text)}

    def collate(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        return {"transcript": [item["transcript"] for item in items]}

    def on_device(self, batch: Batch, train: bool) -> Batch:
        return batch

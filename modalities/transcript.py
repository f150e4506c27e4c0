"""Transcripts for speech and lip reading: normalisation, a character vocabulary, and CER/WER.

Batch field: ``transcript`` (``list[str]``, one normalised sentence per sample). Every recognizer in xmodal
(a lip reader, a from-scratch ASR, Whisper's decoded text) is scored on :func:`normalize_transcript` output, so
"Place blue at F 2 now." and "place blue at f two now" count as the same sentence.

Normalisation is Unicode-aware: letters, digits and combining marks of every script are kept (NFC, casefolded),
so Cyrillic, Chinese or "café" (composed or decomposed) survive; only English spells digits as words.

The character vocabulary (:class:`CharVocab`) is English ``a-z`` unless a recipe names another
(:data:`VocabularySpec`, read by :func:`load_vocabulary`): a list of characters, a file, or a corpus folder whose
``vocabulary.json`` (:func:`corpus_vocabulary`, written by ``xmodal data convert cmlr``) lists the characters of
its train split, most frequent first.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
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


ENGLISH_CHARS = " 'abcdefghijklmnopqrstuvwxyz"
VOCABULARY_FILE = "vocabulary.json"
# None (English a-z), a list of characters, {"chars": [...], "language": ...} (a vocabulary.json's content), or the
# path of a vocabulary file (.json, or text with one character a line) or of a folder holding vocabulary.json.
VocabularySpec = str | Sequence[str] | Mapping[str, Any] | None


class CharVocab:
    """Characters (default ``a-z``, space and apostrophe), plus ``<blank>`` (0, also padding), ``<sos>``, ``<eos>``.

    Index 0 doubles as the CTC blank and the padding value of target tensors. ``language`` is the one transcripts
    are normalised in before encoding (:func:`normalize_transcript`).

    Raises:
        ValueError: an entry that is not one character, a repeated character, or one that normalisation never
            produces (an upper-case letter, punctuation, an English digit).
    """

    specials = ("<blank>", "<sos>", "<eos>")

    def __init__(self, chars: str | Sequence[str] = ENGLISH_CHARS, language: str = "en") -> None:
        chars = list(chars)
        unusable = [c for c in chars if len(c) != 1 or (c != " " and normalize_transcript(c, language) != c)]
        if unusable:
            raise ValueError(f"vocabulary entries must be single characters that normalised {language!r} "
                             f"transcripts hold, got {unusable[:5]!r}")
        repeated = sorted(c for c, n in Counter(chars).items() if n > 1)
        if repeated:
            raise ValueError(f"vocabulary characters repeated: {repeated[:5]!r}")
        self.chars, self.language = chars, language
        self.itos = list(self.specials) + chars
        self.stoi = {token: index for index, token in enumerate(self.itos)}
        self.blank, self.sos, self.eos = 0, 1, 2

    @property
    def is_default(self) -> bool:
        """Whether this is the English ``a-z`` vocabulary that :class:`CharVocab` builds without arguments."""
        return self.chars == list(ENGLISH_CHARS) and self.language == "en"

    def to_json(self) -> dict[str, Any]:
        """``{"chars", "language"}``: a :data:`VocabularySpec` that rebuilds this vocabulary."""
        return {"chars": list(self.chars), "language": self.language}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Character ids of ``normalize_transcript(text, language)`` (no sos/eos); characters outside the
        vocabulary (e.g. "é" or Cyrillic with the default English one) are skipped."""
        return [self.stoi[c] for c in normalize_transcript(text, self.language) if c in self.stoi]

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


def load_vocabulary(spec: VocabularySpec | CharVocab = None) -> CharVocab:
    """The :class:`CharVocab` a recipe names (:data:`VocabularySpec`); ``None``: English ``a-z``.

    Raises:
        FileNotFoundError: a path that is neither a vocabulary file nor a folder holding ``vocabulary.json``.
        ValueError: a malformed file or unusable characters (see :class:`CharVocab`).
    """
    if spec is None or isinstance(spec, CharVocab):
        return spec or CharVocab()
    if isinstance(spec, str | Path):
        return read_vocabulary(Path(spec))
    if isinstance(spec, Mapping):
        if "chars" not in spec:
            raise ValueError(f"a vocabulary mapping needs 'chars' (and optionally 'language'), got {sorted(spec)}")
        return CharVocab(spec["chars"], spec.get("language", "en"))
    return CharVocab(spec)


def read_vocabulary(path: Path) -> CharVocab:
    """A vocabulary file: JSON (a list of characters, or :func:`corpus_vocabulary`'s object) or text with one
    character a line; a folder stands for its ``vocabulary.json``."""
    file = path / VOCABULARY_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no vocabulary file (a .json or one-character-a-line text file, or a "
                                f"converted corpus folder with {VOCABULARY_FILE})")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() != ".json":
        return CharVocab([line for line in text.splitlines() if line])
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(data, list | dict):
        raise ValueError(f"{file}: expected a list of characters or an object with 'chars'")
    try:
        return load_vocabulary(data)
    except ValueError as error:
        raise ValueError(f"{file}: {error}") from error


def corpus_vocabulary(texts: Iterable[str], language: str) -> dict[str, Any]:
    """The ``vocabulary.json`` of a corpus: every character of its :func:`normalize_transcript`-ed ``texts``, most
    frequent first (ties in code-point order), with ``counts`` and the number of ``transcripts``."""
    normalized = [normalize_transcript(text, language) for text in texts]
    counts = Counter(char for text in normalized for char in text)
    chars = sorted(counts, key=lambda char: (-counts[char], char))
    return {"language": language, "chars": chars, "counts": {c: counts[c] for c in chars},
            "transcripts": len(normalized)}


def check_targets(vocab: CharVocab, texts: Sequence[str], lengths: Tensor, classes: int, where: str) -> None:
    """Fail loudly where a character loss would silently learn nothing: logits over ``classes`` that are not
    ``vocab``'s, or transcripts with none of its characters (Chinese text against the English ``a-z``).

    Args:
        texts: the batch's transcripts. lengths: ``B`` encoded lengths (:meth:`CharVocab.batch_targets`).
        where: the loss, for the message.
    """
    if classes != len(vocab):
        raise ValueError(f"{where}: logits over {classes} classes but the vocabulary has {len(vocab)}: give the "
                         "loss the student's `vocabulary`")
    if int(lengths.sum()) == 0 and any(texts):
        raise ValueError(f"{where}: no character of the batch's transcripts (e.g. {texts[0][:20]!r}) is in the "
                         f"vocabulary ({''.join(vocab.chars[:30])!r}...): name the corpus's `vocabulary` in the "
                         "recipe (student, losses and TranscriptModality)")


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

    Args:
        field: the sample's text field. language: of the normalisation (``None``: the vocabulary's).
        vocabulary: the recipe's character vocabulary (:data:`VocabularySpec`; ``None``: English ``a-z``), the
            same one its student and character losses are given; ``vocab`` holds it.
    """

    name = "transcript"
    fields = ("transcript",)

    def __init__(self, field: str = "txt", language: str | None = None, vocabulary: VocabularySpec = None) -> None:
        self.field = field
        self.vocab = load_vocabulary(vocabulary)
        self.language = language or self.vocab.language

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        data = sample[self.field]
        text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
        return {"transcript": normalize_transcript(text, self.language)}

    def collate(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        return {"transcript": [item["transcript"] for item in items]}

    def on_device(self, batch: Batch, train: bool) -> Batch:
        return batch

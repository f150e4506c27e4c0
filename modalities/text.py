"""Text modality: captions travel as strings; every model tokenizes with its own tokenizer.

Keeping raw strings in the batch is what lets a teacher and a student use different tokenizers (the
FIXME in open_clip's distillation task assumes they share one). Tokenizers are open_clip-compatible
callables ``list[str] -> LongTensor[B, context_length]``:

* an open_clip model name (``"ViT-B-32"``) gives open_clip's tokenizer for it;
* a folder with ``tokenizer.json`` gives a Hugging Face tokenizer, loaded offline;
* :func:`build_word_tokenizer` writes such a folder for a closed vocabulary (the offline corpora).

Tokenizing in the training step costs a GPU run dearly (measured: about two thirds of a small CLIP pair's step on an
H100 went to the student's and the teacher's tokenizers). So :class:`TextModality` can also tokenize in the loader
workers: ``TextModality(tokenizers=[...])`` adds ``tokens:<name>`` for each named tokenizer, and models read it
through :func:`tokens_for` when it matches their own tokenizer's name, falling back to tokenizing the strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from xmodal.contracts import Batch, Modality

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
TOKENS_PREFIX = "tokens:"
WORD_PATTERN = re.compile(r"[a-z0-9]+")


class Tokenizer(Protocol):
    context_length: int

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> Tensor: ...


class TextModality(Modality):
    """Decode ``txt`` (or a ``json`` field's ``caption``) to the ``caption`` string.

    Args:
        tokenizers: tokenizer names (as the models name them: a tokenizer folder, an open_clip model name or
            ``local-dir:<folder>``) to run in the loader workers; each adds ``tokens:<name>`` (``B x L`` int64).
    """

    name = "text"
    fields = ("caption",)

    def __init__(self, tokenizers: Sequence[str] = ()) -> None:
        self.tokenizer_names = list(tokenizers)
        self._tokenizers: dict[str, Tokenizer] | None = None  # loaded in the process that collates

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizers": None}

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        if "txt" in sample:
            text = sample["txt"]
            return {"caption": text.decode("utf-8") if isinstance(text, bytes) else str(text)}
        raise KeyError(f"sample {sample.get('__key__')!r} has no txt field")

    def collate(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        captions = [item["caption"] for item in items]
        batch: Batch = {"caption": captions}
        if self.tokenizer_names:
            if self._tokenizers is None:
                self._tokenizers = {name: load_tokenizer(name) for name in self.tokenizer_names}
            for name, tokenizer in self._tokenizers.items():
                batch[TOKENS_PREFIX + name] = tokenizer(captions)
        return batch

    def on_device(self, batch: Batch, train: bool) -> Batch:
        return batch


def words(text: str) -> list[str]:
    return WORD_PATTERN.findall(text.lower())


def build_word_tokenizer(texts: Iterable[str], out_dir: str | Path, context_length: int = 16) -> Path:
    """Write a word-level Hugging Face tokenizer covering ``texts`` to ``out_dir``.

    Ids: 0 pad, 1 unknown, 2 begin, 3 end, then words in sorted order. Sequences are ``[BOS] words [EOS]``,
    so an open_clip text tower pools with ``pool_type="eos", eos_id=3, pad_id=0``.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab_words = sorted({w for text in texts for w in words(text)})
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS, *vocab_words])}
    raw = RawTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    raw.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        model_max_length=context_length,
    )
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def load_tokenizer(name_or_path: str, context_length: int | None = None) -> Tokenizer:
    """An open_clip-style tokenizer from a tokenizer folder or an open_clip model name (both offline)."""
    import open_clip

    path = Path(name_or_path)
    if name_or_path.startswith("local-dir:"):
        return open_clip.get_tokenizer(name_or_path, context_length=context_length)
    if (path / "tokenizer.json").is_file():
        from open_clip.tokenizer import HFTokenizer

        tokenizer: Tokenizer = HFTokenizer(str(path), context_length=context_length or 16, clean="canonicalize")
        return tokenizer
    if path.exists() or "/" in name_or_path:
        raise FileNotFoundError(f"tokenizer {name_or_path!r}: no tokenizer.json there")
    return open_clip.get_tokenizer(name_or_path, context_length=context_length)


def vocab_size(name_or_path: str) -> int:
    path = Path(name_or_path)
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return len(PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json")))
    return 49408


class TokenMismatchError(ValueError):
    """Tokens made in the loader differ from what the model's own tokenizer makes of the same captions."""


def tokens_for(batch: Batch, name: str, tokenizer: Tokenizer, device: torch.device | str) -> Tensor:
    """The batch's captions as ``tokenizer`` (called ``name``) tokenizes them, on ``device``.

    Uses the loader's ``tokens:<name>`` when present (checked once per tokenizer object against tokenizing the
    first captions here, so that a different context length or vocabulary cannot pass silently), else tokenizes.
    """
    made = batch.get(TOKENS_PREFIX + name)
    if made is None:
        return tokenizer(list(batch["caption"])).to(device, non_blocking=True)
    if not getattr(tokenizer, "_xmodal_tokens_checked", False):
        own = tokenizer(list(batch["caption"][:4]))
        if own.shape[1:] != made.shape[1:] or not torch.equal(own.cpu(), made[: len(own)].cpu()):
            raise TokenMismatchError(
                f"the loader's {TOKENS_PREFIX}{name} tokens (shape {tuple(made.shape)}) differ from the model's "
                f"own tokenization (shape {tuple(own.shape)}): give TextModality(tokenizers=...) the tokenizer the "
                "model uses, with the same context length, or drop it there")
        tokenizer._xmodal_tokens_checked = True  # type: ignore[attr-defined]
    return made.to(device, non_blocking=True)

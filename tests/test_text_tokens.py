"""Captions tokenized in the loader workers give the same outputs as tokenizing in the model, or a clear error."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_clip_args
from xmodal.modalities.text import TOKENS_PREFIX, TextModality, TokenMismatchError, load_tokenizer
from xmodal.students.clip import CLIPStudent, save_open_clip_dir
from xmodal.teachers.open_clip import OpenCLIPTeacher

CAPTIONS = ["a photo of a red circle", "a photo of a blue square", "a small green triangle", "a red square"]


def batch_from(modality: TextModality) -> dict:
    return modality.collate([{"caption": c} for c in CAPTIONS])


def test_loader_tokens_equal_the_models_own(shapes_dir: Path, tmp_path: Path) -> None:
    tokenizer_dir = str(shapes_dir / "tokenizer")
    torch.manual_seed(0)
    student = CLIPStudent(**tiny_clip_args(tokenizer_dir)).eval()
    teacher_dir = save_open_clip_dir(student, tmp_path / "teacher")
    teacher = OpenCLIPTeacher(f"local-dir:{teacher_dir}")
    modality = TextModality(tokenizers=[tokenizer_dir, f"local-dir:{teacher_dir}"])
    made = batch_from(modality)
    assert torch.equal(made[TOKENS_PREFIX + tokenizer_dir], load_tokenizer(tokenizer_dir)(CAPTIONS))
    plain = TextModality().collate([{"caption": c} for c in CAPTIONS])
    assert set(plain) == {"caption"}
    with torch.no_grad():
        assert torch.allclose(student(made)["text.emb"], student(plain)["text.emb"])
        assert torch.allclose(teacher(made)["text.emb"], teacher(plain)["text.emb"])
    restored = pickle.loads(pickle.dumps(modality))  # workers get the names, and load the tokenizers themselves
    assert restored._tokenizers is None and torch.equal(batch_from(restored)[TOKENS_PREFIX + tokenizer_dir],
                                                        made[TOKENS_PREFIX + tokenizer_dir])


def test_tokens_from_another_context_length_are_refused(shapes_dir: Path) -> None:
    tokenizer_dir = str(shapes_dir / "tokenizer")
    student = CLIPStudent(**tiny_clip_args(tokenizer_dir))
    made = {"caption": CAPTIONS, TOKENS_PREFIX + tokenizer_dir: load_tokenizer(tokenizer_dir, 8)(CAPTIONS)}
    with pytest.raises(TokenMismatchError, match="context length"):
        student(made)

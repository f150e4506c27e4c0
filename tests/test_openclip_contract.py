"""open_clip's contract on our CLIP models: ``encode_image`` takes ``preprocess``-ed images and ``encode_text`` token
ids, as open_clip's do; ``embed_images``/``embed_texts`` take raw images and strings; ``create_model`` returns eval
mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import tiny_clip_args
from xmodal.students.clip import CLIPStudent
from xmodal.zoo import create_model, save_pretrained

CAPTIONS = ["a red circle", "a blue square", "a green triangle"]


def pictures(n: int = 3, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_encode_image_of_preprocess_equals_embed_images_of_raw_pixels(shapes_dir: Path) -> None:
    torch.manual_seed(0)
    model = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer")).eval()
    raw = pictures()
    preprocessed = torch.stack([model.preprocess(Image.fromarray(p)) for p in raw])
    with torch.no_grad():
        through_open_clip = model.encode_image(preprocessed, normalize=True)
        raw_entry = model.embed_images(torch.from_numpy(raw).permute(0, 3, 1, 2))  # uint8 B x 3 x H x W
        torch.testing.assert_close(through_open_clip, raw_entry)
        unnormalised = model.encode_image(preprocessed)  # open_clip's default: normalize=False
    torch.testing.assert_close(F.normalize(unnormalised, dim=-1), raw_entry)
    assert not torch.allclose(unnormalised.norm(dim=-1), torch.ones(len(raw)))


def test_encode_text_takes_the_tokenizers_ids(shapes_dir: Path) -> None:
    torch.manual_seed(0)
    model = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer")).eval()
    tokens = model.tokenizer(CAPTIONS)
    assert tokens.dtype == torch.long and tokens.shape[0] == len(CAPTIONS)
    with torch.no_grad():
        features = model.encode_text(tokens)
        torch.testing.assert_close(F.normalize(features, dim=-1), model.embed_texts(CAPTIONS))
        torch.testing.assert_close(model.encode_text(tokens, normalize=True), model.embed_texts(CAPTIONS))
    assert features.shape == (len(CAPTIONS), 16)


def test_create_model_returns_eval_mode(shapes_dir: Path, tmp_path: Path) -> None:
    model = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer"))
    assert model.training
    folder = save_pretrained(model, model.init_args, tmp_path / "ckpt")
    for pretrained in (True, False):
        loaded = create_model(str(folder), pretrained=pretrained)
        assert not loaded.training and not any(m.training for m in loaded.modules())

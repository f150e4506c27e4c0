"""The model zoo: checkpoint round trip by name and by path, checksum refusal, registry listing and errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import xmodal
from xmodal.modalities.text import build_word_tokenizer
from xmodal.students.clip import CLIPStudent
from xmodal.zoo import ChecksumError, create_model, list_models, model_card, register_model, save_pretrained

TEXTS = ["a red circle", "two blue squares"]


@pytest.fixture
def zoo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XMODAL_ZOO_DIR", str(tmp_path / "zoo"))
    return tmp_path / "zoo"


def tiny_init_args(tok_dir: Path) -> dict:
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {
            "context_length": 16,
            "width": 32,
            "heads": 2,
            "layers": 1,
            "pool_type": "eos",
            "eos_id": 3,
            "pad_id": 0,
        },
        "tokenizer": str(tok_dir),
    }


def save_tiny(tmp_path: Path, out: Path, name: str = "tiny") -> tuple[CLIPStudent, Path]:
    init_args = tiny_init_args(build_word_tokenizer(TEXTS, tmp_path / "tok"))
    model = CLIPStudent(**init_args)
    metrics = {"imagenet_top1": torch.tensor(0.25), "coco_i2t_R@1": 0.5}
    return model, save_pretrained(model, init_args, out, name=name, teacher="ViT-B-32/openai", metrics=metrics)


@torch.inference_mode()
def outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return model.encode_image(images), model.encode_text(TEXTS)


def test_round_trip_by_name_and_by_path_after_moving(tmp_path: Path, zoo_dir: Path) -> None:
    model, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json", "card.yaml", "tokenizer"}
    config = json.loads((ckpt / "config.json").read_text())
    assert config["class_path"] == "xmodal.students.clip.CLIPStudent"
    assert config["init_args"]["tokenizer"] == "tokenizer" and config["init_args"]["embed_dim"] == 16

    moved = Path(shutil.move(str(ckpt), str(tmp_path / "elsewhere" / "tiny-ckpt")))
    shutil.rmtree(tmp_path / "tok")  # the checkpoint must not depend on the original tokenizer folder
    card_file = register_model(moved, name="tiny-clip")
    assert card_file == zoo_dir / "tiny-clip.yaml" and "tiny-clip" in list_models()

    expected = outputs(model)
    for source in ("tiny-clip", str(moved), str(moved / "card.yaml")):
        loaded = create_model(source)
        assert isinstance(loaded, CLIPStudent)
        for got, want in zip(outputs(loaded), expected, strict=True):
            assert torch.equal(got, want), source


def test_model_card(tmp_path: Path, zoo_dir: Path) -> None:
    _, ckpt = save_tiny(tmp_path, tmp_path / "ckpt", name="tiny-v1")
    register_model(ckpt)  # name from the card
    card = model_card("tiny-v1")
    assert card["name"] == "tiny-v1" and card["teacher"] == "ViT-B-32/openai"
    assert card["metrics"] == {"imagenet_top1": 0.25, "coco_i2t_R@1": 0.5}
    assert card["class_path"] == "xmodal.students.clip.CLIPStudent" and card["bundled"] == ["tokenizer"]
    assert card["checkpoint"] == "model.safetensors" and len(card["sha256"]) == 64 and card["created"]
    assert Path(card["root"]) == ckpt.resolve()


def test_pretrained_false_and_overrides(tmp_path: Path, zoo_dir: Path) -> None:
    model, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    fresh = create_model(str(ckpt), pretrained=False)
    assert not torch.equal(fresh.model.visual.conv1.weight, model.model.visual.conv1.weight)
    wider = create_model(str(ckpt), pretrained=False, embed_dim=8)
    assert outputs(wider)[0].shape == (2, 8)


def test_sha256_mismatch_is_refused(tmp_path: Path, zoo_dir: Path) -> None:
    _, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of tensor data
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"sha256 mismatch for .*model\.safetensors: expected [0-9a-f]{64}, got"):
        create_model(str(ckpt))
    create_model(str(ckpt), pretrained=False)  # the architecture alone does not read the weights


def test_unknown_name_lists_available(tmp_path: Path, zoo_dir: Path) -> None:
    _, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    register_model(ckpt, name="tiny-clip")
    with pytest.raises(ValueError, match=r"unknown model 'tiny-clop'; available: .*tiny-clip"):
        create_model("tiny-clop")
    with pytest.raises(FileNotFoundError, match="no card.yaml"):
        create_model(str(tmp_path))  # a folder that is not a checkpoint
    with pytest.raises(ValueError, match="model name"):
        register_model(ckpt, name="../escape")


def test_list_models_filter(tmp_path: Path, zoo_dir: Path) -> None:
    _, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    for name in ("tiny-clip", "tiny-clip-b", "lipreader-s"):
        register_model(ckpt, name=name)
    assert {"tiny-clip", "tiny-clip-b", "lipreader-s"} <= set(list_models())
    assert list_models("tiny-*") == ["tiny-clip", "tiny-clip-b"]
    assert list_models("*-s") == ["lipreader-s"]
    assert list_models("nothing*") == []
    assert yaml.safe_load((zoo_dir / "tiny-clip-b.yaml").read_text())["name"] == "tiny-clip-b"


def test_top_level_exports_and_cheap_import() -> None:
    assert xmodal.create_model is create_model and xmodal.list_models is list_models
    assert xmodal.register_model is register_model
    code = "import sys, xmodal; assert 'torch' not in sys.modules, 'import xmodal pulled in torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_save_pretrained_handles_a_buffer_that_views_part_of_its_storage(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from xmodal.zoo.registry import save_pretrained

    model = nn.Linear(3, 2)
    model.register_buffer("window", torch.arange(5.0)[:4])  # like torch.hann_window: a view of a longer storage
    save_pretrained(model, {"in_features": 3, "out_features": 2}, tmp_path / "m")
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "m" / "model.safetensors"))["window"], torch.arange(4.0))

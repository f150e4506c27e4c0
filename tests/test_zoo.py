"""The model zoo: checkpoint round trip by name and by path, checksum refusal, registry listing and errors,
and hostile cards (code-running class paths, tampered cards) refused before anything runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import xmodal
from xmodal.modalities.text import build_word_tokenizer
from xmodal.students.clip import CLIPStudent
from xmodal.zoo import (
    ChecksumError,
    UntrustedCardError,
    create_model,
    list_models,
    model_card,
    register_model,
    save_pretrained,
)
from xmodal.zoo.registry import card_digest

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
    assert isinstance(model, CLIPStudent)
    model.eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return model.embed_images(images), model.embed_texts(TEXTS)


def test_round_trip_by_name_and_by_path_after_moving(tmp_path: Path, zoo_dir: Path) -> None:
    model, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json", "card.yaml", "README.md",
                                                 "tokenizer"}
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
    assert Path(card["root"]).parent == zoo_dir / "store"  # a copy: the folder may go


def test_pretrained_false_and_overrides(tmp_path: Path, zoo_dir: Path) -> None:
    model, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    fresh = create_model(str(ckpt), pretrained=False)
    assert isinstance(fresh, CLIPStudent)
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


def write_card(folder: Path, class_path: str, init_args: dict, seal: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    card: dict[str, Any] = {"name": "hostile", "class_path": class_path, "init_args": init_args, "bundled": [],
                            "checkpoint": None}
    if seal:  # a valid digest: the allow-list alone must refuse
        card["card_sha256"] = card_digest(card)
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    return folder


@pytest.mark.parametrize("pretrained", [True, False])
def test_hostile_class_paths_are_refused_before_anything_runs(tmp_path: Path, pretrained: bool) -> None:
    marker = tmp_path / "pwned"
    write_marker = f"open({str(marker)!r}, 'w').close()"
    hostile: dict[str, dict[str, Any]] = {
        "subprocess.check_call": {"args": [sys.executable, "-c", write_marker]},
        "os.system": {"command": f'{sys.executable} -c "{write_marker}"'},
        "builtins.eval": {"source": write_marker},
        "builtins.exec": {"source": write_marker},
        "xmodal_no_such_module.Model": {},  # refused by name: an ImportError would mean an import was tried
        "xmodal.modalities.text.build_word_tokenizer": {"texts": TEXTS, "out_dir": str(marker)},  # not a class
        "xmodal.zoo.registry.ChecksumError": {},  # a class, not an nn.Module
        "xmodal.__main__.main": {},
    }
    for i, (class_path, init_args) in enumerate(hostile.items()):
        folder = write_card(tmp_path / f"card{i}", class_path, init_args)
        with pytest.raises(UntrustedCardError, match=rf"^model card .*card{i}/card\.yaml.*{class_path!r}") as info:
            create_model(str(folder), pretrained=pretrained)
        assert "\n" not in str(info.value)
        assert not marker.exists(), class_path


def test_register_model_refuses_a_hostile_class_path(tmp_path: Path, zoo_dir: Path) -> None:
    folder = write_card(tmp_path / "ckpt", "subprocess.check_call", {"args": ["true"]})
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(UntrustedCardError, match="subprocess.check_call"):
        register_model(folder, name="hostile")
    assert not (zoo_dir / "hostile.yaml").exists()


def test_tampered_card_is_refused(tmp_path: Path, zoo_dir: Path) -> None:
    _, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    card = yaml.safe_load((ckpt / "card.yaml").read_text())
    assert card["card_sha256"] == card_digest(card)
    card["init_args"]["embed_dim"] = 8  # changed after saving
    (ckpt / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    for pretrained in (True, False):
        with pytest.raises(UntrustedCardError, match=r"card\.yaml .*does not match its card_sha256"):
            create_model(str(ckpt), pretrained=pretrained)
    with pytest.raises(UntrustedCardError, match="does not match its card_sha256"):
        register_model(ckpt, name="tampered")


def test_unsealed_card_is_refused_until_registered(tmp_path: Path, zoo_dir: Path) -> None:
    model, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    card = yaml.safe_load((ckpt / "card.yaml").read_text())
    del card["card_sha256"]  # as an older version saved it
    (ckpt / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    with pytest.raises(UntrustedCardError, match="records no card_sha256"):
        create_model(str(ckpt))
    register_model(ckpt, name="vouched")
    assert torch.equal(outputs(create_model("vouched"))[0], outputs(model)[0])


def test_tampered_weights_are_refused_before_the_model_is_built(
    tmp_path: Path, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(b"not the saved weights")

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before its weights were checked")

    monkeypatch.setattr(CLIPStudent, "__init__", built)
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        create_model(str(ckpt))


def test_plugin_classes_are_allowed_through_entry_points(
    tmp_path: Path, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.metadata

    package = tmp_path / "site" / "xmodal_test_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text("from torch import nn\n\nclass Tiny(nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    from xmodal_test_plugin.models import Tiny  # type: ignore[import-not-found]

    model = Tiny(3, 2)
    ckpt = save_pretrained(model, {"in_features": 3, "out_features": 2}, tmp_path / "ckpt")
    with pytest.raises(UntrustedCardError, match="xmodal_test_plugin.models.Tiny"):
        create_model(str(ckpt))  # not registered as a plug-in

    plugin = importlib.metadata.EntryPoint(name="test", value="xmodal_test_plugin", group="xmodal.plugins")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda **kw: [plugin] if kw.get("group") == "xmodal.plugins" else real(**kw)
    )
    loaded = create_model(str(ckpt))
    assert isinstance(loaded, Tiny) and torch.equal(loaded.weight, model.weight)


TINY_ASR = {"dim": 16, "depth": 1, "heads": 2, "decoder_depth": 1, "kernel": 5, "max_chars": 64}


def test_a_card_naming_a_moved_class_loads_it_from_its_new_home(tmp_path: Path) -> None:
    from xmodal.modalities.speech_nets import ConformerASR
    from xmodal.zoo.moved import MovedClassWarning

    torch.manual_seed(0)
    model = ConformerASR(**TINY_ASR)
    folder = save_pretrained(model, TINY_ASR, tmp_path / "asr")
    card = yaml.safe_load((folder / "card.yaml").read_text())
    card["class_path"] = "xmodal.students.asr.ConformerASR"  # as exported before ConformerASR moved
    card["card_sha256"] = card_digest(card)
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    with pytest.warns(MovedClassWarning) as caught:
        # the architecture only: safetensors refuses to load torchaudio's shared window buffer (see save_pretrained)
        loaded = create_model(str(folder), pretrained=False)
    [warning] = caught
    message = str(warning.message)
    assert "xmodal.students.asr.ConformerASR moved to xmodal.modalities.speech_nets.ConformerASR" in message
    assert "\n" not in message
    assert type(loaded) is ConformerASR


def test_a_saved_recipe_naming_moved_classes_still_loads(tmp_path: Path) -> None:
    from xmodal.modalities.speech_nets import ConformerASR
    from xmodal.zoo.loading import load_distiller
    from xmodal.zoo.moved import MOVED, MovedClassWarning

    recipe = {"trainer": {"callbacks": [{"class_path": "xmodal.losses.mixspeech.MixSpeechSchedule"}]},
              "model": {"student": {"class_path": "xmodal.students.asr.ConformerASR", "init_args": TINY_ASR},
                        "losses": [{"class_path": "xmodal.students.asr.TokenCrossEntropyLoss",
                                    "init_args": {"student_key": ["audio.char_logits", "audio.frames_mask"]}}]}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(recipe))
    with pytest.warns(MovedClassWarning, match="TokenCrossEntropyLoss moved to xmodal.losses.logits"):
        distiller = load_distiller(config)
    assert type(distiller.student) is ConformerASR
    assert all(new.rpartition(".")[2] == old.rpartition(".")[2] for old, new in MOVED.items())

"""The zoo's store: registering copies a model's files under their content digest, a registered model whose folder
has gone says so, and ``hf://owner/name@revision`` resolves through the local Hugging Face cache (no network)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml

from tests.test_zoo import outputs, save_tiny
from xmodal.students.clip import CLIPStudent
from xmodal.zoo import ChecksumError, create_model, model_card, register_model, sha256_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XMODAL_ZOO_DIR", str(tmp_path / "zoo"))
    return tmp_path / "zoo"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def cache_repo(cache: Path, repo_id: str, folder: Path, revision: str) -> None:
    """Lay ``folder`` out as huggingface_hub caches a downloaded repository at ``revision``: files in ``blobs/``
    under their digest, linked from ``snapshots/<commit>/``, and ``refs/<revision>`` naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    for file in [f for f in folder.rglob("*") if f.is_file()]:
        blob = repo / "blobs" / sha256_file(file)
        shutil.copyfile(file, blob)
        link = repo / "snapshots" / COMMIT / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / revision).write_text(COMMIT)


def test_a_registered_model_outlives_its_folder(tmp_path: Path, zoo: Path) -> None:
    model, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    register_model(ckpt, name="tiny")
    shutil.rmtree(ckpt)

    stored = Path(model_card("tiny")["root"])
    assert stored.parent == zoo / "store" and len(stored.name) == 64  # named by the sha256 of its files
    assert {p.name for p in stored.iterdir()} == {"model.safetensors", "config.json", "card.yaml", "README.md",
                                                  "tokenizer"}
    for got, want in zip(outputs(create_model("tiny")), outputs(model), strict=True):
        assert torch.equal(got, want)


def test_registering_the_same_model_twice_stores_it_once(tmp_path: Path, zoo: Path) -> None:
    _, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    register_model(ckpt, name="first")
    register_model(ckpt, name="second")
    assert len(list((zoo / "store").iterdir())) == 1
    assert model_card("first")["root"] == model_card("second")["root"]


def test_weights_that_differ_from_their_card_are_not_stored(tmp_path: Path, zoo: Path) -> None:
    _, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ChecksumError, match="differs from the card's"):
        register_model(ckpt, name="tampered")
    assert not list((zoo / "store").iterdir()) and not (zoo / "tampered.yaml").exists()  # nothing half-stored


def test_same_weights_with_another_tokenizer_are_stored_apart(tmp_path: Path, zoo: Path) -> None:
    _, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    other = Path(shutil.copytree(ckpt, tmp_path / "other"))
    with open(other / "tokenizer" / "tokenizer_config.json", "a") as f:
        f.write("\n")
    register_model(ckpt, name="first")
    register_model(other, name="second")
    assert model_card("first")["root"] != model_card("second")["root"]


def test_a_registered_model_whose_folder_has_gone_says_folder_missing(tmp_path: Path, zoo: Path) -> None:
    _, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    register_model(ckpt, name="tiny")
    stored = Path(model_card("tiny")["root"])
    shutil.rmtree(stored)
    for pretrained in (True, False):
        with pytest.raises(FileNotFoundError, match=f"^folder missing: {stored} \\(registered as tiny\\)$"):
            create_model("tiny", pretrained=pretrained)


def test_a_card_registered_by_an_older_version_whose_folder_has_gone(tmp_path: Path, zoo: Path) -> None:
    _, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    card = yaml.safe_load((ckpt / "card.yaml").read_text())
    zoo.mkdir()
    (zoo / "old.yaml").write_text(yaml.safe_dump({**card, "root": str(ckpt)}))  # what register_model wrote before
    assert isinstance(create_model("old"), torch.nn.Module)
    shutil.rmtree(ckpt)
    with pytest.raises(FileNotFoundError, match=f"^folder missing: {ckpt} \\(registered as old\\)$"):
        create_model("old", pretrained=False)  # not "text_cfg pool_type 'eos' needs a tokenizer folder"


def test_a_hub_model_at_a_revision_loads_from_the_local_cache(tmp_path: Path, zoo: Path, hub_cache: Path) -> None:
    model, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    cache_repo(hub_cache, "someone/tiny-clip", ckpt, "v1")

    loaded = create_model("hf://someone/tiny-clip@v1")
    pinned = create_model(f"hf://someone/tiny-clip@{COMMIT}")
    through_mixin = CLIPStudent.from_pretrained("someone/tiny-clip", revision="v1", local_files_only=True)
    for got, also, mixed, want in zip(outputs(loaded), outputs(pinned), outputs(through_mixin), outputs(model),
                                      strict=True):
        assert torch.equal(got, want) and torch.equal(also, want) and torch.equal(mixed, want)

    register_model("hf://someone/tiny-clip@v1", name="from-hub")
    shutil.rmtree(hub_cache)
    assert model_card("from-hub")["source"] == "hf://someone/tiny-clip@v1"
    assert torch.equal(outputs(create_model("from-hub"))[0], outputs(model)[0])


def test_a_hub_model_not_in_the_cache_is_not_downloaded_unless_asked(tmp_path: Path, zoo: Path,
                                                                     hub_cache: Path) -> None:
    _, ckpt = save_tiny(tmp_path, tmp_path / "ckpt")
    cache_repo(hub_cache, "someone/tiny-clip", ckpt, "v1")
    with pytest.raises(FileNotFoundError, match="hf://someone/tiny-clip@v2 is not in the local Hugging Face cache; "
                                                "pass download=True"):
        create_model("hf://someone/tiny-clip@v2")
    with pytest.raises(ValueError, match="hf://<owner>/<name>"):
        create_model("hf://tiny-clip")

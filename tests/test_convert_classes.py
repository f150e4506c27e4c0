"""``xmodal data convert class-folders`` on a miniature ImageNet (``train/<wnid>/<wnid>_N.JPEG``,
``val/<wnid>/ILSVRC2012_val_N.JPEG``, ``LOC_synset_mapping.txt``): samples, side files, bad inputs, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import test_convert_data
from tests.test_convert_data import DATA, convert, fit_clip, jpeg, read_shards
from xmodal.eval.base2novel import read_split

clip_workspace = test_convert_data.clip_workspace

SYNSETS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
           "n01484850": "great white shark, white shark", "n01491361": "tiger shark, Galeocerdo cuvieri"}
VAL = {"n01440764": ["ILSVRC2012_val_00000293"], "n01443537": ["ILSVRC2012_val_00000236"],
       "n01484850": ["ILSVRC2012_val_00002338"], "n01491361": ["ILSVRC2012_val_00002922"]}


def make_imagenet(root: Path) -> Path:
    for k, wnid in enumerate(SYNSETS):
        for n in (10026 + k, 10029 + k):
            jpeg(root / "train" / wnid / f"{wnid}_{n}.JPEG", n)
        for name in VAL[wnid]:
            jpeg(root / "val" / wnid / f"{name}.JPEG", k)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{wnid} {name}\n" for wnid, name in SYNSETS.items()))
    return root


def test_imagenet_folders_with_a_synset_mapping(tmp_path: Path) -> None:
    src, out = make_imagenet(tmp_path / "imagenet"), tmp_path / "out"
    convert("class-folders", src, "--out", out, "--class-names", src / "LOC_synset_mapping.txt", "--workers", "1")
    train = read_shards(out, "train")
    assert [s["__key__"] for s in train][:3] == ["n01440764_n01440764_10026", "n01440764_n01440764_10029",
                                                 "n01443537_n01443537_10027"]
    assert json.loads(train[2]["json"]) == {"label": 1, "class_name": "goldfish, Carassius auratus",
                                            "class_folder": "n01443537", "image": "n01443537/n01443537_10027.JPEG"}
    assert train[2]["txt"] == b"a photo of a goldfish, Carassius auratus."
    assert train[2]["jpg"] == (src / "train" / "n01443537" / "n01443537_10027.JPEG").read_bytes()
    val = read_shards(out, "val")
    assert [json.loads(s["json"])["label"] for s in val] == [0, 1, 2, 3]
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"] == list(SYNSETS.values()) and classes["templates"][0] == "a photo of a {}."
    split = read_split(out / "split.json")
    assert split.classes == list(SYNSETS.values()) and (split.base, split.novel) == ([0, 1], [2, 3])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 8, "val": 4} and manifest["num_classes"] == 4
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_folder_names_json_names_and_templates(tmp_path: Path) -> None:
    src = make_imagenet(tmp_path / "imagenet")
    convert("class-folders", src, "--out", tmp_path / "plain", "--splits", "val", "--workers", "1")
    assert json.loads((tmp_path / "plain" / "classes.json").read_text())["classes"] == list(SYNSETS)
    assert not list((tmp_path / "plain").glob("train-*.tar"))

    names = tmp_path / "names.json"
    names.write_text(json.dumps({wnid: name.split(",")[0] for wnid, name in SYNSETS.items()}))
    convert("class-folders", src, "--out", tmp_path / "named", "--class-names", names, "--templates",
            "itap of a {}.", "a {} swimming.", "--workers", "1")
    assert read_shards(tmp_path / "named", "val")[3]["txt"] == b"itap of a tiger shark."
    assert json.loads((tmp_path / "named" / "classes.json").read_text())["templates"] == ["itap of a {}.",
                                                                                            "a {} swimming."]


@pytest.mark.parametrize("content, message", [
    ("n01440764 tench\n", "no class name for the folders n01443537, n01484850, n01491361"),
    ("n01440764 tench\nn01443537\n", ":2: expected '<class folder> <class name>'"),
])
def test_a_bad_class_names_file_stops_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                                                message: str) -> None:
    src = make_imagenet(tmp_path / "imagenet")
    names = tmp_path / "synsets.txt"
    names.write_text(content)
    with pytest.raises(SystemExit) as stop:
        convert("class-folders", src, "--out", tmp_path / "out", "--class-names", names)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"xmodal data convert class-folders: {names}") and message in error


def test_a_corrupt_image_is_skipped_and_counted(tmp_path: Path) -> None:
    src = make_imagenet(tmp_path / "imagenet")
    corrupt = src / "train" / "n01484850" / "n01484850_10028.JPEG"
    corrupt.write_bytes(b"<html>403 Forbidden</html>")
    convert("class-folders", src, "--out", tmp_path / "out", "--workers", "1")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 7 and manifest["skipped"] == {"corrupt image": 1}
    assert manifest["skipped_files"] == [{"split": "train", "file": str(corrupt), "reason": "corrupt image"}]


def test_converted_folders_train_the_clip_recipe_with_zero_shot_validation(
        clip_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_imagenet(clip_workspace / "imagenet")
    convert("class-folders", src, "--out", DATA, "--class-names", src / "LOC_synset_mapping.txt",
            "--context-length", "16", "--workers", "1")
    logged = fit_clip(monkeypatch)  # the recipe's ZeroShotTask reads the converted classes.json and the labels
    assert {"val/zeroshot_top1", "val/zeroshot_top5"} <= logged

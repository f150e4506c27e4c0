"""``xmodal eval``: the CLI gives the same numbers as the library functions, on shards, folders and caption files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.conftest import tiny_clip_args
from xmodal.commands.main import main
from xmodal.data.wds import make_pipeline
from xmodal.eval.loops import evaluate_retrieval, evaluate_retrieval_json, evaluate_zeroshot, evaluate_zeroshot_folder
from xmodal.eval.zeroshot import SIMPLE_TEMPLATES
from xmodal.modalities.image import ImageModality
from xmodal.modalities.text import TextModality
from xmodal.students.clip import CLIPStudent
from xmodal.zoo import create_model, save_pretrained

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 240)}


@pytest.fixture(scope="module")
def checkpoint(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer"))
    return save_pretrained(model, model.init_args, tmp_path_factory.mktemp("ckpt") / "tiny-clip")


def run_cli(args: list[str], out: Path) -> dict:
    main(["eval", *args, "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    return json.loads(out.read_text())


def shard_batches(pattern: str) -> Iterable[dict[str, Any]]:
    return make_pipeline(pattern, [ImageModality(16), TextModality()], 8, train=False)


def in_unit_interval(metrics: dict, keys: list[str]) -> bool:
    return all(0.0 <= metrics[k] <= 1.0 for k in keys)


def test_zeroshot_shards_match_library(checkpoint: Path, shapes_dir: Path, tmp_path: Path, capsys) -> None:
    pattern = str(shapes_dir / "test-*.tar")
    results = run_cli(["zeroshot", "--model", str(checkpoint), "--shards", pattern,
                       "--classes", str(shapes_dir / "classes.json")], tmp_path / "zs.json")
    printed = capsys.readouterr().out
    assert "top1" in printed and '"task": "zeroshot"' in printed
    assert results["task"] == "zeroshot" and results["image_size"] == 16  # the model's own input size
    metrics = results["metrics"]
    assert set(metrics) == {"top1", "top5", "n", "classes"} and metrics["n"] == 32
    assert in_unit_interval(metrics, ["top1", "top5"])

    meta = json.loads((shapes_dir / "classes.json").read_text())
    direct = evaluate_zeroshot(create_model(str(checkpoint)), shard_batches(pattern), meta["classes"],
                               meta["templates"], device="cpu")
    assert {k: metrics[k] for k in direct} == pytest.approx(direct)


def test_retrieval_shards_match_library(checkpoint: Path, shapes_dir: Path, tmp_path: Path) -> None:
    pattern = str(shapes_dir / "test-*.tar")
    metrics = run_cli(["retrieval", "--model", str(checkpoint), "--shards", pattern], tmp_path / "ret.json")["metrics"]
    recalls = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert set(metrics) == {*recalls, "n_images", "n_texts"} and metrics["n_images"] == 32
    assert in_unit_interval(metrics, recalls)
    direct = evaluate_retrieval(create_model(str(checkpoint)), shard_batches(pattern), device="cpu")
    assert metrics == pytest.approx(direct)


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 24)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name


def test_zeroshot_folder_match_library(checkpoint: Path, tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    for name, colour in COLOURS.items():
        write_png(root / f"dark_{name}" / "0.png", colour)
        write_png(root / f"dark_{name}" / "1.png", tuple(c // 2 for c in colour), (24, 18))
    results = run_cli(["zeroshot", "--model", str(checkpoint), "--folder", str(root)], tmp_path / "zs.json")
    metrics = results["metrics"]
    assert metrics["n"] == 6 and metrics["classes"] == 3 and in_unit_interval(metrics, ["top1", "top5"])
    direct = evaluate_zeroshot_folder(create_model(str(checkpoint)), root, SIMPLE_TEMPLATES, image_size=16,
                                      batch_size=8, device="cpu")
    assert metrics == pytest.approx(direct)

    names = tmp_path / "names.json"  # a JSON's class names replace folder names, its templates the default
    names.write_text(json.dumps({"classes": ["red", "green", "blue"], "templates": ["a {} square.", "{}"]}))
    renamed = run_cli(["zeroshot", "--model", str(checkpoint), "--folder", str(root), "--classes", str(names)],
                      tmp_path / "zs2.json")["metrics"]
    direct = evaluate_zeroshot_folder(create_model(str(checkpoint)), root, ["a {} square.", "{}"], image_size=16,
                                      batch_size=8, device="cpu", classnames=["red", "green", "blue"])
    assert renamed == pytest.approx(direct)


def write_karpathy(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "flickr"
    images = []
    for i, (name, colour) in enumerate(COLOURS.items()):
        split = "train" if i == 0 else "test"
        filename = write_png(root / "images" / f"{name}.png", colour)
        sentences = [{"raw": f"a {name} square."}, {"raw": f" a photo of a {name} circle "}]
        images.append({"filename": filename, "filepath": "images", "split": split, "sentences": sentences})
    captions = tmp_path / "dataset_flickr.json"
    captions.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return captions, root


def test_retrieval_karpathy_json_defaults_to_test_split(checkpoint: Path, tmp_path: Path) -> None:
    captions, root = write_karpathy(tmp_path)
    args = ["retrieval", "--model", str(checkpoint), "--captions-json", str(captions), "--image-root", str(root)]
    results = run_cli(args, tmp_path / "ret.json")
    assert results["dataset"].endswith("(test)")
    metrics = results["metrics"]
    assert metrics["n_images"] == 2 and metrics["n_texts"] == 4
    assert in_unit_interval(metrics, [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)])
    direct = evaluate_retrieval_json(create_model(str(checkpoint)), captions, root, 16, 8, "test", "cpu")
    assert metrics == pytest.approx(direct)
    everything = run_cli([*args, "--split", "all"], tmp_path / "all.json")["metrics"]
    assert everything["n_images"] == 3 and everything["n_texts"] == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["zeroshot", "--shards", "x-*.tar"], "--classes is required with --shards"),
        (["retrieval", "--captions-json", "c.json"], "--image-root is required"),
        (["zeroshot"], "one of the arguments --shards --folder is required"),
    ],
)
def test_missing_flags_are_named(checkpoint: Path, args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *args, "--model", str(checkpoint)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_model_and_missing_shards_are_clear_errors(checkpoint: Path, shapes_dir: Path, tmp_path: Path,
                                                       capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "retrieval", "--model", "no-such-model", "--shards", str(shapes_dir / "test-*.tar")])
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="nowhere-"):
        main(["eval", "retrieval", "--model", str(checkpoint), "--shards", str(tmp_path / "nowhere-*.tar")])

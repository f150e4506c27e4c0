"""``xmodal data convert``: the runner (shards, skips, manifest, resuming, workers), the command, and the
image-caption formats (COCO, Karpathy, CSV/TSV, img2dataset's output) on miniatures of their real layouts."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from tests.conftest import tiny_clip_args
from tests.test_configs import assert_one_finite_step, record_fits
from xmodal.commands.main import main
from xmodal.data.convert.base import Conversion, ConvertError, SkipSample, run_conversion
from xmodal.data.convert.registry import converters

ROOT = Path(__file__).resolve().parent.parent
CLIP_CONFIG = ROOT / "configs" / "tiny" / "clip_distill.yaml"


def jpeg(path: Path, seed: int, size: tuple[int, int] = (24, 20)) -> Path:
    """A small real JPEG (noise) at ``path``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


def read_shards(out: Path, split: str) -> list[dict[str, Any]]:
    shards = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
    return [sample for shard in shards for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False)]


def convert(*argv: str | Path) -> None:
    main(["data", "convert", *map(str, argv)])


# ------------------------------------------------------------------------------------------------------ the runner


def toy_sample(job: int) -> dict[str, Any]:
    if job % 7 == 3:
        raise SkipSample(f"/data/{job}.jpg", "missing image")
    return {"__key__": f"s{job:03d}", "txt": f"sample {job}", "json": {"label": job % 2}}


def toy(n: int, **options: Any) -> Conversion[int]:
    return Conversion("toy", {"train": list(range(n)), "val": list(range(n, n + 3))}, toy_sample,
                      lambda job: [Path(f"/data/{job}.jpg")], options)


def test_runner_writes_shards_of_fixed_jobs_and_counts_skips(tmp_path: Path) -> None:
    manifest = run_conversion(toy(10), tmp_path, workers=1, shard_size=4, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [f"train-00000{k}.tar" for k in range(3)] + [
        "val-000000.tar"]
    keys = [s["__key__"] for s in read_shards(tmp_path, "train")]
    assert keys == [f"s{j:03d}" for j in range(10) if j % 7 != 3]
    assert manifest["counts"] == {"train": 9, "val": 2} and manifest["jobs"] == {"train": 10, "val": 3}
    assert manifest["skipped"] == {"missing image": 2}
    assert [(e["split"], e["file"]) for e in manifest["skipped_files"]] == [("train", "/data/3.jpg"),
                                                                             ("val", "/data/10.jpg")]
    assert manifest["sources"]["files"] == 13 and len(manifest["sources"]["sha256"]) == 64
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["patterns"] == {"train": "train-{000000..000002}.tar", "val": "val-000000.tar"}
    assert meta["counts"] == manifest["counts"] and meta["corpus"] == "toy"


def test_runner_workers_write_the_same_bytes(tmp_path: Path) -> None:
    run_conversion(toy(40), tmp_path / "one", workers=1, shard_size=16, progress=False)
    run_conversion(toy(40), tmp_path / "two", workers=2, shard_size=16, progress=False)
    for shard in (tmp_path / "one").glob("*.tar"):
        assert shard.read_bytes() == (tmp_path / "two" / shard.name).read_bytes()


def shard_stamps(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}


def test_rerun_keeps_complete_shards_and_rewrites_only_what_changed(tmp_path: Path) -> None:
    run_conversion(toy(10), tmp_path, workers=1, shard_size=4, progress=False)
    first = shard_stamps(tmp_path)
    contents = {name: (tmp_path / name).read_bytes() for name in first}
    run_conversion(toy(10), tmp_path, workers=1, shard_size=4, progress=False)
    assert shard_stamps(tmp_path) == first, "a second run writes nothing new"

    (tmp_path / "train-000001.tar").unlink()
    manifest = run_conversion(toy(10), tmp_path, workers=1, shard_size=4, progress=False)
    again = shard_stamps(tmp_path)
    assert {name for name in first if again[name] != first[name]} == {"train-000001.tar"}
    assert (tmp_path / "train-000001.tar").read_bytes() == contents["train-000001.tar"]
    assert manifest["skipped"] == {"missing image": 2}, "kept shards keep their skip records"

    run_conversion(toy(6), tmp_path, workers=1, shard_size=4, progress=False)  # jobs of train-000001 changed
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert shard_stamps(tmp_path)["train-000000.tar"] == first["train-000000.tar"]
    assert [s["__key__"] for s in read_shards(tmp_path, "train")] == ["s000", "s001", "s002", "s004", "s005"]

    run_conversion(toy(6, option=1), tmp_path, workers=1, shard_size=4, progress=False)
    assert shard_stamps(tmp_path)["train-000000.tar"] != first["train-000000.tar"], "new options rewrite all"


FAIL_AT: list[int] = []  # jobs that fail as a crash would (not a skip), in the calling process (workers=1)


def crashing_sample(job: int) -> dict[str, Any]:
    if job in FAIL_AT:
        raise RuntimeError(f"killed at job {job}")
    return toy_sample(job)


def test_an_interrupted_run_keeps_the_shards_it_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conversion = Conversion("toy", {"train": list(range(10)), "val": [20, 21]}, crashing_sample, lambda job: [], {})
    run_conversion(conversion, tmp_path, workers=1, shard_size=4, progress=False)
    finished = shard_stamps(tmp_path)
    (tmp_path / "train-000001.tar").unlink()
    (tmp_path / "train-000002.tar").unlink()
    monkeypatch.setattr(__name__ + ".FAIL_AT", [9])
    with pytest.raises(RuntimeError, match="killed at job 9"):
        run_conversion(conversion, tmp_path, workers=1, shard_size=4, progress=False)
    assert not json.loads((tmp_path / "manifest.json").read_text())["complete"]
    stamps = shard_stamps(tmp_path)
    assert "train-000001.tar" in stamps and "train-000002.tar" not in stamps, "no partial shard, the finished kept"
    monkeypatch.setattr(__name__ + ".FAIL_AT", [])
    manifest = run_conversion(conversion, tmp_path, workers=1, shard_size=4, progress=False)
    assert manifest["complete"] and manifest["counts"] == {"train": 9, "val": 2}
    again = shard_stamps(tmp_path)
    assert {name for name in again if again[name] != stamps.get(name)} == {"train-000002.tar"}
    assert again["val-000000.tar"] == finished["val-000000.tar"]


def test_an_all_skipped_shard_is_written_empty(tmp_path: Path) -> None:
    conversion = Conversion("toy", {"train": [3, 10, 1]}, toy_sample, lambda job: [], {})
    manifest = run_conversion(conversion, tmp_path, workers=1, shard_size=2, progress=False)
    assert [r["samples"] for r in manifest["shards"]["train"]] == [0, 1]
    assert read_shards(tmp_path, "train")[0]["__key__"] == "s001"


def test_formats_are_listed_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert {"coco", "karpathy", "captions-csv", "class-folders", "librispeech"} <= set(converters())
    with pytest.raises(SystemExit):
        main(["data", "convert", "--help"])
    assert "coco" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------- COCO


def make_coco(root: Path) -> Path:
    """``root/annotations/captions_{train,val}2017.json`` and ``root/{train,val}2017/<12-digit id>.jpg``."""
    captions = {"train": {9: ["A dog on a sofa.", "a brown dog"], 25: ["Two cats sleep."], 30: ["a red bus"]},
                "val": {139: ["People in a kitchen."]}}
    for part, images in captions.items():
        annotations, note_id = [], 100
        for image_id, texts in images.items():
            jpeg(root / f"{part}2017" / f"{image_id:012d}.jpg", image_id)
            for text in texts:
                annotations.append({"image_id": image_id, "id": note_id, "caption": text})
                note_id += 1
        data = {"info": {"year": 2017}, "licenses": [],
                "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 20, "width": 24} for i in images],
                "annotations": annotations}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{part}2017.json").write_text(json.dumps(data))
    return root


def test_coco_captions(tmp_path: Path) -> None:
    src, out = make_coco(tmp_path / "coco"), tmp_path / "out"
    convert("coco", src, "--out", out, "--workers", "1", "--shard-size", "2")
    train = read_shards(out, "train")
    assert [s["__key__"] for s in train] == ["000000000009_0", "000000000009_1", "000000000025_0", "000000000030_0"]
    assert [s["txt"].decode() for s in train] == ["A dog on a sofa.", "a brown dog", "Two cats sleep.", "a red bus"]
    assert train[0]["jpg"] == (src / "train2017" / "000000000009.jpg").read_bytes()
    assert json.loads(train[1]["json"]) == {"caption": "a brown dog", "image": "000000000009.jpg", "image_id": 9,
                                            "caption_id": 101}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 4, "val": 1} and manifest["skipped"] == {}
    assert manifest["sources"]["files"] == 4 and manifest["options"]["captions"] == "each"
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_coco_first_caption_and_max_image_size(tmp_path: Path) -> None:
    src, out = make_coco(tmp_path / "coco"), tmp_path / "out"
    convert("coco", src, "--out", out, "--workers", "1", "--captions", "first", "--max-image-size", "10",
            "--no-tokenizer")
    train = read_shards(out, "train")
    assert [s["__key__"] for s in train] == ["000000000009_0", "000000000025_0", "000000000030_0"]
    assert Image.open(io.BytesIO(train[0]["jpg"])).size == (12, 10)
    assert not (out / "tokenizer").exists()


def test_missing_and_corrupt_images_are_skipped_counted_and_named(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    src, out = make_coco(tmp_path / "coco"), tmp_path / "out"
    (src / "train2017" / "000000000025.jpg").unlink()
    broken = src / "train2017" / "000000000030.jpg"
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])  # truncated JPEG
    convert("coco", src, "--out", out, "--workers", "1")
    printed = capsys.readouterr().err
    assert "skipped 2 samples: 1 corrupt image, 1 missing image" in printed
    assert f"  {broken}: corrupt image" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 2 and manifest["skipped"] == {"corrupt image": 1, "missing image": 1}
    assert {(e["file"], e["reason"]) for e in manifest["skipped_files"]} == {
        (str(src / "train2017" / "000000000025.jpg"), "missing image"), (str(broken), "corrupt image")}
    assert [s["__key__"] for s in read_shards(out, "train")] == ["000000000009_0", "000000000009_1"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"images": [{"id": 1}], "annotations": []}), "images[0] has no 'file_name'"),
    (json.dumps({"images": [], "annotations": [{"image_id": 5, "caption": "x"}]}), "names image_id 5"),
    (json.dumps({"annotations": []}), "the file has no 'images'"),
])
def test_a_malformed_annotation_file_stops_with_one_line_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str) -> None:
    src = make_coco(tmp_path / "coco")
    bad = src / "annotations" / "captions_val2017.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as stop:
        convert("coco", src, "--out", tmp_path / "out")
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"xmodal data convert coco: {bad}: ") and message in error and "\n" not in error


# ------------------------------------------------------------------------------------------------------- Karpathy


def make_karpathy(root: Path) -> Path:
    """``dataset_flickr30k.json`` (no ``filepath``) with images in ``root/flickr30k-images/``."""
    images = []
    for i, split in enumerate(["train", "train", "restval", "val", "test"]):
        name = f"{1000092795 + i}.jpg"
        jpeg(root / "flickr30k-images" / name, i)
        images.append({"filename": name, "imgid": i, "split": split, "sentids": [2 * i, 2 * i + 1],
                       "sentences": [{"raw": f"Caption {i} one.", "tokens": ["caption"], "imgid": i, "sentid": 2 * i},
                                     {"raw": f"Caption {i} two.", "tokens": ["caption"], "imgid": i,
                                      "sentid": 2 * i + 1}]})
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


def test_karpathy_splits_with_restval_in_train(tmp_path: Path) -> None:
    src, out = make_karpathy(tmp_path / "flickr"), tmp_path / "out"
    convert("karpathy", src, "--out", out, "--images", tmp_path / "flickr" / "flickr30k-images", "--workers", "1")
    train = read_shards(out, "train")
    assert len(train) == 6 and train[4]["__key__"] == "1000092797_0"
    assert json.loads(train[4]["json"])["split"] == "train"
    assert [s["txt"].decode() for s in read_shards(out, "test")] == ["Caption 4 one.", "Caption 4 two."]
    assert json.loads((out / "manifest.json").read_text())["counts"] == {"train": 6, "val": 2, "test": 2}

    convert("karpathy", src, "--out", tmp_path / "skip", "--images", tmp_path / "flickr" / "flickr30k-images",
            "--restval", "skip", "--captions", "first", "--workers", "1")
    assert json.loads((tmp_path / "skip" / "manifest.json").read_text())["counts"] == {"train": 2, "val": 1,
                                                                                       "test": 1}


def test_karpathy_coco_layout_joins_filepath(tmp_path: Path) -> None:
    jpeg(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg", 0)
    data = {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
                        "sentences": [{"raw": "A man riding a bike."}]}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    convert("karpathy", tmp_path / "dataset_coco.json", "--out", tmp_path / "out", "--workers", "1")
    [sample] = read_shards(tmp_path / "out", "test")
    assert json.loads(sample["json"])["image"] == "val2014/COCO_val2014_000000391895.jpg"


# ------------------------------------------------------------------------------------------------------------ CSV


def test_csv_and_tsv_of_paths_and_captions(tmp_path: Path) -> None:
    jpeg(tmp_path / "imgs" / "b.jpg", 1)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\nimgs/a.png\ta black square\nimgs/b.jpg\tnoise, mostly\n")
    convert("captions-csv", tmp_path / "pairs.tsv", "--out", tmp_path / "tsv", "--workers", "1")
    samples = read_shards(tmp_path / "tsv", "train")
    assert [s["__key__"] for s in samples] == ["000000000", "000000001"]
    assert "png" in samples[0] and samples[1]["txt"] == b"noise, mostly"

    (tmp_path / "pairs.csv").write_text('path,caption\nimgs/b.jpg,"one, two"\nimgs/gone.jpg,missing\nimgs/a.png,\n')
    convert("captions-csv", tmp_path / "pairs.csv", "--out", tmp_path / "csv", "--split", "val", "--workers", "1")
    manifest = json.loads((tmp_path / "csv" / "manifest.json").read_text())
    assert manifest["counts"] == {"val": 1} and manifest["skipped"] == {"empty caption": 1, "missing image": 1}
    assert read_shards(tmp_path / "csv", "val")[0]["txt"] == b"one, two"


def test_a_csv_without_the_columns_names_the_file_and_its_columns(tmp_path: Path) -> None:
    (tmp_path / "pairs.csv").write_text("url,alt\nx.jpg,a cat\n")
    [csv_format] = [c for c in converters().values() if c.name == "captions-csv"]
    args = _parse("captions-csv", tmp_path / "pairs.csv")
    with pytest.raises(ConvertError, match=r"pairs\.csv: no image path column .* \(its columns: url, alt\)"):
        csv_format.build(tmp_path / "pairs.csv", args)
    args.path_column = "url"
    with pytest.raises(ConvertError, match=r"no caption column 'caption' or 'title' or 'text'"):
        csv_format.build(tmp_path / "pairs.csv", args)


def _parse(name: str, src: Path) -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    converters()[name].add_arguments(parser)
    return parser.parse_args([])


# -------------------------------------------------------------------------------------------------------- training


DATA = Path("runs/data/shapes-tiny")  # where the tiny CLIP recipe reads its shards, tokenizer and classes
RETRIEVAL_ONLY = "--model.val_metrics=[{class_path: xmodal.eval.tasks.RetrievalTask}]"  # captions carry no labels


@pytest.fixture
def clip_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory for the tiny CLIP recipe, holding its teacher ``runs/tiny/clip_teacher``."""
    from xmodal.modalities.text import build_word_tokenizer
    from xmodal.students.clip import CLIPStudent, save_open_clip_dir

    monkeypatch.chdir(tmp_path)
    build_word_tokenizer(["a photo of a dog"], "runs/tiny/words", context_length=16)
    torch.manual_seed(0)
    save_open_clip_dir(CLIPStudent(**tiny_clip_args("runs/tiny/words")), "runs/tiny/clip_teacher")
    yield tmp_path


def fit_clip(monkeypatch: pytest.MonkeyPatch, *overrides: str) -> set[str]:
    """One ``fast_dev_run`` step (and a validation batch) of the tiny CLIP recipe on the shards in ``DATA``; the
    names of the metrics it logged."""
    trainers = record_fits(monkeypatch)
    main(["fit", "--config", str(CLIP_CONFIG), "--trainer.fast_dev_run=true", "--data.batch_size=2", *overrides])
    assert_one_finite_step(trainers)
    logged = set(trainers[0].callback_metrics)
    assert "val/i2t_R@1" in logged
    return logged


def test_converted_coco_trains_the_clip_recipe(clip_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_coco(clip_workspace / "coco")
    convert("coco", "coco", "--out", DATA, "--workers", "1", "--context-length", "16")
    fit_clip(monkeypatch, RETRIEVAL_ONLY)


def write_img2dataset_shard(path: Path, count: int, first: int = 0) -> None:
    """A shard as img2dataset writes one: ``{key}.jpg``, ``{key}.txt`` and ``{key}.json`` per sample, keys of
    nine digits (shard number then index), the json holding url, key, status, caption, sizes and exif."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for index in range(first, first + count):
            key = f"{index:09d}"
            image = io.BytesIO()
            Image.fromarray(np.random.default_rng(index).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                image, format="JPEG")
            caption = f"a photo of thing {index}"
            meta = {"url": f"https://example.com/{index}.jpg", "key": key, "status": "success", "error_message": None,
                    "width": 24, "height": 20, "original_width": 240, "original_height": 200, "exif": "{}",
                    "sha256": "0" * 64, "caption": caption}
            for extension, data in (("jpg", image.getvalue()), ("txt", caption.encode()),
                                    ("json", json.dumps(meta).encode())):
                member = tarfile.TarInfo(f"{key}.{extension}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def test_img2dataset_output_trains_as_it_is(clip_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xmodal.modalities.text import build_word_tokenizer

    laion = Path("laion")
    write_img2dataset_shard(laion / "00000.tar", 4)
    write_img2dataset_shard(laion / "00001.tar", 2, first=10000)
    (laion / "00000_stats.json").write_text(json.dumps({"count": 4, "successes": 4}))
    build_word_tokenizer([f"a photo of thing {i}" for i in range(4)], DATA / "tokenizer", context_length=16)
    fit_clip(monkeypatch, RETRIEVAL_ONLY, f"--data.train={laion}/00000.tar", f"--data.val={laion}/00001.tar")

"""``xmodal cache`` and ``write_shards`` never destroy their source or leave partial output: a cache into the folder
of its source is refused, shards appear only when complete, and corrupt samples are skipped and counted."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from torch import nn

from xmodal.commands.cache import cache_main
from xmodal.data.cache import cache_teacher
from xmodal.data.shards import shard_pattern, write_shards
from xmodal.modalities.image import ImageModality

N = 12
TRUNCATED, GARBAGE = 3, 9  # corrupt samples: a JPEG cut in half, random bytes as a PNG


class TinyTeacher(nn.Module):
    output_keys = ("image.embed",)

    def __init__(self, fail_after: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3 * 16 * 16, 4)
        self.fail_after = fail_after  # raise on this call (1-based); 0 never
        self.calls = 0

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.fail_after:
            raise RuntimeError("teacher failed")
        return {"image.embed": self.head(batch["image"].flatten(1))}

    def manifest(self) -> dict[str, Any]:
        return {"name": "tiny", "output_keys": list(self.output_keys)}


def jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def image_samples(n: int, corrupt: bool = False) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = [{"__key__": f"s{i:03d}", "jpg": jpeg_bytes(i), "txt": f"caption {i}"}
                                     for i in range(n)]
    if corrupt:
        samples[TRUNCATED]["jpg"] = samples[TRUNCATED]["jpg"][: len(samples[TRUNCATED]["jpg"]) // 2]
        samples[GARBAGE]["jpg"] = np.random.default_rng(1).bytes(300)
    return samples


def read_keys(pattern: str) -> list[str]:
    return [sample["__key__"] for sample in wds.WebDataset(pattern, shardshuffle=False, empty_check=False)]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_cache_refuses_an_output_folder_holding_its_source(tmp_path: Path) -> None:
    write_shards(image_samples(N), tmp_path, "train", max_count=4)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="train-000000.tar"):
        cache_teacher(TinyTeacher(), [ImageModality(16)], str(tmp_path / "train-*.tar"), tmp_path, batch_size=4)
    assert snapshot(tmp_path) == before


def test_cache_command_refuses_with_one_line_naming_the_source_shard(tmp_path: Path) -> None:
    write_shards(image_samples(N), tmp_path, "train", max_count=4)
    before = snapshot(tmp_path)
    config = {"teacher": {"class_path": f"{__name__}.TinyTeacher"},
              "modalities": [{"class_path": "ImageModality", "init_args": {"size": 16}}],
              "shards": str(tmp_path / "train-{000000..000002}.tar"), "out": str(tmp_path), "batch_size": 4}
    (tmp_path.parent / "cache.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        cache_main(["--config", str(tmp_path.parent / "cache.yaml")])
    message = str(exit_info.value.code)
    assert "\n" not in message and str(tmp_path / "train-000000.tar") in message
    assert snapshot(tmp_path) == before


def test_write_shards_may_read_its_source_from_the_folder_it_writes(tmp_path: Path) -> None:
    """Same prefix, fewer shards: the old shards are read to the end before any is replaced or removed."""
    write_shards(image_samples(N), tmp_path, "train", max_count=4)
    source = wds.WebDataset(str(tmp_path / "train-{000000..000002}.tar"), shardshuffle=False)
    lazy = ({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"} for sample in source)
    paths = write_shards(lazy, tmp_path, "train", max_count=8)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train-000001.tar"]
    assert read_keys(shard_pattern(paths)) == [f"s{i:03d}" for i in range(N)]


def test_write_shards_failure_keeps_the_previous_shards_and_leaves_nothing_partial(tmp_path: Path) -> None:
    write_shards(image_samples(N), tmp_path, "train", max_count=4, mtime=0.0)
    before = snapshot(tmp_path)

    def failing() -> Any:
        yield from image_samples(6)
        raise OSError("source went away")

    with pytest.raises(OSError, match="went away"):
        write_shards(failing(), tmp_path, "train", max_count=4)
    assert snapshot(tmp_path) == before


def test_write_shards_bytes_are_those_of_a_plain_shard_writer(tmp_path: Path) -> None:
    paths = write_shards(image_samples(N), tmp_path / "ours", "train", max_count=5, mtime=0.0)
    (tmp_path / "plain").mkdir()
    with wds.ShardWriter(str(tmp_path / "plain" / "train-%06d.tar"), maxcount=5, verbose=0, mtime=0.0) as sink:
        for sample in image_samples(N):
            sink.write(sample)
    assert [p.read_bytes() for p in paths] == [(tmp_path / "plain" / p.name).read_bytes() for p in paths]
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [p.name for p in paths]


def test_cache_skips_and_counts_corrupt_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_shards(image_samples(N, corrupt=True), tmp_path / "raw", "train", max_count=5)
    config = {"teacher": {"class_path": f"{__name__}.TinyTeacher"},
              "modalities": [{"class_path": "ImageModality", "init_args": {"size": 16}}],
              "shards": str(tmp_path / "raw" / "train-*.tar"), "out": str(tmp_path / "cache"), "batch_size": 4}
    (tmp_path / "cache.yaml").write_text(yaml.safe_dump(config))
    cache_main(["--config", str(tmp_path / "cache.yaml")])
    bad = [f"s{TRUNCATED:03d}", f"s{GARBAGE:03d}"]
    assert ", ".join(bad) in capsys.readouterr().err
    manifest = yaml.safe_load((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["count"] == N - 2 and manifest["skipped"] == 2 and manifest["skipped_keys"] == bad
    good = [f"s{i:03d}" for i in range(N) if i not in (TRUNCATED, GARBAGE)]
    assert read_keys(manifest["shards"]) == good
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_a_failed_cache_leaves_no_shard_and_no_manifest(tmp_path: Path) -> None:
    write_shards(image_samples(N), tmp_path / "raw", "train", max_count=4)
    with pytest.raises(RuntimeError, match="teacher failed"):
        cache_teacher(TinyTeacher(fail_after=3), [ImageModality(16)], str(tmp_path / "raw" / "train-*.tar"),
                      tmp_path / "cache", batch_size=2, shard_size=2)
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_counts_a_shard_that_breaks_mid_way(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_shards(image_samples(N), tmp_path / "raw", "train", max_count=4)
    broken = Path(paths[1])
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # copied half-way
    config = {"teacher": {"class_path": f"{__name__}.TinyTeacher"},
              "modalities": [{"class_path": "ImageModality", "init_args": {"size": 16}}],
              "shards": str(tmp_path / "raw" / "train-*.tar"), "out": str(tmp_path / "cache"), "batch_size": 4}
    (tmp_path / "cache.yaml").write_text(yaml.safe_dump(config))
    cache_main(["--config", str(tmp_path / "cache.yaml")])
    assert f"shard failed mid-way, the rest of it was not cached: {broken}" in capsys.readouterr().err
    manifest = yaml.safe_load((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["failed_shards"]) == 1 and str(broken) in manifest["failed_shards"][0]
    cached = read_keys(manifest["shards"])
    assert cached[:4] == ["s000", "s001", "s002", "s003"] and cached[-4:] == ["s008", "s009", "s010", "s011"]
    assert manifest["count"] == len(cached) < N

"""Shards that fail mid-way (truncated, or a member header declaring 8 GiB) are counted and reported, never lost
silently; evaluation on shards that yield no sample stops with a one-line error."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import tiny_clip_args
from tests.test_data import png_bytes
from xmodal.commands.main import main
from xmodal.data.shards import shard_pattern, write_shards
from xmodal.data.wds import LossTally, WdsDataModule
from xmodal.distiller import Distiller
from xmodal.losses import CLIPContrastiveLoss
from xmodal.modalities.image import ImageModality
from xmodal.modalities.text import TextModality
from xmodal.students.clip import CLIPStudent
from xmodal.zoo import save_pretrained

PER_SHARD, SHARDS = 16, 4


def member_offsets(shard: Path) -> list[int]:
    with tarfile.open(shard) as tar:
        return [info.offset for info in tar.getmembers()]


def damaged_shards(out: Path) -> tuple[str, list[Path], int]:
    """4 shards of 16 samples (png + txt): #0 intact, #1 cut mid-way through a member's data, #2 with the header of
    sample 8's png declaring 8 GiB (at the returned offset), #3 cut inside the header of sample 12's png."""
    samples = ({"__key__": f"s{i:03d}", "png": png_bytes(i), "txt": f"a photo of a red circle {i}",
                "json": {"label": i % 2}} for i in range(PER_SHARD * SHARDS))
    paths = write_shards(samples, out, "lossy", PER_SHARD)
    offsets = [member_offsets(path) for path in paths]
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: offsets[1][3 * 5] + 700])  # inside sample 5's png data
    header_at = offsets[2][3 * 8]
    with tarfile.open(paths[2]) as tar:
        info = tar.getmembers()[3 * 8]
    info.size = 8 << 30
    patched = bytearray(paths[2].read_bytes())
    patched[header_at:header_at + 512] = info.tobuf(format=tarfile.GNU_FORMAT)
    paths[2].write_bytes(bytes(patched))
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: offsets[3][3 * 12] + 100])
    return shard_pattern(paths), paths, header_at


def test_failed_shards_are_counted_with_offsets(tmp_path: Path) -> None:
    pattern, paths, header_at = damaged_shards(tmp_path)
    data = WdsDataModule([ImageModality(16), TextModality()], test=pattern, batch_size=4)
    tally = LossTally()
    delivered = sum(len(tally.take(batch)["__key__"]) for batch in data.test_dataloader())
    failed = {Path(f.url).name: f for f in tally.failed}
    assert sorted(failed) == [p.name for p in paths[1:]]
    assert all(f.offset > 0 for f in failed.values())
    assert failed[paths[2].name].offset == header_at  # the 8 GiB header
    # every sample is delivered, skipped as corrupt, or in the unread rest of a failed shard
    unread = sum(PER_SHARD - f.samples for f in failed.values())
    assert delivered + tally.skipped + unread == PER_SHARD * SHARDS
    assert "3 shards failed mid-way" in tally.summary() and paths[2].name in tally.summary()


def test_fit_prints_the_totals_without_a_logger(shapes_dir: Path, tmp_path: Path, capsys) -> None:
    pattern, paths, header_at = damaged_shards(tmp_path)
    data = WdsDataModule([ImageModality(16), TextModality()], train=pattern, batch_size=4, shuffle_buffer=8)
    torch.manual_seed(0)
    model = Distiller(CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer")), [CLIPContrastiveLoss()])
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(model, datamodule=data)
    printed = capsys.readouterr().out
    assert "3 shards failed mid-way" in printed
    assert f"{paths[2]} at byte {header_at}" in printed


@pytest.fixture(scope="module")
def checkpoint(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer"))
    return save_pretrained(model, model.init_args, tmp_path_factory.mktemp("ckpt") / "tiny-clip")


def eval_args(task: str, checkpoint: Path, pattern: str, shapes_dir: Path, out: Path) -> list[str]:
    classes = ["--classes", str(shapes_dir / "classes.json")] if task == "zeroshot" else []
    return ["eval", task, "--model", str(checkpoint), "--shards", pattern, *classes, "--batch-size", "8",
            "--device", "cpu", "--out", str(out)]


@pytest.mark.parametrize("task", ["zeroshot", "retrieval"])
def test_eval_results_carry_the_loss_counts(task: str, checkpoint: Path, shapes_dir: Path, tmp_path: Path,
                                            capsys) -> None:
    pattern, paths, header_at = damaged_shards(tmp_path)
    main(eval_args(task, checkpoint, pattern, shapes_dir, tmp_path / "out.json"))
    skipped = json.loads((tmp_path / "out.json").read_text())["skipped"]
    assert sorted(Path(f["url"]).name for f in skipped["failed_shards"]) == [p.name for p in paths[1:]]
    assert "3 shards failed mid-way" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["zeroshot", "retrieval"])
def test_eval_on_shards_without_a_sample_exits_non_zero(task: str, checkpoint: Path, shapes_dir: Path,
                                                        tmp_path: Path) -> None:
    shard = write_shards(({"__key__": f"s{i}", "png": png_bytes(i), "txt": "x", "json": {"label": 0}}
                          for i in range(4)), tmp_path, "empty", 4)[0]
    shard.write_bytes(shard.read_bytes()[:100])  # inside the first header: nothing readable
    with pytest.raises(SystemExit) as exit_info:
        main(eval_args(task, checkpoint, str(shard), shapes_dir, tmp_path / "out.json"))
    message = str(exit_info.value.code)
    assert "no sample" in message and str(shard) in message and "\n" not in message
    assert not (tmp_path / "out.json").exists()

"""The WebDataset path: corrupt samples skipped and counted, shards split by worker, decode -> device -> towers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_VISION, tiny_clip_args
from xmodal.data.shards import shard_pattern, write_shards
from xmodal.data.wds import SKIPPED, WdsDataModule, make_pipeline, prepare_on_device
from xmodal.distiller import Distiller
from xmodal.losses import CLIPContrastiveLoss
from xmodal.modalities.audio import AudioModality, encode_audio
from xmodal.modalities.image import ImageModality, random_resized_crop
from xmodal.modalities.text import TextModality, load_tokenizer
from xmodal.modalities.video import VideoModality, encode_mp4
from xmodal.students.clip import CLIPStudent

N_AV = 20
# Corrupt samples, by index, and which field is garbage. The last three are corrupt, so their skips arrive after
# the last good sample and can only be reported on an earlier batch.
CORRUPT_AV = {0: "png", 7: "png", 17: "flac", 18: "mp4", 19: "png"}
N_IMAGE = 20
CORRUPT_IMAGE = {0, 7, 19}


def png_bytes(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def av_samples(n: int, corrupt: dict[int, str]) -> list[dict[str, Any]]:
    """Image + caption + audio + video samples; ``corrupt[i]`` names the field of sample ``i`` replaced by noise."""
    rng = np.random.default_rng(0)
    flac = encode_audio(0.3 * np.sin(np.linspace(0, 200, 800, dtype=np.float32)), 16000)
    mp4 = encode_mp4(rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8), fps=8)
    samples = []
    for i in range(n):
        sample = {"__key__": f"av{i:03d}", "png": png_bytes(i), "txt": f"clip number {i}", "flac": flac, "mp4": mp4,
                  "json": {"label": i % 3}}
        if i in corrupt:
            sample[corrupt[i]] = rng.bytes(len(sample[corrupt[i]]))
        samples.append(sample)
    return samples


def av_modalities() -> list[Any]:
    return [ImageModality(16), TextModality(), AudioModality(16000, max_seconds=0.05), VideoModality(4, size=16)]


@pytest.fixture(scope="module")
def av_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return shard_pattern(write_shards(av_samples(N_AV, CORRUPT_AV), tmp_path_factory.mktemp("av"), "av", 8))


@pytest.mark.parametrize(
    ("batch_size", "drop_last"),
    [(4, False), (5, False), (4, True), (32, False)],
    ids=["trailing-partial", "exact-full-batches", "drop-last", "one-batch"],
)
def test_corrupt_samples_are_skipped_and_counted(av_shards: str, batch_size: int, drop_last: bool) -> None:
    batches = list(make_pipeline(av_shards, av_modalities(), batch_size, train=False, drop_last=drop_last))
    keys = [key for batch in batches for key in batch["__key__"]]
    good = [f"av{i:03d}" for i in range(N_AV) if i not in CORRUPT_AV]
    n_good = len(good) // batch_size * batch_size if drop_last else len(good)
    assert keys == good[:n_good]  # in order, none twice
    assert sum(batch[SKIPPED] for batch in batches) == len(CORRUPT_AV)
    batch = batches[0]
    assert batch["image"].shape == (len(batch["__key__"]), 3, 16, 16) and batch["video"].shape[1:] == (4, 3, 16, 16)
    assert batch["audio"].dtype == torch.int16 and batch["label"].dtype == torch.long


def write_image_shards(out: Path, n: int, corrupt: set[int], prefix: str) -> str:
    rng = np.random.default_rng(1)
    samples = ({"__key__": f"{prefix}{i:03d}", "png": rng.bytes(200) if i in corrupt else png_bytes(i),
                "txt": f"a photo of a red circle {i}"} for i in range(n))
    return shard_pattern(write_shards(samples, out, prefix, 8))


def tiny_distiller(shapes_dir: Path) -> Distiller:
    torch.manual_seed(0)
    return Distiller(CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer")), [CLIPContrastiveLoss()])


def fit(model: Distiller, data: WdsDataModule, epochs: int) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    return trainer


def test_distiller_logs_skipped_samples_per_epoch(shapes_dir: Path, tmp_path: Path) -> None:
    train = write_image_shards(tmp_path, N_IMAGE, CORRUPT_IMAGE, "train")
    data = WdsDataModule([ImageModality(16), TextModality()], train=train, batch_size=4, shuffle_buffer=8)
    trainer = fit(tiny_distiller(shapes_dir), data, epochs=2)
    # the count is per epoch (reset after logging), so two epochs still log the corrupt samples once
    assert trainer.logged_metrics["data/skipped_samples"].item() == len(CORRUPT_IMAGE)
    assert trainer.callback_metrics["data/skipped_samples"].item() == len(CORRUPT_IMAGE)


def test_validation_skips_do_not_leak_into_the_training_count(shapes_dir: Path, tmp_path: Path) -> None:
    train = write_image_shards(tmp_path, N_IMAGE, CORRUPT_IMAGE, "train")
    val = write_image_shards(tmp_path, 8, {2, 3}, "val")
    data = WdsDataModule([ImageModality(16), TextModality()], train=train, val=val, batch_size=4, shuffle_buffer=8)
    trainer = fit(tiny_distiller(shapes_dir), data, epochs=1)
    assert trainer.logged_metrics["data/skipped_samples"].item() == len(CORRUPT_IMAGE)


def shard_keys(pattern_dir: Path, prefix: str) -> list[str]:
    keys = []
    for shard in sorted(pattern_dir.glob(f"{prefix}-*.tar")):
        with tarfile.open(shard) as tar:
            keys += sorted({name.rsplit("/", 1)[-1].split(".", 1)[0] for name in tar.getnames()})
    return keys


def test_two_workers_see_every_sample_once_per_epoch(shapes_dir: Path) -> None:
    data = WdsDataModule([ImageModality(16), TextModality()], train=str(shapes_dir / "train-*.tar"),
                         val=str(shapes_dir / "val-*.tar"), batch_size=8, num_workers=2, shuffle_buffer=16)
    train_keys = shard_keys(shapes_dir, "train")
    assert len(train_keys) == 64  # 2 shards of 32: one per worker, 4 full batches each, so drop_last drops none
    loader = data.train_dataloader()
    for _ in range(2):  # persistent workers: the second epoch re-splits the shards too
        seen = [key for batch in loader for key in batch["__key__"]]
        assert sorted(seen) == train_keys
    seen = [key for batch in data.val_dataloader() for key in batch["__key__"]]
    assert seen == shard_keys(shapes_dir, "val")  # evaluation: no shuffling, every sample once


def check_grads(module: torch.nn.Module) -> None:
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def first_batch(shapes_dir: Path, image: ImageModality, batch_size: int = 8) -> dict[str, Any]:
    return next(iter(make_pipeline(str(shapes_dir / "train-*.tar"), [image, TextModality()], batch_size, train=False)))


def test_image_text_decode_collate_device_and_tower(shapes_dir: Path) -> None:
    image = ImageModality(16, flip=True)
    batch = first_batch(shapes_dir, image)
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 16, 16)  # compact on the wire
    assert len(batch["caption"]) == 8 and all(isinstance(c, str) and c for c in batch["caption"])
    assert batch["label"].dtype == torch.long and batch["label"].shape == (8,)
    wire = batch["image"].clone()

    data = WdsDataModule([image, TextModality()], train=str(shapes_dir / "train-*.tar"))
    evaluated = data.on_after_batch_transfer(dict(batch), 0)  # no trainer: evaluation transform, no augmentation
    assert evaluated["image"].dtype == torch.float32 and torch.equal(evaluated["image"], wire.float() / 255)
    torch.manual_seed(0)
    trained = prepare_on_device({**batch, "image": wire.clone()}, [image, TextModality()], train=True)
    assert trained["image"].shape == wire.shape and 0.0 <= trained["image"].min() <= trained["image"].max() <= 1.0
    assert not torch.equal(trained["image"], evaluated["image"])  # some samples flipped

    student = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer"))
    out = student(trained)
    assert out["image.emb"].shape == out["text.emb"].shape == (8, 16)
    loss = CLIPContrastiveLoss()((out["image.emb"], out["text.emb"], out["logit_scale"]), None, trained)
    loss.backward()
    assert torch.isfinite(loss)
    check_grads(student.model.visual)
    check_grads(student.model.transformer)


@pytest.mark.parametrize("batch_size", [3, 64])
def test_random_resized_crop_keeps_shape_and_stays_inside(batch_size: int) -> None:
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 16).expand(batch_size, 3, 16, 16).contiguous()
    assert torch.allclose(random_resized_crop(ramp, 1.0), ramp, atol=1e-5)  # full-area crop is the identity
    crops = random_resized_crop(ramp, 0.3)
    assert crops.shape == ramp.shape
    # a crop window inside the image keeps the ramp non-decreasing; one poking out would reflect it back
    assert (crops.diff(dim=-1) >= -1e-6).all()
    modality = ImageModality(16, crop_scale=0.3)
    trained = modality.on_device({"image": (ramp * 255).round().to(torch.uint8)}, train=True)["image"]
    assert trained.shape == ramp.shape and trained.dtype == torch.float32


def test_corpus_tokenizer_knows_every_caption_and_prompt(shapes_dir: Path) -> None:
    import json

    tokenizer = load_tokenizer(str(shapes_dir / "tokenizer"), context_length=16)
    meta = json.loads((shapes_dir / "classes.json").read_text())
    prompts = [t.format(c) for c in meta["classes"] for t in meta["templates"]]
    captions = first_batch(shapes_dir, ImageModality(16), batch_size=32)["caption"]
    ids = tokenizer(captions + prompts)
    assert ids.shape == (len(captions) + len(prompts), 16)
    assert not (ids == 1).any()  # [UNK]
    assert (ids[:, 0] == 2).all() and ((ids == 3).sum(1) == 1).all()  # [BOS] ... [EOS] [PAD]...


def test_open_clip_tokenizer_name_works_offline(shapes_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # open_clip's BPE puts end-of-text at the highest id, so its text tower pools with "argmax" (the default)
    text_cfg = {"context_length": 16, "width": 32, "heads": 2, "layers": 1}
    student = CLIPStudent(embed_dim=16, vision_cfg=dict(TINY_VISION), text_cfg=text_cfg, tokenizer="ViT-B-32")
    batch = first_batch(shapes_dir, ImageModality(16), batch_size=4)
    tokens = student.tokenizer(batch["caption"])
    assert tokens.shape == (4, 16) and (tokens[:, 0] == 49406).all() and (tokens.argmax(1) > 1).all()
    batch = prepare_on_device(batch, [ImageModality(16), TextModality()], train=False)
    out = student(batch)
    loss = CLIPContrastiveLoss()((out["image.emb"], out["text.emb"], out["logit_scale"]), None, batch)
    loss.backward()
    assert torch.isfinite(loss) and out["text.emb"].std(0).sum() > 0  # captions embed differently
    check_grads(student.model.transformer)


def test_training_order_is_reproducible_from_the_seed(shapes_dir: Path) -> None:
    from xmodal.data.wds import make_pipeline

    def keys(seed: int) -> list[str]:
        pipeline = make_pipeline(str(shapes_dir / "train-*.tar"), [ImageModality(16), TextModality()], 16,
                                 train=True, shuffle_buffer=64, seed=seed)
        return [key for batch in pipeline for key in batch["__key__"]]

    first = keys(0)
    assert first == keys(0)
    assert first != keys(1) and sorted(first) == sorted(keys(1))


def test_an_epoch_where_no_sample_decodes_stops_with_a_clear_error(shapes_dir: Path, tmp_path: Path) -> None:
    from xmodal.distiller import EmptyEpochError

    train = write_image_shards(tmp_path, 8, set(range(8)), "train")
    data = WdsDataModule([ImageModality(16), TextModality()], train=train, batch_size=4, shuffle_buffer=8)
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(EmptyEpochError, match="no sample decoded"):
        trainer.fit(tiny_distiller(shapes_dir), datamodule=data)

"""Validation leaves the global RNGs alone: a fit that validates every few steps trains exactly as one that never
validates (same losses, same global RNG state at every step, same final weights)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from tests.conftest import tiny_clip_args
from xmodal.data.wds import WdsDataModule
from xmodal.distiller import Distiller
from xmodal.losses import CLIPContrastiveLoss
from xmodal.modalities.image import ImageModality
from xmodal.modalities.text import TextModality
from xmodal.students.clip import CLIPStudent


def datamodule(shapes: Path, *, val: bool, num_workers: int = 0) -> WdsDataModule:
    # random crops on the device draw from the global RNG in training, so any shift of it changes the losses
    modalities = [ImageModality(16, crop_scale=0.5), TextModality()]
    return WdsDataModule(modalities, train=str(shapes / "train-*.tar"), val=str(shapes / "val-*.tar") if val else None,
                         test=str(shapes / "test-*.tar"), batch_size=8, num_workers=num_workers, shuffle_buffer=16,
                         seed=0)


def global_rng_states() -> tuple[Any, ...]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state(legacy=False)["state"]["key"].copy()


def assert_same_states(before: tuple[Any, ...], after: tuple[Any, ...]) -> None:
    assert torch.equal(before[0], after[0]), "torch's global RNG moved"
    assert before[1] == after[1], "python's random moved"
    assert np.array_equal(before[2], after[2]), "numpy's global RNG moved"


@pytest.mark.parametrize("num_workers", [0, 1])
def test_evaluation_loaders_draw_nothing_from_the_global_rngs(shapes_dir: Path, num_workers: int) -> None:
    data = datamodule(shapes_dir, val=True, num_workers=num_workers)
    torch.manual_seed(0)
    before = global_rng_states()
    for loader in (data.val_dataloader(), data.test_dataloader()):
        assert sum(len(batch["__key__"]) for batch in loader) == 32
    assert_same_states(before, global_rng_states())


class TrainingRecord(L.Callback):
    """The global torch RNG state at every training batch start and every step's training loss."""

    def __init__(self) -> None:
        self.rng: list[torch.Tensor] = []
        self.losses: list[float] = []
        self.validations = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.rng.append(torch.get_rng_state())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validations += 1


def fit(shapes: Path, *, validate: bool) -> tuple[TrainingRecord, dict[str, torch.Tensor]]:
    """12 steps over 8-step epochs (so the training loader starts a second iterator); with ``validate``, a sanity
    check and a validation pass every 3 steps."""
    L.seed_everything(0)
    model = Distiller(CLIPStudent(**tiny_clip_args(shapes / "tokenizer")), [CLIPContrastiveLoss()])
    record = TrainingRecord()
    trainer = L.Trainer(accelerator="cpu", max_steps=12, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                        val_check_interval=3 if validate else None, check_val_every_n_epoch=None,
                        num_sanity_val_steps=2 if validate else 0)
    trainer.fit(model, datamodule=datamodule(shapes, val=validate))
    return record, {k: v.clone() for k, v in model.student.state_dict().items()}


def test_a_fit_with_validation_trains_exactly_as_one_without(shapes_dir: Path) -> None:
    plain, plain_weights = fit(shapes_dir, validate=False)
    validated, validated_weights = fit(shapes_dir, validate=True)
    assert validated.validations >= 4 and plain.validations == 0  # the sanity check, then steps 3, 6, 9, 12
    assert len(plain.losses) == 12
    assert validated.losses == plain.losses
    assert all(torch.equal(a, b) for a, b in zip(validated.rng, plain.rng, strict=True))
    assert validated_weights.keys() == plain_weights.keys()
    assert all(torch.equal(validated_weights[k], plain_weights[k]) for k in plain_weights)

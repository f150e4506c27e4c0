"""Callbacks: the zero-shot learning-curve probe; every callback lives in xmodal.callbacks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import lightning as L
import pytest

from tests.conftest import tiny_clip_args
from xmodal.callbacks import ZeroShotProbe
from xmodal.data.wds import WdsDataModule, make_pipeline
from xmodal.distiller import Distiller
from xmodal.eval.loops import evaluate_zeroshot
from xmodal.eval.zeroshot import DualEncoder
from xmodal.losses import CLIPContrastiveLoss
from xmodal.modalities.image import ImageModality
from xmodal.modalities.text import TextModality
from xmodal.students.clip import CLIPStudent


def test_zero_shot_probe_records_the_learning_curve(shapes_dir: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    model = Distiller(CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer")), [CLIPContrastiveLoss()])
    probe = ZeroShotProbe(str(shapes_dir / "test-*.tar"), str(shapes_dir / "classes.json"), image_size=16,
                          every_n_steps=2, out_json=str(tmp_path / "probe.json"))
    data = WdsDataModule([ImageModality(16), TextModality()], train=str(shapes_dir / "train-*.tar"), batch_size=8,
                         num_workers=0)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    trainer.fit(model, datamodule=data)

    assert [point["step"] for point in probe.history] == [2, 4, 5]  # every 2 steps, plus the end of training
    assert json.loads((tmp_path / "probe.json").read_text()) == probe.history
    classes = json.loads((shapes_dir / "classes.json").read_text())
    loader = make_pipeline(str(shapes_dir / "test-*.tar"), [ImageModality(16)], 256, train=False)
    final = evaluate_zeroshot(cast(DualEncoder, model.student), loader, classes["classes"], classes["templates"])
    assert probe.history[-1]["zeroshot_top1"] == pytest.approx(final["top1"])
    assert model.student.training  # the probe leaves the student in training mode


def test_zero_shot_probe_rejects_a_zero_interval(shapes_dir: Path) -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        ZeroShotProbe(str(shapes_dir / "test-*.tar"), str(shapes_dir / "classes.json"), 16, every_n_steps=0)


def test_every_callback_is_in_xmodal_callbacks_and_none_in_the_losses() -> None:
    import xmodal.callbacks
    import xmodal.losses

    callbacks = {name for name, value in vars(xmodal.callbacks).items()
                 if isinstance(value, type) and issubclass(value, L.Callback)
                 and value.__module__ == "xmodal.callbacks"}
    assert {"ExportStudent", "ZeroShotProbe", "AugmentBatch", "HARDCallback", "TGeoKDMetaCallback",
            "MixSpeechSchedule"} <= callbacks
    assert not [name for name, value in vars(xmodal.losses).items()
                if isinstance(value, type) and issubclass(value, L.Callback)]

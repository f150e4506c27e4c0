"""Validation logs each task's metric (val/<name>) through the Distiller's val_metrics, with the eval numbers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from tests.conftest import tiny_clip_args
from tests.test_bev_models import SCENES, synthetic_batch
from tests.test_lipreading import TINY, make_batch
from xmodal.contracts import Batch, TaskMetric
from xmodal.distiller import Distiller
from xmodal.eval.base2novel import make_split, write_split
from xmodal.eval.loops import evaluate_base2novel, evaluate_zeroshot
from xmodal.eval.tasks import (
    Base2NovelTask,
    ClassifyTask,
    DetectionTask,
    MissingFieldError,
    RetrievalTask,
    TranscriptTask,
    ZeroShotTask,
)
from xmodal.losses import BEVDetectionLoss, CharCELoss, CLIPContrastiveLoss, HardLabelLoss
from xmodal.modalities.bev_detector import BEVDetector
from xmodal.modalities.transcript import cer, wer
from xmodal.students.clip import CLIPStudent
from xmodal.students.lipreader import LipReader


class Batches:
    """An iterable of ready batches (a plain list would read as a list of data loaders)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


def fit_one_step(distiller: Distiller, train: list[Batch], val: list[Batch]) -> dict[str, float]:
    """``fast_dev_run`` (one training and one validation batch); the trainer's logged metrics."""
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(distiller, train_dataloaders=Batches(train), val_dataloaders=Batches(val))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.fixture(scope="module")
def shapes_batches(shapes_dir: Path) -> list[Batch]:
    from xmodal.data.wds import make_pipeline, prepare_on_device
    from xmodal.modalities.image import ImageModality
    from xmodal.modalities.text import TextModality

    modalities = [ImageModality(16), TextModality()]
    loader = make_pipeline(str(shapes_dir / "val-*.tar"), modalities, 16, train=False)
    return [prepare_on_device(batch, modalities, train=False) for batch in loader]


def clip_distiller(shapes_dir: Path, *tasks: TaskMetric) -> Distiller:
    torch.manual_seed(0)
    student = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer"))
    return Distiller(student, [CLIPContrastiveLoss()], val_metrics=list(tasks))


def test_zeroshot_and_retrieval_in_validation(shapes_dir: Path, shapes_batches: list[Batch]) -> None:
    zeroshot = ZeroShotTask(str(shapes_dir / "classes.json"))
    distiller = clip_distiller(shapes_dir, zeroshot, RetrievalTask(identical_captions_match=True))
    batch = shapes_batches[0]
    logged = fit_one_step(distiller, [batch], [batch])
    student: Any = distiller.student
    want = evaluate_zeroshot(student, [batch], zeroshot.classnames, zeroshot.templates)
    assert logged["val/zeroshot_top1"] == pytest.approx(want["top1"], rel=1e-6)
    assert logged["val/zeroshot_top5"] == pytest.approx(want["top5"], rel=1e-6)
    assert {"val/i2t_R@1", "val/t2i_R@10", "val/loss"} <= set(logged)


def test_base2novel_in_validation(shapes_dir: Path, shapes_batches: list[Batch], tmp_path: Path) -> None:
    classes = json.loads((shapes_dir / "classes.json").read_text())["classes"]
    split = make_split(classes)
    task = Base2NovelTask(str(write_split(split, tmp_path / "split.json")))
    distiller = clip_distiller(shapes_dir, task)
    batch = shapes_batches[0]
    logged = fit_one_step(distiller, [batch], [batch])
    want = evaluate_base2novel(distiller.student, [batch], split, templates=["a photo of a {}."])
    assert {k: logged[f"val/{k}"] for k in ("base", "novel", "hm")} == pytest.approx(
        {k: want[k] for k in ("base", "novel", "hm")}, rel=1e-6)


def test_cer_wer_in_validation() -> None:
    torch.manual_seed(0)
    distiller = Distiller(LipReader(**TINY), [CharCELoss()], val_metrics=[TranscriptTask()])
    batch = make_batch()
    logged = fit_one_step(distiller, [batch], [batch])
    student: Any = distiller.student.eval()
    hypotheses = student.transcribe(batch)
    assert logged["val/cer"] == pytest.approx(cer(batch["transcript"], hypotheses), rel=1e-6)
    assert logged["val/wer"] == pytest.approx(wer(batch["transcript"], hypotheses), rel=1e-6)


def test_detection_in_validation() -> None:
    torch.manual_seed(0)
    student = BEVDetector("lidar", channels=8, pillar_channels=8, score_threshold=0.0, top_k=20)
    distiller = Distiller(student, [BEVDetectionLoss(student.grid)], val_metrics=[DetectionTask()])
    batch: Any = synthetic_batch(SCENES)
    logged = fit_one_step(distiller, [batch], [batch])
    assert 0.0 <= logged["val/mAP"] <= 1.0 and 0.0 <= logged["val/nds"] <= 1.0


class LinearClassifier(torch.nn.Module):
    """A tiny classifier student: ``image.logits`` from flattened ``image``."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(features, classes)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"image.logits": self.head(batch["image"].flatten(1))}


def test_classification_accuracy_in_validation() -> None:
    torch.manual_seed(0)
    student = LinearClassifier(12, 5)
    distiller = Distiller(student, [HardLabelLoss(student_key="image.logits")], val_metrics=[ClassifyTask(ks=(1, 3))])
    train = {"image": torch.randn(8, 3, 2, 2), "label": torch.randint(0, 5, (8,))}
    val = {"image": torch.randn(40, 3, 2, 2), "label": torch.randint(0, 5, (40,))}
    logged = fit_one_step(distiller, [train], [val])
    with torch.no_grad():
        logits = student.eval()(val)["image.logits"]
    ranks = (logits > logits.gather(1, val["label"][:, None])).sum(1)  # classes scored above the true one
    assert logged["val/accuracy_top1"] == pytest.approx(float((ranks < 1).float().mean()), abs=1e-6)
    assert logged["val/accuracy_top3"] == pytest.approx(float((ranks < 3).float().mean()), abs=1e-6)


def test_a_task_names_the_missing_field(shapes_dir: Path, shapes_batches: list[Batch]) -> None:
    distiller = clip_distiller(shapes_dir, ZeroShotTask(str(shapes_dir / "classes.json")))
    batch = {k: v for k, v in shapes_batches[0].items() if k != "label"}
    with pytest.raises(MissingFieldError, match="'label'"):
        fit_one_step(distiller, [batch], [batch])


def test_val_metrics_must_be_task_modules() -> None:
    with pytest.raises(TypeError, match="TaskMetric"):
        Distiller(LipReader(**TINY), [CharCELoss()], val_metrics=[object()])  # type: ignore[list-item]

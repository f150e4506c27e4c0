"""The CUDA path: every tiny recipe trains on the GPU, mixed precision, and a cache built on the GPU.

Skipped where no GPU is present (CI, this project's CPU machines); run on a GPU machine with
``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from tests.conftest import tiny_clip_args, tiny_workspace
from tests.test_configs import assert_one_finite_step, record_fits
from xmodal.commands.main import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIGS = sorted((ROOT / "configs" / "tiny").glob("*.yaml"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """What the tiny configs point at (as in test_configs), with the teacher cache built on the GPU."""
    with tiny_workspace(tmp_path_factory.mktemp("cuda-workspace"), "cuda") as work:
        yield work


class OnDevice(L.Callback):
    """Records where the student's parameters and the training batches live."""

    def __init__(self) -> None:
        self.devices: set[str] = set()

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        self.devices |= {v.device.type for v in batch.values() if isinstance(v, torch.Tensor)}
        self.devices |= {p.device.type for p in module.parameters()}


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda p: p.stem)
def test_tiny_recipe_trains_on_the_gpu(config: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = OnDevice()
    trainers = record_fits(monkeypatch, probe)
    main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.accelerator=gpu"])
    assert_one_finite_step(trainers)
    assert probe.devices == {"cuda"}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_distiller_steps_on_the_gpu(workspace: Path, precision: str) -> None:
    from xmodal.data.wds import WdsDataModule
    from xmodal.distiller import Distiller
    from xmodal.losses import AffinityMimicLoss, CLIPContrastiveLoss
    from xmodal.modalities.image import ImageModality
    from xmodal.modalities.text import TextModality
    from xmodal.students.clip import CLIPStudent
    from xmodal.teachers.open_clip import OpenCLIPTeacher

    torch.manual_seed(1)
    student = CLIPStudent(**tiny_clip_args("runs/data/shapes-tiny/tokenizer"))
    model = Distiller(student, [CLIPContrastiveLoss(), AffinityMimicLoss()],
                      teacher=OpenCLIPTeacher("local-dir:runs/tiny/clip_teacher"),
                      teacher_dtype="bfloat16" if precision == "bf16-mixed" else None)
    data = WdsDataModule([ImageModality(16), TextModality()], "runs/data/shapes-tiny/train-*.tar", batch_size=8,
                         num_workers=0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    probe = OnDevice()
    trainer = L.Trainer(max_steps=3, accelerator="gpu", devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[probe])
    trainer.fit(model, data)
    assert probe.devices == {"cuda"}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v.cpu(), before[k])]
    assert changed


def test_cache_built_on_the_gpu_matches_the_cpu(workspace: Path, tmp_path: Path) -> None:
    from xmodal.data.cache import cache_teacher
    from xmodal.data.wds import make_pipeline
    from xmodal.modalities.image import ImageModality
    from xmodal.modalities.text import TextModality
    from xmodal.teachers.open_clip import OpenCLIPTeacher

    modalities = [ImageModality(16), TextModality()]
    cache_teacher(OpenCLIPTeacher("local-dir:runs/tiny/clip_teacher"), modalities, "runs/data/shapes-tiny/train-*.tar",
                  tmp_path / "cpu", batch_size=16)
    on_gpu = make_pipeline("runs/tiny/clip_cache/train-*.tar", modalities, 16, train=False)
    on_cpu = make_pipeline(str(tmp_path / "cpu" / "train-*.tar"), modalities, 16, train=False)
    for gpu_batch, cpu_batch in zip(on_gpu, on_cpu, strict=True):
        assert torch.allclose(gpu_batch["teacher/image.emb"].float(), cpu_batch["teacher/image.emb"].float(),
                              atol=2e-3)


def test_a_non_finite_loss_on_the_gpu_stops_training_naming_its_step(workspace: Path) -> None:
    from xmodal.data.wds import WdsDataModule
    from xmodal.distiller import Distiller, NonFiniteLossError
    from xmodal.losses import CLIPContrastiveLoss
    from xmodal.modalities.image import ImageModality
    from xmodal.modalities.text import TextModality
    from xmodal.students.clip import CLIPStudent

    class NaNAtStepOne(CLIPContrastiveLoss):
        calls = 0

        def forward(self, s: Any, t: Any, batch: Any) -> torch.Tensor:
            NaNAtStepOne.calls += 1
            loss = super().forward(s, t, batch)
            return loss * float("nan") if NaNAtStepOne.calls == 2 else loss

    model = Distiller(CLIPStudent(**tiny_clip_args("runs/data/shapes-tiny/tokenizer")), [NaNAtStepOne()])
    data = WdsDataModule([ImageModality(16), TextModality()], "runs/data/shapes-tiny/train-*.tar", batch_size=8)
    trainer = L.Trainer(max_steps=5, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        trainer.fit(model, data)

"""The Distiller: losses summed and logged, teacher frozen and never saved, bad configs and NaNs stopped early."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.conftest import tiny_clip_args
from xmodal.commands.main import main
from xmodal.contracts import count_params
from xmodal.data.wds import WdsDataModule
from xmodal.distiller import ConfigKeyError, Distiller, NonFiniteLossError, lr_lambda, param_groups
from xmodal.losses import CLIPContrastiveLoss, FeatureMSELoss
from xmodal.modalities.image import ImageModality
from xmodal.modalities.text import TextModality
from xmodal.students.clip import CLIPStudent, save_open_clip_dir
from xmodal.teachers.open_clip import OpenCLIPTeacher


@pytest.fixture()
def teacher_dir(shapes_dir: Path, tmp_path: Path) -> Path:
    torch.manual_seed(1)
    teacher = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer", embed_dim=16))
    return save_open_clip_dir(teacher, tmp_path / "teacher")


def datamodule(shapes_dir: Path, **kwargs) -> WdsDataModule:
    return WdsDataModule([ImageModality(16), TextModality()], train=str(shapes_dir / "train-*.tar"),
                         val=str(shapes_dir / "val-*.tar"), batch_size=16, **kwargs)


def test_teacher_is_frozen_unregistered_and_not_checkpointed(shapes_dir: Path, teacher_dir: Path) -> None:
    teacher = OpenCLIPTeacher(f"local-dir:{teacher_dir}")
    student = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer"))
    model = Distiller(student, [CLIPContrastiveLoss(), FeatureMSELoss("image.emb", "image.emb")], teacher=teacher)
    model.train()
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in model.state_dict())
    assert count_params(model) == count_params(student)

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.fit(model, datamodule=datamodule(shapes_dir))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert {"train/clip", "train/feature_mse", "train/loss"} <= set(trainer.logged_metrics)
    logged = trainer.logged_metrics
    expected = logged["train/clip"].item() + logged["train/feature_mse"].item()
    assert logged["train/loss"].item() == pytest.approx(expected, rel=1e-5)


def test_weights_scale_terms(shapes_dir: Path, teacher_dir: Path) -> None:
    teacher = OpenCLIPTeacher(f"local-dir:{teacher_dir}")
    student = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer"))
    batch = next(iter(datamodule(shapes_dir).train_dataloader()))
    batch["image"] = batch["image"].float() / 255
    plain = Distiller(student, [FeatureMSELoss("image.emb", "image.emb")], teacher=teacher)
    heavy = Distiller(student, [FeatureMSELoss("image.emb", "image.emb", weight=3.0)], teacher=teacher)
    total_plain, _ = plain.compute_losses(batch)
    total_heavy, terms = heavy.compute_losses(batch)
    assert total_heavy.item() == pytest.approx(3 * total_plain.item(), rel=1e-5)
    assert total_plain.item() == pytest.approx(terms["feature_mse"].item(), rel=1e-5)


def test_unknown_output_key_fails_before_training(shapes_dir: Path, teacher_dir: Path) -> None:
    teacher = OpenCLIPTeacher(f"local-dir:{teacher_dir}")
    student = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer"))
    with pytest.raises(ConfigKeyError, match="image.feat"):
        Distiller(student, [FeatureMSELoss("image.feat", "image.emb")], teacher=teacher)
    with pytest.raises(ConfigKeyError, match="audio.emb"):
        Distiller(student, [FeatureMSELoss("image.emb", "audio.emb")], teacher=teacher)
    with pytest.raises(ConfigKeyError, match="no teacher"):
        Distiller(student, [FeatureMSELoss("image.emb", "image.emb")])


class ExplodingLoss(FeatureMSELoss):
    def forward(self, s, t, batch):
        return super().forward(s, t, batch) * float("nan")


def test_nan_loss_stops_with_step_and_term(shapes_dir: Path, teacher_dir: Path) -> None:
    teacher = OpenCLIPTeacher(f"local-dir:{teacher_dir}")
    student = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer"))
    model = Distiller(student, [CLIPContrastiveLoss(), ExplodingLoss("image.emb", "image.emb", name="boom")],
                      teacher=teacher)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match=r"step 0: boom=nan"):
        trainer.fit(model, datamodule=datamodule(shapes_dir))


def test_lr_schedule_warmup_then_cosine() -> None:
    schedule = lr_lambda("cosine", warmup=2, total=10)
    assert [schedule(0), schedule(1)] == [0.5, 1.0]
    assert schedule(2) == pytest.approx(1.0)
    assert schedule(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(10) == pytest.approx(0.0)
    assert lr_lambda("constant", 0, 10)(7) == 1.0


def write_config(path: Path, shapes_dir: Path, **model_overrides) -> Path:
    config = {
        "trainer": {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False},
        "model": {
            "student": {"class_path": "CLIPStudent", "init_args": tiny_clip_args(shapes_dir / "tokenizer")},
            "losses": [{"class_path": "CLIPContrastiveLoss"}],
        },
        "data": {"modalities": [{"class_path": "ImageModality", "init_args": {"size": 16}},
                                {"class_path": "TextModality"}],
                 "train": str(shapes_dir / "train-*.tar"), "batch_size": 16},
    }
    config["model"].update(model_overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_errors_name_the_key_and_the_file(shapes_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad_key = write_config(tmp_path / "bad_key.yaml", shapes_dir, learning_rat=0.1)
    with pytest.raises(SystemExit, match=r"bad_key\.yaml.*learning_rat|learning_rat.*bad_key\.yaml"):
        main(["fit", "--config", str(bad_key)])
    bad_class = write_config(tmp_path / "bad_class.yaml", shapes_dir,
                             losses=[{"class_path": "NoSuchLoss"}])
    with pytest.raises(SystemExit, match=r"(?s)bad_class\.yaml.*NoSuchLoss"):
        main(["fit", "--config", str(bad_class)])
    bad_output = write_config(tmp_path / "bad_output.yaml", shapes_dir,
                              losses=[{"class_path": "CLIPContrastiveLoss",
                                       "init_args": {"student_key": ["image.emb", "text.feat", "logit_scale"]}}])
    with pytest.raises(SystemExit, match=r"(?s)bad_output\.yaml.*text\.feat"):
        main(["fit", "--config", str(bad_output)])


def test_missing_shards_error_names_the_pattern(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere-"):
        WdsDataModule([ImageModality(16)], train=str(tmp_path / "nowhere-{000000..000003}.tar"))


def test_cli_fit_runs_and_writes_config(shapes_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "ok.yaml", shapes_dir)
    main(["fit", "--config", str(config)])
    [saved_file] = tmp_path.rglob("config.yaml")
    saved = yaml.safe_load(saved_file.read_text())
    assert saved["model"]["student"]["class_path"].endswith("CLIPStudent")


def test_param_lr_gives_matching_parameters_their_own_learning_rate() -> None:
    from torch import nn

    module = nn.ModuleDict({"student": nn.Linear(2, 2), "losses": nn.ModuleList([nn.Linear(1, 1)])})
    module["student"].bias.requires_grad_(False)
    groups = param_groups(module, {"losses.0": 1.0})
    assert [len(g["params"]) for g in groups] == [1, 2]  # the student's trainable weight; the loss' weight + bias
    assert "lr" not in groups[0] and groups[1]["lr"] == 1.0
    assert len(param_groups(module, None)) == 1
    with pytest.raises(ValueError, match="log_alpha"):
        param_groups(module, {"log_alpha": 0.1})


@pytest.mark.parametrize("every_step", [False, True])
def test_training_terms_are_logged_when_the_trainer_writes_logs(shapes_dir: Path, every_step: bool) -> None:
    model = Distiller(CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer")), [CLIPContrastiveLoss()],
                      log_every_step=every_step)
    logged_at: list[int] = []
    log = model.log

    def spy(name: str, value: object, **kwargs: object) -> None:
        if name == "train/loss":
            logged_at.append(model.global_step)
        log(name, value, **kwargs)  # type: ignore[arg-type]

    model.log = spy  # type: ignore[method-assign]
    trainer = L.Trainer(max_steps=7, log_every_n_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule(shapes_dir, shuffle_buffer=8))
    # Lightning writes logs after steps 3 and 6 (1-based); the first and last steps are logged as well
    assert logged_at == (list(range(7)) if every_step else [0, 2, 5, 6])
    assert "train/loss" in trainer.callback_metrics

"""Loggers: TensorBoard works from the CLI, the recipes log the learning rate, and logs stay apart from models."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import tiny_clip_args
from xmodal.commands.main import main

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not {"cache", "stages", "tiny"} & set(p.parts))
PENDING: set[str] = set()  # every recipe folder follows the convention


def tiny_config(path: Path, shapes_dir: Path, steps: int, **trainer: Any) -> Path:
    config = {
        "trainer": {"max_steps": steps, "accelerator": "cpu", "enable_checkpointing": False, "log_every_n_steps": 1,
                    "enable_progress_bar": False, **trainer},
        "model": {"student": {"class_path": "CLIPStudent", "init_args": tiny_clip_args(shapes_dir / "tokenizer")},
                  "losses": [{"class_path": "CLIPContrastiveLoss"}],
                  "optimizer": {"class_path": "AdamW", "init_args": {"lr": 0.01}},
                  "scheduler": {"class_path": "WarmupCosineLR", "init_args": {"warmup_steps": 2}}},
        "data": {"modalities": [{"class_path": "ImageModality", "init_args": {"size": 16}},
                                {"class_path": "TextModality"}],
                 "train": str(shapes_dir / "train-*.tar"), "batch_size": 16},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_tensorboard_logger_writes_an_events_file(shapes_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path / "fit.yaml", shapes_dir, steps=2)
    main(["fit", "--config", str(config), "--trainer.logger=TensorBoardLogger",
          f"--trainer.logger.save_dir={tmp_path / 'tb'}"])
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_learning_rate_monitor_logs_the_schedule(shapes_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    logger = {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs"), "name": "run"}}
    monitor = {"class_path": "LearningRateMonitor", "init_args": {"logging_interval": "step"}}
    config = tiny_config(tmp_path / "fit.yaml", shapes_dir, steps=4, logger=logger, callbacks=[monitor])
    main(["fit", "--config", str(config)])
    [metrics] = (tmp_path / "logs").rglob("metrics.csv")
    rates = [float(row["lr-AdamW"]) for row in csv.DictReader(metrics.open()) if row.get("lr-AdamW")]
    # warm-up 1/2, 2/2, then the cosine over the 2 remaining steps: cos(0), cos(pi / 2)
    assert rates == pytest.approx([0.005, 0.01, 0.01, 0.005])


def logger_dirs(config: dict[str, Any]) -> list[Path]:
    loggers = config["trainer"].get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return [Path(lg["init_args"]["save_dir"]) / lg["init_args"].get("name", "lightning_logs")
            for lg in loggers if isinstance(lg, dict)]


def export_dirs(config: dict[str, Any]) -> list[Path]:
    args = [c.get("init_args", {}) for c in config["trainer"].get("callbacks", [])]
    return [Path(a.get("out_dir") or a["dirpath"]) for a in args if a.get("out_dir") or a.get("dirpath")]


@pytest.mark.parametrize("recipe", [r for r in RECIPES if not PENDING & set(r.parts)],
                         ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_recipes_log_the_learning_rate_apart_from_their_models(recipe: Path) -> None:
    config = yaml.safe_load(recipe.read_text())
    callbacks = [c["class_path"] for c in config["trainer"].get("callbacks", [])]
    assert logger_dirs(config) and "LearningRateMonitor" in callbacks
    for log in logger_dirs(config):
        for model in export_dirs(config):
            assert not log.is_relative_to(model) and not model.is_relative_to(log), (log, model)


def test_a_recipe_runs_without_a_logger(tmp_path: Path, shapes_dir: Path, monkeypatch) -> None:
    """``--trainer.logger=false`` on a recipe with a ``LearningRateMonitor`` (which Lightning refuses without a
    logger): the monitor is left out and the run goes on."""
    monkeypatch.chdir(tmp_path)
    monitor = {"class_path": "LearningRateMonitor", "init_args": {"logging_interval": "step"}}
    config = tiny_config(tmp_path / "recipe.yaml", shapes_dir, steps=2, callbacks=[monitor])
    main(["fit", "--config", str(config), "--trainer.logger=false"])

"""Every script in examples/ runs on tiny data, the way its docstring says (models trained a few steps or random)."""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("runs/examples")


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working directory where examples/train_cli.py has trained and exported the tiny CLIP (10 steps)."""
    work, previous = tmp_path_factory.mktemp("examples"), Path.cwd()
    os.chdir(work)
    try:
        assert example("train_cli").run(["--steps", "10"]) == WORK / "model"  # logs are written every 10 steps
        yield work
    finally:
        os.chdir(previous)


@pytest.fixture()
def inside(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("XMODAL_ZOO_DIR", str(workspace / "zoo"))
    return workspace


def test_train_cli_exports_the_model_and_logs_apart(inside: Path) -> None:
    assert (WORK / "model" / "model.safetensors").is_file()
    [metrics] = (WORK / "logs").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert any(row.get("lr-AdamW") for row in rows) and any(row.get("train/loss") for row in rows)
    assert not list((WORK / "model").rglob("metrics.csv"))


def test_zoo_python(inside: Path) -> None:
    result = example("zoo_python").run([])
    assert {"true", "predicted", "probability"} <= set(result) and 0 < result["probability"] <= 1


@pytest.mark.parametrize("name, metric", [("eval_zeroshot", "top1"), ("eval_retrieval", "i2t_R@1"),
                                          ("eval_base2novel", "hm")])
def test_clip_evaluations(inside: Path, name: str, metric: str) -> None:
    metrics = example(name).run([])
    assert 0 <= metrics[metric] <= 1


def test_eval_asr(inside: Path) -> None:
    from xmodal.students.lipreader import LipReader
    from xmodal.zoo import save_pretrained

    torch.manual_seed(0)
    model = LipReader(dim=16, channels=4, depth=1, max_len=12, dropout=0.0)
    save_pretrained(model, model.init_args, inside / "lipreader", name="tiny-lipreader")
    metrics = example("eval_asr").run(["--model", str(inside / "lipreader"), "--beam-size", "2"])
    assert metrics["utterances"] == 8 and metrics["greedy_cer"] >= 0 and metrics["beam_cer"] >= 0


def test_eval_bev(inside: Path) -> None:
    from xmodal.modalities.bev_detector import BEVDetector
    from xmodal.modalities.bev_nets import BEVGrid
    from xmodal.zoo import save_pretrained

    torch.manual_seed(0)
    grid = BEVGrid(x_range=(-8, 8), y_range=(-8, 8), z_range=(-1, 3), cell=0.5, stride=2)
    model = BEVDetector("lidar", grid=grid, channels=8, pillar_channels=8)
    save_pretrained(model, model.init_args, inside / "detector", name="tiny-detector")
    metrics = example("eval_bev").run(["--model", str(inside / "detector")])
    assert 0 <= metrics["mAP"] <= 1 and len(metrics["renders"]) == 2

"""The loss benchmark (bench/losses.py) in quick mode on a subset of the digits: structure of its outputs, sane
accuracies, a teacher that learned, a result for every requested recipe, and failures recorded rather than dropped."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of scripts at the repository root, not part of the package
    sys.path.insert(0, str(ROOT))

from bench.losses import BenchConfig, run_benchmark  # noqa: E402
from bench.losses_recipes import NOTES, RECIPES, Context  # noqa: E402
from bench.losses_report import write_outputs  # noqa: E402
from xmodal.contracts import Batch, DistillLoss  # noqa: E402

# the recipes that exercise every code path: logits, features, hooks of both callbacks (TGeo-KD, mixup)
LOSSES = ("scratch", "kd", "ofa", "tgeo_kd", "kd_mixup")


def quick(**overrides: Any) -> BenchConfig:
    base: dict[str, Any] = {"subset": 400, "test_size": 100, "teacher_epochs": 8, "epochs": 10, "warmup_steps": 5,
                            "losses": LOSSES}
    return BenchConfig.quick(**{**base, **overrides})


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench")
    result = run_benchmark(quick(), log=False)
    write_outputs(result, out)
    return result, out


def test_outputs_are_written_with_their_structure(results: tuple[dict[str, Any], Path]) -> None:
    _, out = results
    data = json.loads((out / "losses.json").read_text())
    assert {"config", "machine", "data", "teacher", "recipes", "runs", "summary", "wall_seconds"} <= set(data)
    assert {"torch", "threads", "cpu_count", "date"} <= set(data["machine"])
    assert data["machine"]["threads"] == 1
    assert (data["data"]["name"], data["data"]["train"], data["data"]["test"]) == ("digits", 300, 100)
    table = (out / "losses.md").read_text()
    assert all(f"`{loss}`" in table for loss in LOSSES)
    assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_requested_recipe_ran_with_sane_accuracy(results: tuple[dict[str, Any], Path]) -> None:
    result, _ = results
    cfg = result["config"]
    ran = {(r["student"], r["loss"], r["seed"]) for r in result["runs"]}
    assert ran == {(s, loss, seed) for s in cfg["students"] for loss in LOSSES for seed in cfg["seeds"]}
    for run in result["runs"]:
        assert run["status"] == "ok", run
        assert 0.0 <= run["test_acc"] <= 1.0
        assert run["samples_per_cpu_second"] > 0
    for student in cfg["students"]:
        cells = result["summary"][student]
        assert set(cells) == set(LOSSES)
        assert cells["kd"]["relative_throughput"] == pytest.approx(1.0)
        assert all(0.0 <= c["acc_mean"] <= 1.0 for c in cells.values())


def test_teacher_and_students_learn(results: tuple[dict[str, Any], Path]) -> None:
    result, _ = results
    assert result["teacher"]["test_acc"] > 0.8  # chance is 0.1; it reaches ~0.93 on this subset
    assert all(r["test_acc"] > 0.3 for r in result["runs"])  # every recipe trains its student (0.5-0.85 here)


def test_threads_are_restored() -> None:
    before = torch.get_num_threads()
    run_benchmark(quick(losses=("scratch",), students=("mlp",), teacher_epochs=1, epochs=1), log=False)
    assert torch.get_num_threads() == before


class _NaNLoss(DistillLoss):
    def forward(self, s: torch.Tensor, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        return s.sum() * math.nan


def _broken(context: Context) -> tuple[list[DistillLoss], list[Any]]:
    return [_NaNLoss("image.logits", "image.logits", name="nan")], []


def test_a_diverging_loss_is_recorded_not_dropped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(RECIPES, "broken", _broken)
    monkeypatch.setitem(NOTES, "broken", "a loss that returns NaN")
    cfg = quick(losses=("kd", "broken"), students=("mlp",), teacher_epochs=1, epochs=1)
    result = run_benchmark(cfg, log=False)
    broken = [r for r in result["runs"] if r["loss"] == "broken"]
    assert len(broken) == 1 and broken[0]["status"] == "failed"
    assert "non-finite" in broken[0]["error"] and "nan" in broken[0]["error"]
    assert result["summary"]["mlp"]["broken"]["n_failed"] == 1
    assert "failed" in write_outputs(result, tmp_path)
    json.loads((tmp_path / "losses.json").read_text())  # strict JSON: the NaN accuracy became null

"""The BEV UniDistill benchmark end to end on a tiny corpus (2 steps), its resume, and its report's gain reading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import bench.bev as bev
from bench.bev_report import gain_verdict, markdown, paired_gain
from bench.stats import Paired, paired


def test_plan_adds_teachers_before_their_students() -> None:
    assert bev.plan(["fusion_to_lidar", "camera_alone"]) == ["camera_alone", "fusion_teacher", "fusion_to_lidar"]
    assert bev.plan(["unidistill_feature"]) == ["lidar_teacher", "unidistill_feature"]


def test_smoke_run_writes_results_and_a_rerun_skips_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bev.SMOKE_CORPUS, "n_train", 4)
    monkeypatch.setitem(bev.SMOKE_CORPUS, "n_test", 2)
    monkeypatch.setitem(bev.SMOKE_CORPUS, "azimuth_steps", 90)
    argv = ["--smoke", "--work", str(tmp_path), "--rows", "unidistill_response", "--steps", "2",
            "--teacher-steps", "2", "--device", "cpu"]
    results = bev.main(argv)
    keys = {"lidar_teacher/seed0", "unidistill_response/seed0"}
    assert set(results["runs"]) == keys
    stored = json.loads((tmp_path / "bev.json").read_text())
    for key in keys:
        metrics = stored["runs"][key]["eval"]
        assert 0.0 <= metrics["mAP"] <= 1.0 and 0.0 <= metrics["NDS"] <= 1.0
        assert set(metrics["per_class_AP"]) == {"car", "truck", "pedestrian", "cyclist"}
        assert stored["runs"][key]["train"]["steps"] == 2
    teacher = yaml_teacher(tmp_path / "configs" / "unidistill_response-seed0.yaml")
    assert teacher == str(tmp_path / "models" / "lidar_teacher-seed0")
    assert set(stored["models"]) == {"lidar", "camera"}
    report = (tmp_path / "bev.md").read_text()
    assert "SMOKE RUN" in report and "| camera + response | camera | 1 |" in report
    assert "| LiDAR teacher (LiDAR alone) | lidar | 1 |" in report and "NDS = (5 mAP" in report

    def refuse(*args: Any) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(bev.Bench, "fit", refuse)
    assert bev.main(argv)["runs"] == stored["runs"]


def yaml_teacher(path: Path) -> str:
    import yaml

    return str(yaml.safe_load(path.read_text())["model"]["teacher"]["init_args"]["model"])


def run(row: str, seed: int, mean_ap: float, nds: float) -> dict[str, Any]:
    metrics = {"mAP": mean_ap, "NDS": nds, "per_class_AP": {"car": mean_ap}}
    return {"row": row, "seed": seed, "train": {}, "eval": metrics}


RUNS = {f"{row}/seed{s}": run(row, s, m, n) for row, s, m, n in [
    ("camera_alone", 0, 0.10, 0.20), ("camera_alone", 1, 0.12, 0.22),
    ("unidistill_all", 0, 0.13, 0.22), ("unidistill_all", 1, 0.14, 0.23),
    ("lidar_teacher", 0, 0.50, 0.55), ("fusion_to_lidar", 0, 0.52, 0.56)]}


def gain(per_seed: list[float]) -> Paired:
    """A paired difference with these per-seed values (against zeros)."""
    diff = paired(dict(enumerate(per_seed)), dict.fromkeys(range(len(per_seed)), 0.0))
    assert diff is not None
    return diff


def test_paired_gain_and_its_reading() -> None:
    diff = paired_gain(RUNS, "unidistill_all", "camera_alone", "mAP")
    assert diff is not None and diff.n == 2
    assert diff.mean == pytest.approx(0.025) and diff.std == pytest.approx(0.00707, abs=1e-4)
    assert paired_gain(RUNS, "unidistill_all", "fusion_teacher", "mAP") is None
    assert "direction but below its 2.0-3.2" in gain_verdict("mAP", gain([0.5, 1.0, 1.5]))
    assert "within the paper's" in gain_verdict("mAP", gain([2.0, 2.5, 3.0]))
    assert "opposite direction" in gain_verdict("NDS", gain([-0.8, -1.0, -1.2]))
    assert "within seed noise" in gain_verdict("NDS", gain([-0.2, 0.3, 0.8]))  # mean 0.3, std 0.5


def test_report_compares_fusion_to_lidar_only_at_equal_budgets() -> None:
    config = {"data": "d", "steps": 10, "teacher_steps": 10, "seeds": [0, 1], "device": "cpu"}
    text = markdown({"config": config, "runs": RUNS})
    assert "| camera + all three | camera | 2 | 13.5 ± 0.7 | 22.5 ± 0.7 |" in text
    assert "| camera alone | +2.5 ± 0.7 | +1.5 ± 0.7 |" in text
    assert "| LiDAR teacher (LiDAR alone) | +2.0 ± 0.0 | +1.0 ± 0.0 |" in text
    assert "mAP: a gain of 2.50 points, within the paper's 2.0-3.2" in text
    text = markdown({"config": {**config, "teacher_steps": 20}, "runs": RUNS})
    assert "| fusion -> LiDAR (all three) | lidar | 1 | 52.0 ± 0.0 | 56.0 ± 0.0 | – | – | – | – | – | – |" in text


def test_diagnostics_recipes_and_their_table(tmp_path: Path) -> None:
    import argparse

    import bench.bev_diagnostics as diag
    from bench.bev_report import diagnostics_markdown

    (tmp_path / "meta.json").write_text(json.dumps({"image_size": [48, 80]}))
    args = argparse.Namespace(data=tmp_path, work=tmp_path / "work", steps=21)
    earlier = diag.recipe_config("earlier", args, tmp_path / "teacher")
    reference = diag.recipe_config("reference", args, tmp_path / "teacher")
    grid = reference["model"]["student"]["init_args"]["grid"]
    assert [loss["class_path"] for loss in earlier["model"]["losses"]] == [
        "BEVDetectionLoss", "UniDistillFeatureLoss", "UniDistillRelationLoss", "UniDistillResponseLoss"]
    assert all(loss["init_args"]["grid"] == grid for loss in earlier["model"]["losses"])
    assert earlier["model"]["losses"][3]["init_args"]["region"] == "keypoints"
    assert [loss["init_args"].get("weight") for loss in reference["model"]["losses"][1:]] == [100.0, 40.0, 10.0]
    assert reference["model"]["teacher"]["init_args"]["model"] == str(tmp_path / "teacher")
    assert reference["data"]["modalities"][0]["init_args"]["image_size"] == [48, 80]

    log = tmp_path / "metrics.csv"  # the logger repeats step 0's measurement on step 1's row: only 0 and 20 count
    log.write_text("step,train/loss,diag/detection/grad_all,diag/unidistill_feature/ratio,diag/unidistill_feature/cos_task\n"
                   "0,3.0,2.0,0.5,0.1\n1,2.9,2.0,0.5,0.1\n2,2.8,,,\n20,2.0,4.0,0.25,-0.2\n")
    measured = diag.read_diagnostics(log, every=20)
    assert measured == {"0": {"detection": {"grad_all": 2.0}, "unidistill_feature": {"ratio": 0.5, "cos_task": 0.1}},
                        "20": {"detection": {"grad_all": 4.0},
                               "unidistill_feature": {"ratio": 0.25, "cos_task": -0.2}}}
    results = {"config": {"data": "d", "scenes": 8, "teacher_steps": 2, "steps": 21, "every": 20}, "machine": {},
               "recipes": {"earlier": {"weights": {"detection": 1.0, "unidistill_feature": 1.0},
                                       "diagnostics": measured, "median_step_s": 1.5, "steps": 21, "command": "c"},
                           "reference": {"weights": {"detection": 1.0, "unidistill_feature": 100.0},
                                         "diagnostics": {}, "median_step_s": 2.0, "steps": 21, "command": "c"}}}
    report = diagnostics_markdown(results)
    assert "| unidistill_feature | 1 | 0.5 | 0.1 | 100 | – | – |" in report
    assert "| unidistill_feature | 1 | 0.25 | -0.2 |" in report and "| earlier | 1.5 | 21 | `c` |" in report


def test_a_run_of_an_edited_recipe_is_redone(tmp_path: Path) -> None:
    from typing import cast

    from bench.harness import Run

    bench = cast(bev.Bench, None)  # only a teacher's rerun looks at the bench's export folders
    run = Run("camera_alone", 0)
    current = {"camera_alone/seed0": {"recipe_sha256": bev.recipe_sha256("camera_alone")}}
    assert not bev.must_run(bench, current, ["camera_alone"], run)
    assert bev.must_run(bench, {"camera_alone/seed0": {"recipe_sha256": "0" * 64}}, ["camera_alone"], run)
    assert bev.must_run(bench, {"camera_alone/seed0": {}}, ["camera_alone"], run)  # from before the fingerprint

"""The PromptKD benchmark's run bookkeeping: finished runs are reused, and retraining a pretrained CLIP retrains
everything built on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import harness, prompt_distill
from bench.prompt_distill import STAMP, export_dir, fit, set_optimizer


def test_retraining_a_pretrained_clip_invalidates_the_later_runs(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[str] = []

    def fake_fit(argv: list[str]) -> None:  # what `xmodal fit` leaves behind: the export folder
        trained.append(Path(argv[-1]).stem)
        export_dir(Path(argv[-1])).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(harness, "xmodal", fake_fit)
    work, data = tmp_path / "work", tmp_path / "data"

    def run(name: str, lr: float | None = None) -> Path:
        return fit(name, work, data, 0, 10, (lambda c: set_optimizer(c, lr=lr)) if lr is not None else None)

    for name in (*prompt_distill.PRETRAIN, "teacher_stage1", "student_stage2"):
        run(name)
    assert trained == ["clip_teacher-seed0", "clip_student-seed0", "teacher_stage1-seed0", "student_stage2-seed0"]
    assert all((export_dir(work / "configs" / f"{n}-seed0.yaml") / STAMP).is_file() for n in
               ("clip_teacher", "teacher_stage1"))
    run("teacher_stage1")  # same config: reused
    assert len(trained) == 4
    config = run("clip_teacher", lr=1e-3)  # the teacher changes: it and everything after it train again
    assert "lr: 0.001" in config.read_text()
    run("teacher_stage1")
    run("student_stage2")
    run("clip_student")  # not built on the teacher: still reused
    assert trained[4:] == ["clip_teacher-seed0", "teacher_stage1-seed0", "student_stage2-seed0"]


def test_each_seed_trains_into_its_own_folders_and_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[str] = []

    def fake_fit(argv: list[str]) -> None:
        trained.append(Path(argv[-1]).stem)
        export_dir(Path(argv[-1])).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(harness, "xmodal", fake_fit)
    work, data = tmp_path / "work", tmp_path / "data"
    for seed in (0, 1, 0, 1):
        path = fit("student_stage2", work, data, seed, 10)
    assert trained == ["student_stage2-seed0", "student_stage2-seed1"]  # the second round reuses both
    text = path.read_text()
    assert str(work / "student_promptkd-seed1") in text and str(work / "teacher_prompted-seed1") in text
    assert str(work / "class_vectors-seed1.safetensors") in text and "seed0" not in text
    assert export_dir(path) == work / "student_promptkd-seed1"
    assert prompt_distill.per_seed("class_vectors.safetensors", 2) == "class_vectors-seed2.safetensors"

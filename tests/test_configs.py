"""Every config parses; every tiny config trains through fast_dev_run; the teacher cache matches the live teacher."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from tests.conftest import tiny_clip_args, tiny_workspace
from xmodal.commands.main import main

ROOT = Path(__file__).resolve().parent.parent
ALL_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not {"cache", "stages"} & set(p.parts))
TINY_CONFIGS = sorted((ROOT / "configs" / "tiny").glob("*.yaml"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working directory holding what the tiny configs point at, built the way a user would build it."""
    with tiny_workspace(tmp_path_factory.mktemp("workspace")) as work:
        yield work


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    student = yaml.safe_load(capsys.readouterr().out)["model"]["student"]["class_path"]
    assert student.startswith(("xmodal.students.", "xmodal.modalities.")), student  # short names resolved


def record_fits(monkeypatch: pytest.MonkeyPatch, *callbacks: L.Callback) -> list[L.Trainer]:
    """The trainers whose ``fit`` runs from now on (``main`` returns none), each given ``callbacks`` first."""
    trainers: list[L.Trainer] = []
    fit = L.Trainer.fit

    def recording_fit(self: L.Trainer, *args: Any, **kwargs: Any) -> Any:
        trainers.append(self)
        self.callbacks.extend(callbacks)  # type: ignore[attr-defined]  # set in Trainer.__init__ by a connector
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", recording_fit)
    return trainers


def assert_one_finite_step(trainers: list[L.Trainer]) -> None:
    """A single ``fit`` ran one optimiser step (fast_dev_run) and logged a finite training loss."""
    [trainer] = trainers
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda p: p.stem)
def test_tiny_config_fast_dev_run(config: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainers = record_fits(monkeypatch)
    main(["fit", "--config", str(config), "--trainer.fast_dev_run=true"])
    assert_one_finite_step(trainers)
    recipe = yaml.safe_load(config.read_text())
    logged = set(trainers[0].callback_metrics)
    if recipe["data"].get("val"):
        assert "val/loss" in logged
    if recipe["model"].get("val_metrics"):
        assert set(TASK_METRICS[config.stem]) <= logged


TASK_METRICS = {  # what each tiny recipe's val_metrics log in validation
    "clip_distill": ("val/zeroshot_top1", "val/zeroshot_top5", "val/i2t_R@1", "val/t2i_R@10"),
    "lipreading": ("val/cer", "val/wer"),
    "lipreading_mixspeech": ("val/cer", "val/wer"),
}


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_a_recipe_with_task_metrics_validates_them(config: Path) -> None:
    """``val_metrics`` log only in validation: a recipe that names them also names its val split, except those
    trained on base-class labels alone (their loss cannot score the val split's novel-class labels)."""
    recipe = yaml.safe_load(config.read_text())
    if recipe["model"].get("val_metrics") and config.relative_to(ROOT / "configs").as_posix() not in BASE_LABELS_ONLY:
        assert recipe["data"].get("val"), f"{config.name} has val_metrics but no data.val"


BASE_LABELS_ONLY = {"prompt_distill/teacher_stage1.yaml", "prompt_distill/student_labels_only.yaml"}


def test_cached_teacher_gives_the_live_loss(workspace: Path) -> None:
    from xmodal.data.wds import make_pipeline, prepare_on_device
    from xmodal.distiller import Distiller
    from xmodal.losses import FeatureCosineLoss, FeatureMSELoss
    from xmodal.modalities.image import ImageModality
    from xmodal.modalities.text import TextModality
    from xmodal.students.clip import CLIPStudent
    from xmodal.teachers.cached import CachedTeacher
    from xmodal.teachers.open_clip import OpenCLIPTeacher

    modalities = [ImageModality(16), TextModality()]
    live = OpenCLIPTeacher("local-dir:runs/tiny/clip_teacher")
    cached = CachedTeacher("runs/tiny/clip_cache/manifest.json", teacher=live)
    torch.manual_seed(3)
    student = CLIPStudent(**tiny_clip_args("runs/data/shapes-tiny/tokenizer"))
    losses = [FeatureCosineLoss("image.emb", "image.emb"), FeatureMSELoss("text.emb", "text.emb")]
    by_live = Distiller(student, losses, teacher=live)
    by_cache = Distiller(student, losses, teacher=cached)
    raw = make_pipeline("runs/data/shapes-tiny/train-*.tar", modalities, 16, train=False)
    from_cache = make_pipeline("runs/tiny/clip_cache/train-*.tar", modalities, 16, train=False)
    compared = 0
    for batch, cached_batch in zip(raw, from_cache, strict=True):
        assert batch["__key__"] == cached_batch["__key__"]
        live_total, _ = by_live.compute_losses(prepare_on_device(batch, modalities, train=False))
        cache_total, _ = by_cache.compute_losses(prepare_on_device(cached_batch, modalities, train=False))
        assert cache_total.item() == pytest.approx(live_total.item(), rel=2e-3, abs=1e-4)
        compared += 1
    assert compared == 3


def test_cache_refuses_another_teacher(workspace: Path, tmp_path: Path) -> None:
    from xmodal.students.clip import CLIPStudent, save_open_clip_dir
    from xmodal.teachers.cached import CachedTeacher, CacheMismatchError
    from xmodal.teachers.open_clip import OpenCLIPTeacher

    torch.manual_seed(99)
    other = save_open_clip_dir(CLIPStudent(**tiny_clip_args("runs/data/shapes-tiny/tokenizer")), tmp_path / "other")
    with pytest.raises(CacheMismatchError, match="weights_sha256"):
        CachedTeacher("runs/tiny/clip_cache", teacher=OpenCLIPTeacher(f"local-dir:{other}"))


def test_cache_overlay_parses_on_top_of_the_distill_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = ROOT / "configs/clip_compression/student_distill.yaml"
    overlay = ROOT / "configs/clip_compression/cache/use_cache.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "xmodal.teachers.cached.CachedTeacher" in printed and "teacher_cache/train-*.tar" in printed


CACHE_CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if "cache" in p.parts and p.name != "use_cache.yaml"
)


@pytest.mark.parametrize("config", CACHE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_cache_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: xmodal.teachers." in capsys.readouterr().out


def test_manifest_check_compares_every_field() -> None:
    from xmodal.teachers.cached import CacheMismatchError, check_manifest

    cached = {"teacher": "HFTeacher", "weights_sha256": "ab", "preprocessing": {"sample_rate": 16000}}
    check_manifest(cached, dict(cached), "cache")
    with pytest.raises(CacheMismatchError, match="preprocessing"):
        check_manifest(cached, {**cached, "preprocessing": {"sample_rate": 8000}}, "cache")
    with pytest.raises(CacheMismatchError, match="dtype"):
        check_manifest(cached, {**cached, "dtype": "bfloat16"}, "cache")


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_a_step_validation_interval_counts_global_steps(config: Path) -> None:
    """An integer ``val_check_interval`` counts batches within one epoch unless ``check_val_every_n_epoch`` is null:
    over WebDataset epochs shorter than the interval, validation (and the default checkpoint) never runs. The
    lip-reading recipes had that bug (interval 500, epochs of 150 steps)."""
    import yaml

    trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer") or {}
    interval = trainer.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool) and interval > 1:
        assert "check_val_every_n_epoch" in trainer and trainer["check_val_every_n_epoch"] is None


def test_progressive_stages_file_parses_into_stage_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from xmodal.progressive import load_stages, stage_config

    spec = load_stages(ROOT / "configs" / "clip_compression" / "stages" / "compress_progressive.yaml")
    targets = [float(stage["target"]) for stage in spec["stages"]]
    assert targets == sorted(targets, reverse=True) and all(0 < t < 1 for t in targets)
    assert all(int(stage["max_steps"]) > int(stage.get("warmup_steps", 0)) for stage in spec["stages"])
    for number, stage in enumerate(spec["stages"], start=1):  # as `xmodal compress` writes each stage's config
        config_file = tmp_path / f"stage{number}.yaml"
        config = stage_config(spec, stage, spec["teacher"], float(stage["target"]), str(tmp_path), number)
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config_file), "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["student"]["class_path"] == "xmodal.students.autoinherit.MaskedCLIP"
        assert printed["trainer"]["max_steps"] == stage["max_steps"]
        sparsity = printed["model"]["losses"][-1]
        assert sparsity["class_path"] == "xmodal.losses.sparsity.SparsityLagrangianLoss"
        assert sparsity["init_args"]["target"] == float(stage["target"])

"""Teacher-target statistics (xmodal.data.stats) against numpy, and the ``xmodal stats`` command on a tiny recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal.data.stats import FrozenStatsError, TargetStats, TeacherStats, feature_rows, load_stats

ROOT = Path(__file__).resolve().parents[1]


def masked_batches(seed: int = 0) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], np.ndarray]:
    """Three ``B x T x 5`` batches of different lengths with random masks, and their valid rows for numpy."""
    generator = torch.Generator().manual_seed(seed)
    batches, rows = [], []
    for b, t in ((4, 7), (2, 11), (3, 1)):
        x = torch.randn(b, t, 5, generator=generator) * torch.tensor([0.1, 1, 2, 5, 10]) + torch.arange(5.0)
        mask = torch.rand(b, t, generator=generator) > 0.4
        x[~mask] = 1e6  # padding: must not count
        batches.append((x, mask))
        rows.append(x[mask].double().numpy())
    return batches, np.concatenate(rows)


def test_moments_and_quantiles_equal_numpy_over_several_masked_updates() -> None:
    batches, data = masked_batches()
    stats = TargetStats()
    for x, mask in batches:
        stats.update(x, mask)
    summary = stats.to_dict()
    assert summary["count"] == len(data) and summary["dims"] == 5 and summary["quantiles_exact"]
    assert np.allclose(summary["mean"], data.mean(0)) and np.allclose(summary["std"], data.std(0))
    assert np.allclose(summary["max_abs"], np.abs(data).max(0))
    for level in ("0.01", "0.5", "0.99"):
        assert np.allclose(summary["quantiles"][level], np.quantile(data, float(level), axis=0))
    assert np.isclose(summary["mean_square"], (data**2).mean())
    energy_in_mean = (data.mean(0) ** 2).sum() / (data**2).sum(1).mean()
    assert np.isclose(summary["energy_in_mean"], energy_in_mean)


def test_a_constant_output_has_all_its_energy_in_the_mean() -> None:
    stats = TargetStats()
    stats.update(torch.tensor([[3.0, 4.0]]).expand(10, 2))
    summary = stats.to_dict()
    assert summary["energy_in_mean"] == pytest.approx(1.0) and summary["std"] == [0.0, 0.0]
    assert summary["mean_square"] == pytest.approx(12.5)


def test_quantiles_past_the_budget_come_from_a_uniform_sample() -> None:
    torch.manual_seed(0)
    data = torch.randn(20000, 2)
    stats = TargetStats(reservoir_elements=4000)  # 2000 of the 20000 vectors
    for chunk in data.split(3000):
        stats.update(chunk)
    summary = stats.to_dict()
    assert not summary["quantiles_exact"] and summary["quantile_sample"] == 2000
    assert np.allclose(summary["mean"], data.double().mean(0).numpy())  # moments stay exact
    for level in ("0.01", "0.5", "0.99"):
        true = np.quantile(data.numpy(), float(level), axis=0)
        assert np.allclose(summary["quantiles"][level], true, atol=0.15)


def test_maps_are_read_as_channel_vectors_and_scalars_per_sample_as_one_dimension() -> None:
    maps = torch.randn(2, 3, 4, 5)
    assert torch.equal(feature_rows(maps), maps.permute(0, 2, 3, 1).reshape(-1, 3))
    assert feature_rows(torch.randn(6)).shape == (6, 1)
    per_position, mask = torch.randn(2, 4), torch.tensor([[True, False, True, True], [False] * 4])
    assert torch.equal(feature_rows(per_position, mask), per_position[mask][:, None])


def test_round_trip_through_json_and_frozen_summaries(tmp_path: Path) -> None:
    batches, _ = masked_batches(1)
    teacher = TeacherStats()
    for x, mask in batches:
        teacher.update({"audio.frames": x, "audio.frames_mask": mask, "audio.ids": torch.ones(2, dtype=torch.long),
                        "logit_scale": torch.tensor(2.0)})
    assert list(teacher.keys) == ["audio.frames"]  # masks, integers and scalars are not targets
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"stats": teacher.to_dict()}))
    loaded = load_stats(path)["audio.frames"]
    live = teacher.keys["audio.frames"]
    assert torch.allclose(loaded.mean, live.mean) and torch.allclose(loaded.std, live.std)
    assert loaded.to_dict() == json.loads(json.dumps(live.to_dict()))
    with pytest.raises(FrozenStatsError):
        loaded.update(torch.zeros(1, 5))
    assert "audio.frames" in TeacherStats.from_dict({"audio.frames": live.to_dict()}).table()


def test_a_file_without_statistics_is_named(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"teacher_manifest": {}}))
    with pytest.raises(KeyError, match="xmodal stats"):
        load_stats(path)


def test_xmodal_stats_runs_a_recipes_teacher_over_n_batches(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import tiny_clip_args
    from xmodal.commands.main import main
    from xmodal.data.corpora import make_corpus
    from xmodal.students.clip import CLIPStudent, save_open_clip_dir

    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        make_corpus("shapes", "runs/data/shapes-tiny", image_size=16, n_train=48, n_val=16, n_test=16,
                    shard_size=24, progress=False)
        torch.manual_seed(0)
        save_open_clip_dir(CLIPStudent(**tiny_clip_args("runs/data/shapes-tiny/tokenizer")), "runs/tiny/clip_teacher")
        main(["stats", "--config", str(ROOT / "configs/tiny/clip_distill.yaml"), "--batches", "2",
              "--out", "stats.json", "--device", "cpu", "--data.batch_size", "4"])
        report = json.loads(Path("stats.json").read_text())
    finally:
        os.chdir(previous)
    printed = capsys.readouterr().out
    assert "image.emb" in printed and "text.emb" in printed and "in mean" in printed
    assert report["batches"] == 2 and report["split"] == "train"
    assert {key: stats["count"] for key, stats in report["stats"].items()} == {"image.emb": 8, "text.emb": 8}
    assert report["stats"]["image.emb"]["dims"] == 16

"""The lip-reading benchmark's pure helpers: mean ± std, the table, the comparison with LIBS's gains, schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.harness import rewrite, scale_schedule
from bench.lipreading_report import (
    aggregate,
    compare_with_paper,
    estimate_stage,
    markdown,
    student_table,
    summarize_log,
    teacher_table,
    training_table,
    utterance_stats,
)
from bench.report import format_pm


def run(greedy_cer: float, seen: float | None = None) -> dict:
    metrics = {"all": {"greedy_cer": greedy_cer, "greedy_wer": 2 * greedy_cer}}
    if seen is not None:
        metrics["seen"] = {"greedy_cer": seen}
    return {"eval": metrics}


RUNS = {
    "student_alone/seed0": run(0.30, seen=0.2), "student_alone/seed1": run(0.34), "student_alone/seed2": run(0.32),
    "libs_full/seed0": run(0.25), "libs_full/seed1": run(0.27), "libs_full/seed2": run(0.29),
}


def test_format_pm_shows_points() -> None:
    assert format_pm((0.2534, 0.0121)) == "25.3 ± 1.2"
    assert format_pm(None) == "–"


def test_aggregate_groups_by_method_subset_and_metric() -> None:
    table = aggregate(RUNS, ["student_alone", "libs_full", "mixspeech"])
    mean, std = table["student_alone"]["all"]["greedy_cer"]
    assert math.isclose(mean, 0.32) and math.isclose(std, 0.02)
    assert table["student_alone"]["all"]["n"] == 3
    assert table["student_alone"]["seen"] == {"n": 1, "greedy_cer": (0.2, 0.0)}
    assert "beam_cer" not in table["libs_full"]["all"]
    assert "mixspeech" not in table


def test_student_table_rows() -> None:
    rows = student_table(aggregate(RUNS, ["student_alone", "mixspeech"]), ["student_alone", "mixspeech"], "all")
    assert rows[2] == "| 1. lip reader alone | 3 | 32.0 ± 2.0 | 64.0 ± 4.0 | – | – |"
    assert rows[3] == "| 7. MixSpeech | 0 | – | – | – | – |"


def test_compare_with_paper_pairs_seeds() -> None:
    comparison = compare_with_paper(RUNS)
    gain, spread = comparison["gain_points"]
    assert comparison["seeds"] == [0, 1, 2]
    assert math.isclose(gain, 5.0) and math.isclose(spread, 2.0)  # per-seed gains 5, 7, 3 points
    assert math.isclose(comparison["paper"]["CMLR"]["ratio"], 5.0 / 7.66)
    assert math.isclose(comparison["paper"]["LRS2"]["ratio"], 5.0 / 2.75)
    low, high = comparison["ci95"]  # t(0.975, 2) = 4.303: 5 ± 4.303 * 2 / sqrt(3)
    assert math.isclose(low, 5.0 - 4.303 * 2 / math.sqrt(3)) and math.isclose(high, 5.0 + 4.303 * 2 / math.sqrt(3))
    assert comparison["verdict"].startswith("+5.00 CER points") and comparison["verdict"].endswith("a clear gain")


def test_compare_with_paper_without_pairs() -> None:
    comparison = compare_with_paper({"student_alone/seed0": run(0.3), "libs_full/seed1": run(0.2)})
    assert comparison["gain_points"] is None and comparison["verdict"].startswith("not measured")


def test_markdown_flags_smoke_runs() -> None:
    config = {"data": "d", "steps": 2, "seeds": [0], "batch_size": 4, "adapt_steps": 2, "conformer_steps": 2,
              "beam_size": 2, "device": "cpu", "smoke": True}
    text = markdown({"config": config, "runs": RUNS, "teachers": {"conformer": {"all": {"cer": 0.1, "wer": 0.2}}}},
                    ["student_alone", "libs_full"])
    assert "SMOKE RUN: not a measurement" in text
    assert "| conformer from scratch (CTC greedy) | 10.0 | 20.0 | – | – | – | – | – | – | – |" in text
    assert "| LIBS, CMLR | 7.66 | 0.65 |" in text


def test_estimate_stage_separates_overhead_from_steps() -> None:
    assert math.isclose(estimate_stage(12.0, 2, 1.0, 100, 4.0), 10.0 + 400.0)
    assert math.isclose(estimate_stage(12.0, 2, None, 100, 4.0), 600.0)


def test_scale_schedule_shrinks_warmup_and_ramp_only() -> None:
    config = {"trainer": {"max_steps": 6000, "val_check_interval": 500, "callbacks": [
        {"class_path": "MixSpeechSchedule", "init_args": {"steps": 4000, "hold": 500}}]},
        "model": {"warmup_steps": 500}}
    scale_schedule(config, 600)
    assert config["trainer"]["max_steps"] == 600 and config["model"]["warmup_steps"] == 50
    assert config["trainer"]["callbacks"][0]["init_args"] == {"steps": 400, "hold": 50}
    scale_schedule(config, 1200)  # longer than the recipe's (now 600): nothing grows
    assert config["model"]["warmup_steps"] == 50 and config["trainer"]["max_steps"] == 1200


def test_rewrite_prefers_the_longest_prefix() -> None:
    mapping = {"runs/models/whisper-tiny-en": "/zs", "runs/models/whisper-tiny-en-grid": "/ad"}
    assert rewrite({"a": ["runs/models/whisper-tiny-en-grid", "runs/models/whisper-tiny-en"]}, mapping) == {
        "a": ["/ad", "/zs"]}


def test_distilled_recipes_read_the_cached_teacher_and_the_student_alone_is_untouched(tmp_path) -> None:
    import argparse

    import yaml

    from bench.lipreading import Bench

    args = argparse.Namespace(work=tmp_path / "work", data=tmp_path / "data", device="cpu", smoke=False,
                              batch_size=None, num_workers=None, video_size=None)
    bench = Bench(args)
    bench.cache = tmp_path / "cache"
    libs = yaml.safe_load(bench.config("libs_full.yaml", "libs_full-seed0", 0, 100).read_text())
    teacher = libs["model"]["teacher"]
    assert teacher["class_path"] == "xmodal.teachers.cached.CachedTeacher"
    assert teacher["init_args"]["manifest"] == str(tmp_path / "cache" / "train")
    assert teacher["init_args"]["split_manifests"] == [str(tmp_path / "cache" / "val")]  # so a run may validate
    live = teacher["init_args"]["teacher"]
    assert live["class_path"].endswith("WhisperTeacher") and live["init_args"]["model"] == str(bench.adapted)
    assert libs["data"]["train"] == str(tmp_path / "cache" / "train" / "train-*.tar")
    assert libs["data"]["val"] == str(tmp_path / "cache" / "val" / "val-*.tar")
    alone = yaml.safe_load(bench.config("student_alone.yaml", "student_alone-seed0", 0, 100).read_text())
    assert not alone["model"].get("teacher") and alone["data"]["train"] == str(tmp_path / "data" / "train-*.tar")
    video = next(m for m in alone["data"]["modalities"] if m["class_path"].endswith("VideoModality"))
    assert video["init_args"]["size"] == bench.video_size == 64  # the recipe's, untouched


def test_video_size_reaches_training_and_evaluation(tmp_path, monkeypatch) -> None:
    import argparse

    import yaml

    import bench.lipreading as lipreading

    args = argparse.Namespace(work=tmp_path / "work", data=tmp_path / "data", device="cpu", smoke=False,
                              batch_size=None, num_workers=None, video_size=32, beam_size=2, eval_batch_size=4)
    bench = lipreading.Bench(args)
    for recipe in ("student_alone.yaml", "mixspeech.yaml", "libs_full.yaml"):
        config = yaml.safe_load(bench.config(recipe, "run", 0, 100).read_text())
        modalities = config["data"]["modalities"]
        assert [m["init_args"]["size"] for m in modalities if m["class_path"].endswith("VideoModality")] == [32]
        assert config["trainer"]["limit_val_batches"] == 0  # the test split scores the runs
        saver = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
        assert saver and saver[0]["init_args"]["save_on_train_epoch_end"]  # a checkpoint without validation
    # the teachers export their model and turn checkpointing off; Lightning refuses a checkpoint callback then
    for teacher in ("teacher_whisper_adapt.yaml", "teacher_conformer.yaml"):
        trainer = yaml.safe_load(bench.config(teacher, "run", 0, 100).read_text())["trainer"]
        assert not trainer["enable_checkpointing"]
        assert not any(c["class_path"].endswith("ModelCheckpoint") for c in trainer["callbacks"])
    calls: list[list[str]] = []

    def fake_main(argv: list[str]) -> None:
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text('{"metrics": {"greedy_cer": 0.5}}')

    monkeypatch.setattr("bench.harness.xmodal", fake_main)
    assert bench.eval_student("run", {"all": "shards-*.tar"}) == {"all": {"greedy_cer": 0.5}}
    assert calls[0][calls[0].index("--size") + 1] == "32"


def test_summarize_log_reads_the_kept_fraction_and_the_last_training_losses() -> None:
    rows = [{"step": "19", "train/libs_frame/kept_fraction": "0.5", "train/libs_context/kept_fraction": "0.75",
             "train/char_ce": "9.0"},
            {"step": "39", "train/libs_frame/kept_fraction": "1.0", "train/libs_context/kept_fraction": "",
             "train/char_ce": "3.0"},
            {"step": "49", "val/char_ce": "2.5", "val/libs_frame/kept_fraction": "0.0", "train/char_ce": ""},
            {"step": "59", "train/char_ce": "1.0"}]
    assert summarize_log(rows, last=2) == {"kept_fraction": 0.75, "final_train_char_ce": 2.0}
    assert summarize_log([{"step": "1", "train/loss": "3.0"}]) == {}


def test_training_table_averages_over_seeds() -> None:
    runs = {f"libs_full/seed{s}": {"train": {"step_s": 0.5 + s / 10}, "log": {"kept_fraction": 0.6 + s / 10,
                                                                             "final_train_char_ce": 1.0}}
            for s in range(3)}
    runs["student_alone/seed0"] = {"train": {"step_s": 0.4}, "log": {"final_train_char_ce": 2.0}}
    lines = training_table(runs, ["student_alone", "libs_full", "mixspeech"])
    assert lines[2] == "| 1. lip reader alone | 0.40 ± 0.00 | – | 2.000 ± 0.000 |"
    assert lines[3] == "| 5. full LIBS | 0.60 ± 0.10 | 70.0 ± 10.0 % | 1.000 ± 0.000 |"
    assert len(lines) == 4  # no row for a method without runs


def test_utterance_stats_separate_runaway_loops_from_poor_transcripts() -> None:
    refs = ["bin blue at f two now"] * 4
    hyps = ["bin blue at f two now", "bin blue at f two now", "bin glue at f two now",
            "bin blue at f two now " * 5]  # a decoding loop: corpus CER 1.0, yet three of four are (nearly) right
    stats = utterance_stats(refs, hyps)
    assert stats["runaway_fraction"] == 0.25
    assert math.isclose(stats["median_utterance_cer"], 0.5 / 21)  # median of 0, 0, 1/21, 88/21
    row = teacher_table({"whisper_zero_shot": {"all": {"cer": 1.0, "wer": 1.0, "utterances": 4, **stats}}})[2]
    assert row.endswith("| 4 | 2.4 | 25.0 |")
    with pytest.raises(ValueError):
        utterance_stats([], [])


def test_the_cache_check_can_leave_the_live_teacher_behind(tmp_path) -> None:
    import argparse

    import yaml

    from bench.lipreading import Bench

    args = argparse.Namespace(work=tmp_path / "work", data=tmp_path / "data", device="cuda", smoke=False,
                              batch_size=None, num_workers=None, video_size=None)
    bench = Bench(args)
    bench.cache, bench.check_cache = tmp_path / "cache", False
    teacher = yaml.safe_load(bench.config("libs_full.yaml", "run", 0, 10).read_text())["model"]["teacher"]
    assert teacher["class_path"].endswith("CachedTeacher") and teacher["init_args"]["teacher"] is None


SUFFIXES = ("mp4", "teacher.audio.cer.npy", "txt")  # in the order write_shards stores them


def write_cache_shard(path: Path, keys: list[str]) -> None:
    from xmodal.data.shards import write_shards

    samples = [{"__key__": key, **{suffix: f"{key}.{suffix}".encode() for suffix in SUFFIXES}} for key in keys]
    write_shards(samples, path.parent, path.name.partition("-")[0], max_count=len(keys))


def test_a_cache_slice_keeps_whole_samples_in_the_benchmarks_layout(tmp_path) -> None:
    import tarfile

    from bench.lipreading_steps import count_clips, make_slice

    cache = tmp_path / "cache"
    for split, n in (("train", 9), ("val", 5)):
        (cache / split).mkdir(parents=True)
        write_cache_shard(cache / split / f"{split}-000000.tar", [f"{split}{i:02d}" for i in range(n)])
        (cache / split / "manifest.json").write_text(f'{{"split": "{split}"}}')
    out = tmp_path / "slice"
    make_slice(cache, out, train=5, val=2, shards=2)
    trains = sorted((out / "train").glob("train-*.tar"))
    assert [count_clips([shard]) for shard in trains] == [3, 2]
    with tarfile.open(trains[1]) as tar:
        assert tar.getnames() == [f"train{i:02d}.{s}" for i in (3, 4) for s in SUFFIXES]
    for folder in ("train", "val"):  # the uncached recipes read val beside train; the cached ones read val/
        assert count_clips([out / folder / "val-000000.tar"]) == 2
    assert (out / "val" / "manifest.json").read_text() == '{"split": "val"}'
    assert (out / "train" / "manifest.json").read_text() == '{"split": "train"}'


def test_step_report_has_a_row_per_run(tmp_path) -> None:
    from bench.lipreading_steps import write_report

    run = {"method": "libs_full", "video_size": 64, "steps": 40, "median_step_s": 0.09, "p90_step_s": 0.1,
           "fit_wall_s": 30.0, "recipe_minutes": 9.0, "peak_gpu_mib": 1000.0}
    text = write_report({"device_name": "GPU", "torch": "2", "batch_size": 16, "steps": 40, "slice_train_clips": 24,
                         "runs": {"libs_full-64px": run}}, tmp_path / "steps").read_text()
    assert "| libs_full | 64 px | 0.0900 | 0.1000 | 9.0 | 1000 | 30.0 |" in text

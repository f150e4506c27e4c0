"""xmodal tune: search-space paths into configs, the best-config overlay, and a tiny study with a pruned trial."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from xmodal.commands.main import main
from xmodal.commands.tune import resolve_config
from xmodal.tune import (
    Param,
    SearchSpaceError,
    apply_values,
    check_paths,
    format_path,
    get_value,
    load_space,
    overlay,
    parse_path,
    redirect_outputs,
    write_overlay,
)

ROOT = Path(__file__).resolve().parent.parent
LIPREADING = ROOT / "configs" / "tiny" / "lipreading.yaml"
CONFIG = {"model": {"losses": [{"class_path": "A", "init_args": {"weight": 1.0, "keys": ["a", "b"]}},
                               {"class_path": "B"}],
                    "student": {"class_path": "S", "init_args": {"dim": 8}}},
          "trainer": {"max_steps": 2}}


@pytest.mark.parametrize(("path", "tokens"), [
    ("model.losses[1].init_args.weight", ("model", "losses", 1, "init_args", "weight")),
    ("a[0][2].b", ("a", 0, 2, "b")),
    ("trainer", ("trainer",)),
])
def test_paths_parse_and_format_back(path: str, tokens: tuple[Any, ...]) -> None:
    assert parse_path(path) == tokens
    assert format_path(tokens) == path


@pytest.mark.parametrize("path", ["", "a..b", ".a", "a.", "a[x]", "a[1]b", "a[-1]"])
def test_malformed_paths_are_refused(path: str) -> None:
    with pytest.raises(SearchSpaceError, match="malformed config path"):
        parse_path(path)


def test_values_are_read_and_set_through_lists_and_mappings() -> None:
    assert get_value(CONFIG, "model.losses[0].init_args.keys[1]") == "b"
    tuned = apply_values(CONFIG, {"model.losses[0].init_args.weight": 0.25, "model.losses[0].init_args.keys[1]": "c",
                                  "model.student.init_args.dim": 16})
    assert tuned["model"]["losses"][0]["init_args"] == {"weight": 0.25, "keys": ["a", "c"]}
    assert tuned["model"]["student"]["init_args"]["dim"] == 16
    assert CONFIG["model"]["losses"][0]["init_args"]["weight"] == 1.0  # the input is left alone


@pytest.mark.parametrize(("path", "reason"), [
    ("model.losses[2].init_args.weight", "model.losses has 2 items"),
    ("model.losses[1].init_args.weight", "model.losses\\[1\\] has no 'init_args'"),
    ("model.student[0]", "model.student is not a list"),
    ("trainer.max_steps.x", "trainer.max_steps is not a mapping"),
    ("model.lr", "model has no 'lr'"),
])
def test_unknown_paths_name_the_path_and_why(path: str, reason: str) -> None:
    with pytest.raises(SearchSpaceError, match=re.escape(f"unknown config path {path}:")):
        apply_values(CONFIG, {path: 1})
    with pytest.raises(SearchSpaceError, match=reason):
        check_paths(CONFIG, [Param(path, "float", (0.0, 1.0))])


def test_space_kinds_and_errors() -> None:
    space = load_space({"a.w": {"log_float": [0.01, 10]}, "a.n": {"int": [1, 3]},
                        "a.norm": {"categorical": ["none", "standardize"]}, "a.t": {"float": [1, 2]}})
    assert [(p.kind, p.values) for p in space] == [
        ("log_float", (0.01, 10.0)), ("int", (1, 3)), ("categorical", ("none", "standardize")), ("float", (1.0, 2.0))]
    assert space[1].grid() == [1, 2, 3] and space[2].grid() == ["none", "standardize"]
    for spec, message in [({"uniform": [0, 1]}, "expected one of"), ({"float": [2, 1]}, "low <= high"),
                          ({"log_float": [0, 1]}, "low > 0"), ({"int": [0.5, 2]}, "integers"),
                          ({"categorical": []}, "non-empty"), ({"categorical": [[1, 2]]}, "None, bool, int, float")]:
        with pytest.raises(SearchSpaceError, match=message):
            load_space({"a.w": spec})
    with pytest.raises(SearchSpaceError, match="grid"):
        space[0].grid()


def test_overlay_holds_only_tuned_values_with_lists_whole() -> None:
    values = {"model.losses[0].init_args.weight": 0.5, "model.student.init_args.dim": 4}
    written = overlay(CONFIG, values)
    assert written == {"model": {"losses": apply_values(CONFIG, values)["model"]["losses"],
                                 "student": {"class_path": "S", "init_args": {"dim": 4}}}}


def test_overlay_as_second_config_gives_the_tuned_config(tmp_path: Path) -> None:
    """``xmodal fit --config recipe.yaml --config best.yaml`` resolves to the recipe with the tuned values."""
    recipe = resolve_config(["--config", str(LIPREADING)])
    values = {"model.losses[1].init_args.weight": 0.125, "model.student.init_args.dim": 24,
              "model.losses[2].init_args.max_cer": 2.5, "trainer.max_steps": 7}
    best = write_overlay(tmp_path / "best.yaml", recipe, values, header="tuned\nby a test")
    assert best.read_text().startswith("# tuned\n# by a test\n")
    assert resolve_config(["--config", str(LIPREADING), "--config", str(best)]) == apply_values(recipe, values)


def test_a_trial_writes_logs_checkpoints_and_exports_in_its_folder(tmp_path: Path) -> None:
    """The full recipe's CSV logger and student export move into the trial folder; the config still parses."""
    recipe = resolve_config(["--config", str(ROOT / "configs" / "lipreading" / "libs_full.yaml"),
                             "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath=runs/ckpt"])
    trial = redirect_outputs(recipe, tmp_path / "trial")
    trainer = trial["trainer"]
    assert trainer["default_root_dir"] == str(tmp_path / "trial")
    assert trainer["logger"]["init_args"]["save_dir"] == str(tmp_path / "trial" / "logs")
    by_class = {callback["class_path"].rsplit(".", 1)[-1]: callback for callback in trainer["callbacks"]}
    export, checkpoint = by_class["ExportStudent"], by_class["ModelCheckpoint"]
    assert export["init_args"]["out_dir"] == str(tmp_path / "trial" / "student")
    assert checkpoint["init_args"]["dirpath"] == str(tmp_path / "trial" / "ckpt")
    assert recipe["trainer"]["logger"]["init_args"]["save_dir"] == "runs/lipreading/logs"  # the input is left alone
    assert resolve_config(trial) == trial


def tune_args(out: Path, space: Path, *extra: str) -> list[str]:
    return ["tune", "--config", str(LIPREADING), "--space", str(space), "--metric", "val/loss", "--direction",
            "minimize", "--out", str(out), *extra]


def test_an_unknown_path_stops_before_any_trial(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("model.losses[9].init_args.weight: {float: [0, 1]}\n")
    with pytest.raises(SystemExit, match=r"unknown config path model.losses\[9\].init_args.weight"):
        main(tune_args(tmp_path / "out", space))
    assert not (tmp_path / "out" / "trials").exists()
    space.write_text("model.student.init_args.dim: {categorical: [many]}\n")  # the wrong type for an int
    with pytest.raises(SystemExit, match="configuration error"):
        main(tune_args(tmp_path / "out", space))


def test_a_test_split_metric_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["tune", "--config", str(LIPREADING), "--space", "s.yaml", "--metric", "test/cer", "--direction",
              "minimize"])
    assert "test split" in capsys.readouterr().err


@pytest.fixture(scope="module")
def avsync_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xmodal.data.corpora import make_corpus

    work = tmp_path_factory.mktemp("tune")
    make_corpus("avsync", work / "runs/data/avsync-tiny", n_train=8, n_val=4, n_test=4, shard_size=4, progress=False)
    return work


def test_three_trials_one_pruned_resumable(avsync_workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A grid over the character loss's weight: at 1000 its validation loss passes the pruning threshold at the
    first validation (step 2), so that trial is pruned whatever the sampling order."""
    monkeypatch.chdir(avsync_workspace)
    space = avsync_workspace / "space.yaml"
    space.write_text("model.losses[0].init_args.weight: {categorical: [0.5, 1.0, 1000.0]}\n")
    out = avsync_workspace / "out"
    args = tune_args(out, space, "--n-trials", "3", "--sampler", "grid", "--pruner", "threshold",
                     "--prune-threshold", "100", "--", "--trainer.max_steps=2", "--trainer.num_sanity_val_steps=0",
                     "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")
    main(args)
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / "trials.csv").open()))
    states = {float(row["model.losses[0].init_args.weight"]): row["state"] for row in rows}
    assert states == {0.5: "COMPLETE", 1.0: "COMPLETE", 1000.0: "PRUNED"}
    assert "PRUNED" in printed and "3/3 finished" in printed
    best = yaml.safe_load((out / "best.yaml").read_text())
    complete = {float(row["model.losses[0].init_args.weight"]): float(row["value"]) for row in rows
                if row["state"] == "COMPLETE"}
    assert best["model"]["losses"][0]["init_args"]["weight"] == min(complete, key=complete.__getitem__)
    assert all(row["val/cer"] for row in rows if row["state"] == "COMPLETE")  # other val metrics kept per trial
    assert (out / "history.png").stat().st_size > 0
    assert (out / "importance.png").exists() or "importance.png skipped" in printed
    assert {p.name for p in (out / "trials").iterdir()} == {"0", "1", "2"}
    trial_config = yaml.safe_load((out / "trials" / "0" / "config.yaml").read_text())
    assert trial_config["trainer"]["default_root_dir"] == str(out / "trials" / "0")
    main(args)  # the study is complete: rerunning runs no trial, only writes the outputs again
    assert "starts" not in capsys.readouterr().out
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == 3
    other_metric = [*args[:6], "val/nowhere", *args[7:]]
    with pytest.raises(SystemExit, match="tunes val/loss \\(minimize\\), not val/nowhere"):
        main(other_metric)
    other_metric[other_metric.index(str(out))] = str(avsync_workspace / "out_nowhere")
    with pytest.raises(SystemExit, match="val/nowhere was not logged in validation; validation logged: .*val/cer"):
        main(other_metric)


def test_workers_see_one_gpu_each(monkeypatch: pytest.MonkeyPatch) -> None:
    from xmodal.commands.tune import gpu_environment, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]
    with gpu_environment("5"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,5"

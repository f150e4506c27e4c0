"""``xmodal tune``: search a recipe's hyperparameters with Optuna, each trial a ``xmodal fit`` run in this process.

    xmodal tune --config recipe.yaml --space space.yaml --metric val/cer --direction minimize \\
        [--n-trials N] [--timeout S] [--n-jobs J] [--storage URL] [--study-name NAME] [--out DIR] [--seed S] \\
        [--sampler tpe|random|grid] [--pruner median|hyperband|threshold|none] [--prune-threshold X] \\
        [-- extra Lightning overrides, e.g. --trainer.max_steps=2000]

The search space is described in :mod:`xmodal.tune`. The objective is a metric the recipe logs in validation
(``val/...``, read from ``trainer.callback_metrics`` after fit); the same metric feeds the pruner at every
validation. The study lives in ``<out>/study.db`` (SQLite) unless ``--storage`` names another database: rerunning
the command continues it until ``--n-trials`` trials have finished (complete or pruned), and processes on several
machines given one database URL share one study. ``--n-jobs`` runs that many worker processes here (not threads:
a Lightning fit seeds and uses process-wide state); with several GPUs, worker k sees GPU k. Each trial runs on one
device (``trainer.devices: auto`` becomes 1) unless the recipe or an override names the devices.

Outputs in ``--out``: ``best.yaml`` (the tuned values, a second ``--config`` for ``xmodal fit``), ``trials.csv``,
``history.png``, ``importance.png`` and ``trials/<n>/`` (each trial's full ``config.yaml``, its logs, checkpoints
and exports).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from xmodal.tune import Param, SearchSpaceError, apply_values, check_paths, load_space, redirect_outputs

OPTIMIZED_STATES = ("COMPLETE", "PRUNED")  # the trials that count towards --n-trials


class MetricError(ValueError):
    """The objective metric is not one validation logs."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmodal tune", description="Search a recipe's hyperparameters with Optuna; each trial is an `xmodal fit`.",
        epilog="Arguments after `--` are Lightning overrides for every trial, e.g. -- --trainer.max_steps=2000")
    parser.add_argument("--config", "-c", action="append", required=True, help="recipe YAML (repeatable)")
    parser.add_argument("--space", required=True, help="search space YAML: config path -> {kind: [...]}")
    parser.add_argument("--metric", required=True, help="a metric logged in validation, e.g. val/cer")
    parser.add_argument("--direction", required=True, choices=["minimize", "maximize"])
    parser.add_argument("--n-trials", type=int, default=20, help="finished trials the study should have (20)")
    parser.add_argument("--timeout", type=float, default=None, help="stop starting trials after S seconds")
    parser.add_argument("--n-jobs", type=int, default=1, help="worker processes sharing the study (1)")
    parser.add_argument("--storage", default=None, help="Optuna database URL (default sqlite:///<out>/study.db)")
    parser.add_argument("--study-name", default=None, help="default: the first config file's name")
    parser.add_argument("--out", default="runs/tune", help="output folder (runs/tune)")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed (0)")
    parser.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe",
                        help="tpe (default); grid takes categorical and int parameters only")
    parser.add_argument("--pruner", choices=["median", "hyperband", "threshold", "none"], default="median",
                        help="stops unpromising trials at a validation (default median, after 5 trials)")
    parser.add_argument("--prune-threshold", type=float, default=None,
                        help="with --pruner threshold: prune a trial once its metric is worse than this")
    return parser


def parse_options(argv: Sequence[str]) -> argparse.Namespace:
    args = list(argv)
    split = args.index("--") if "--" in args else len(args)
    parser = build_parser()
    options = parser.parse_args(args[:split])
    options.overrides = args[split + 1:]
    if options.metric.split("/")[0].startswith("test"):
        parser.error(f"--metric {options.metric}: tuning on the test split overfits it; use a val/ metric")
    if (options.pruner == "threshold") != (options.prune_threshold is not None):
        parser.error("--pruner threshold and --prune-threshold go together")
    if options.n_jobs < 1 or options.n_trials < 1:
        parser.error("--n-jobs and --n-trials are at least 1")
    options.out = Path(options.out)
    options.storage = options.storage or f"sqlite:///{(options.out / 'study.db').resolve()}"
    options.study_name = options.study_name or Path(options.config[0]).stem
    return options


@contextmanager
def config_errors(files: Sequence[str]) -> Iterator[None]:
    """Configuration errors as ``xmodal fit`` words them: the config files named, exit status 2."""
    from xmodal.distiller import ConfigKeyError

    where = ", ".join(files)
    try:
        yield
    except (ConfigKeyError, SearchSpaceError) as error:
        raise SystemExit(f"xmodal tune: configuration error in {where}: {error}") from error
    except Exception as error:
        if type(error).__name__ == "ArgumentError":
            raise SystemExit(f"xmodal tune: configuration error in {where}: {error}") from error
        raise


def lightning_cli(args: list[str] | dict[str, Any], instantiate: bool) -> Any:
    """``xmodal fit``'s CLI without running it (``run=False``); with ``instantiate=False`` it only parses.

    ``args`` is copied, because jsonargparse edits a dict it parses.
    """
    from xmodal.commands.lightning import XmodalCLI
    from xmodal.data.wds import WdsDataModule
    from xmodal.distiller import Distiller
    from xmodal.plugins import load_plugins

    class ParseOnly(XmodalCLI):
        def instantiate_classes(self) -> None:
            pass

        def after_instantiate_classes(self) -> None:
            pass

    load_plugins()
    return (XmodalCLI if instantiate else ParseOnly)(
        Distiller, WdsDataModule, args=copy.deepcopy(args), run=False, seed_everything_default=0,
        parser_kwargs={"exit_on_error": False}, save_config_callback=None, auto_configure_optimizers=False)


def resolve_config(args: list[str] | dict[str, Any]) -> dict[str, Any]:
    """The full config (defaults included) that ``xmodal fit`` would run, as plain YAML data."""
    cli = lightning_cli(args, instantiate=False)
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    config.pop("config", None)
    return config


def base_config(options: argparse.Namespace, params: Sequence[Param]) -> dict[str, Any]:
    """The recipe with the overrides; every searched path checked to exist and to take a value of its space."""
    args = [arg for file in options.config for arg in ("--config", file)] + list(options.overrides)
    with config_errors(options.config):
        config = resolve_config(args)
        check_paths(config, params)
        resolve_config(apply_values(config, {p.path: p.example() for p in params}))
    if config["trainer"].get("devices") in ("auto", None):
        config["trainer"]["devices"] = 1  # "auto" on several GPUs would launch DDP processes that rerun `xmodal tune`
    return config


def run_trial(config: dict[str, Any], trial_dir: Path, callbacks: Sequence[Any]) -> dict[str, float]:
    """Fit ``config`` as ``xmodal fit`` would, its logs, checkpoints and exports under ``trial_dir`` (see
    :func:`~xmodal.tune.redirect_outputs`); the metrics it logged."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    config = redirect_outputs(config, trial_dir)
    (trial_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cli = lightning_cli(config, instantiate=True)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {name: float(value) for name, value in cli.trainer.callback_metrics.items() if value.numel() == 1}


def pruning_callback(trial: Any, metric: str) -> Any:
    """Optuna's Lightning pruning callback, reporting at the global step: validation may run several times an
    epoch (``val_check_interval``), and Optuna keeps only the first value reported for a step."""
    from optuna_integration import PyTorchLightningPruningCallback

    class StepPruningCallback(PyTorchLightningPruningCallback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking or self.is_ddp_backend or self.monitor not in trainer.callback_metrics:
                super().on_validation_end(trainer, pl_module)
                return
            self._trial.report(float(trainer.callback_metrics[self.monitor]), step=trainer.global_step)
            if self._trial.should_prune():
                import optuna

                raise optuna.TrialPruned(f"pruned at step {trainer.global_step}")

    return StepPruningCallback(trial, monitor=metric)


def make_objective(options: argparse.Namespace, params: Sequence[Param], config: dict[str, Any]) -> Any:
    def objective(trial: Any) -> float:
        values = {param.path: param.suggest(trial) for param in params}
        print(f"[tune] trial {trial.number} starts: {values}", flush=True)
        logged = run_trial(apply_values(config, values), options.out / "trials" / str(trial.number),
                           [pruning_callback(trial, options.metric)])
        for name, value in logged.items():
            if name.startswith("val/"):
                trial.set_user_attr(name, value)
        if options.metric not in logged:
            known = ", ".join(sorted(n for n in logged if n.startswith("val"))) or "none (is there a val split?)"
            raise MetricError(f"--metric {options.metric} was not logged in validation; validation logged: {known}")
        return logged[options.metric]

    return objective


def make_sampler(options: argparse.Namespace, params: Sequence[Param], worker: int) -> Any:
    import optuna

    seed = options.seed + worker  # workers sampling alike would repeat each other's trials
    if options.sampler == "grid":
        with config_errors(options.config):
            return optuna.samplers.GridSampler({p.path: p.grid() for p in params}, seed=seed)
    if options.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(options: argparse.Namespace) -> Any:
    import optuna

    if options.pruner == "threshold":
        bound = "upper" if options.direction == "minimize" else "lower"
        return optuna.pruners.ThresholdPruner(**{bound: options.prune_threshold})
    if options.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if options.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5)
    return optuna.pruners.NopPruner()


def quiet_optuna() -> None:
    """Our own per-trial lines replace Optuna's; its experimental-feature warnings (heartbeat, plots) are noise."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def load_study(options: argparse.Namespace, params: Sequence[Param], worker: int = 0) -> Any:
    """The study in ``options.storage`` (created when new); refuses one that optimises another metric."""
    import optuna

    quiet_optuna()
    storage = optuna.storages.RDBStorage(options.storage, heartbeat_interval=60, grace_period=180)
    study = optuna.create_study(
        storage=storage, study_name=options.study_name, direction=options.direction, load_if_exists=True,
        sampler=make_sampler(options, params, worker), pruner=make_pruner(options))
    study.set_user_attr("metric", study.user_attrs.get("metric", options.metric))
    wanted = (options.metric, options.direction)
    found = (study.user_attrs["metric"], study.direction.name.lower())
    if found != wanted:
        raise SystemExit(f"xmodal tune: study {options.study_name!r} in {options.storage} tunes {found[0]} "
                         f"({found[1]}), not {wanted[0]} ({wanted[1]}): give another --study-name")
    return study


def finished(study: Any) -> int:
    return sum(trial.state.name in OPTIMIZED_STATES for trial in study.get_trials(deepcopy=False))


def progress(options: argparse.Namespace) -> Any:
    """An Optuna callback printing each finished trial, the best so far and the count."""

    def report(study: Any, trial: Any) -> None:
        value = "" if trial.value is None else f" {options.metric}={trial.value:.4g}"
        try:
            best = f"best {study.best_value:.4g} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        print(f"[tune] trial {trial.number} {trial.state.name}{value} in {seconds:.0f} s; {best}; "
              f"{finished(study)}/{options.n_trials} finished", flush=True)

    return report


def optimize(options: argparse.Namespace, worker: int = 0) -> None:
    """Run trials until the study has ``--n-trials`` finished ones or ``--timeout`` passes (one worker)."""
    import optuna

    from xmodal.distiller import NonFiniteLossError

    params = load_space(options.space)
    config = base_config(options, params)
    study = load_study(options, params, worker)
    remaining = options.n_trials - finished(study)
    if remaining <= 0:
        return
    stop = optuna.study.MaxTrialsCallback(options.n_trials, states=(optuna.trial.TrialState.COMPLETE,
                                                                    optuna.trial.TrialState.PRUNED))
    study.optimize(make_objective(options, params, config), n_trials=remaining, timeout=options.timeout,
                   callbacks=[stop, progress(options)], gc_after_trial=True,
                   catch=(NonFiniteLossError,))  # a diverging trial fails alone; any other error stops the study


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` names them."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu for gpu in listed.split(",") if gpu.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


@contextmanager
def gpu_environment(gpu: str | None) -> Iterator[None]:
    """``CUDA_VISIBLE_DEVICES=gpu`` meanwhile (a spawned worker inherits it), unless ``gpu`` is None."""
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


def optimize_in_processes(options: argparse.Namespace) -> None:
    """``--n-jobs`` worker processes (spawned: a fork would copy Lightning's and CUDA's state) on one study; with
    several GPUs, worker k sees GPU k (round robin)."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=optimize, args=(options, worker)) for worker in range(options.n_jobs)]
    gpus = visible_gpus()
    for number, worker in enumerate(workers):
        with gpu_environment(gpus[number % len(gpus)] if gpus else None):
            worker.start()
    for worker in workers:
        worker.join()
    failed = [str(n) for n, worker in enumerate(workers) if worker.exitcode != 0]
    if failed:
        print(f"[tune] worker(s) {', '.join(failed)} failed; see their messages above", file=sys.stderr)


def write_outputs(options: argparse.Namespace, params: Sequence[Param], config: dict[str, Any]) -> None:
    """best.yaml, trials.csv, the printed trials table and the plots."""
    from xmodal.tune import format_table, save_plots, trial_rows, write_csv, write_overlay

    study = load_study(options, params)
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for trial in trials for name in trial.params})
    rows = trial_rows(trials, names)
    extras = sorted({name for trial in trials for name in trial.user_attrs})
    write_csv(options.out / "trials.csv", [{**row, **{n: t.user_attrs.get(n) for n in extras}}
                                           for row, t in zip(rows, trials, strict=True)])
    print(f"[tune] study {options.study_name} in {options.storage}: value = {options.metric} ({options.direction})")
    print(format_table(rows))
    if any(trial.state.name == "COMPLETE" for trial in trials):
        best = study.best_trial
        header = (f"xmodal tune: study {options.study_name}, trial {best.number}: {options.metric}={best.value:.6g} "
                  f"({options.direction})\nuse: xmodal fit --config {' --config '.join(options.config)} "
                  f"--config {options.out / 'best.yaml'}")
        write_overlay(options.out / "best.yaml", config, best.params, header)
        print(f"[tune] best: trial {best.number}, {options.metric}={best.value:.6g}; {options.out / 'best.yaml'}")
    for note in save_plots(study, options.out):
        print(f"[tune] {note}")
    print(f"[tune] trials.csv and plots in {options.out}")


def tune_main(argv: Sequence[str]) -> None:
    options = parse_options(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    if not Path(options.space).is_file():
        raise SystemExit(f"xmodal tune: no search space file {options.space}")
    with config_errors([options.space]):
        params = load_space(options.space)
    config = base_config(options, params)  # errors in the recipe or the space, before any trial
    load_study(options, params)  # created once here, so that workers only load it
    start = time.monotonic()
    if options.n_jobs == 1:
        try:
            optimize(options)
        except MetricError as error:
            raise SystemExit(f"xmodal tune: {error}") from error
    else:
        optimize_in_processes(options)
    print(f"[tune] {time.monotonic() - start:.0f} s")
    write_outputs(options, params, config)

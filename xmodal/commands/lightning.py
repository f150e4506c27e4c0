"""``xmodal fit|validate|test|predict --config recipe.yaml``: Lightning's CLI over the Distiller and the DataModule.

Students, teachers, losses and modalities are chosen by ``class_path``; short class names work for every plug-in
:func:`xmodal.plugins.load_plugins` imports.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from xmodal.callbacks import DEFAULT_DIAGNOSE_EVERY, GradientDiagnostics
from xmodal.data.wds import WdsDataModule
from xmodal.distiller import ConfigKeyError, Distiller
from xmodal.plugins import load_plugins

DESCRIPTION = "Lightning's training verbs over an xmodal recipe; `xmodal --help` lists every verb."


class StepBudgetRichBar(RichProgressBar):
    """Lightning's rich bar for a run budgeted in steps: optimizer steps out of ``max_steps``, where the stock bar
    counts each epoch's batches under the title ``Epoch 0/-2`` (``max_epochs: -1``)."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{f'Step (epoch {current_epoch})':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class StepBudgetTQDMBar(TQDMProgressBar):
    """Lightning's tqdm bar for a run budgeted in steps (see :class:`StepBudgetRichBar`)."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Step (epoch {trainer.current_epoch})")
        self.train_progress_bar.n = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._should_update(trainer.global_step, self.train_progress_bar.total):
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
            self.train_progress_bar.refresh()


def count_steps_in_progress_bar(trainer: Any) -> None:
    """Swap Lightning's default bar for its step-counting subclass when the run is budgeted in steps."""
    steps_bar = {RichProgressBar: StepBudgetRichBar, TQDMProgressBar: StepBudgetTQDMBar}
    for i, callback in enumerate(trainer.callbacks):
        if trainer.max_steps > 0 and type(callback) in steps_bar:  # a stock bar (the default), not a subclass
            trainer.callbacks[i] = steps_bar[type(callback)]()


def drop_lr_monitor_without_logger(trainer: Any) -> None:
    """A recipe's ``LearningRateMonitor`` has nothing to write to under ``--trainer.logger=false`` (Lightning would
    stop the run at its start): it is left out, with a note."""
    if trainer.loggers:
        return
    kept = [callback for callback in trainer.callbacks if not isinstance(callback, LearningRateMonitor)]
    if len(kept) < len(trainer.callbacks):
        rank_zero_info("xmodal: no logger, so the recipe's LearningRateMonitor is left out")
        trainer.callbacks = kept


class XmodalCLI(LightningCLI):
    """LightningCLI with xmodal's defaults; ``seed_everything`` is on by default for reproducible runs.

    Checkpoints go through :class:`~xmodal.checkpoint.SafeCheckpointIO` (a damaged checkpoint gives a clear error)
    unless the config chooses another ``CheckpointIO`` plugin. ``--diagnose[=K]`` adds a
    :class:`~xmodal.callbacks.GradientDiagnostics` callback (every ``K`` steps) to the trainer.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--diagnose", type=int | None, nargs="?", const=DEFAULT_DIAGNOSE_EVERY, default=None, metavar="K",
            help="fit: print each loss term's gradient norm per part of the student, its ratio to the task loss's "
                 "and their cosine at the start, and log them every K steps (--diagnose=K; "
                 f"--diagnose: every {DEFAULT_DIAGNOSE_EVERY})")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        from xmodal.checkpoint import SafeCheckpointIO

        trainer = super().instantiate_trainer(**kwargs)
        count_steps_in_progress_bar(trainer)
        drop_lr_monitor_without_logger(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        every = self._get(self.config_init, "diagnose")
        if every:
            trainer.callbacks.append(GradientDiagnostics(every_n_steps=every))  # type: ignore[attr-defined]
        return trainer

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``--ckpt_path`` itself (for hyperparameters) before the trainer exists: same error."""
        from xmodal.checkpoint import CorruptCheckpointError, corrupt_message

        try:
            super()._parse_ckpt_path()
        except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as error:
            if isinstance(error, FileNotFoundError | CorruptCheckpointError):
                raise
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise CorruptCheckpointError(corrupt_message(Path(path), error)) from error


def config_files(argv: Sequence[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def run_lightning(argv: Sequence[str]) -> None:
    """Run a Lightning verb; configuration errors name the config file(s) and exit with status 2."""
    files = ", ".join(config_files(argv)) or "the command line"
    load_plugins()
    try:
        XmodalCLI(
            Distiller, WdsDataModule, args=list(argv), seed_everything_default=0,
            parser_kwargs={"exit_on_error": False, "description": DESCRIPTION}, save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except ConfigKeyError as error:
        raise SystemExit(f"xmodal: configuration error in {files}: {error}") from error
    except FileNotFoundError as error:
        raise SystemExit(f"xmodal: a file named in {files} is missing: {error}") from error
    except Exception as error:
        if type(error).__name__ == "ArgumentError":
            raise SystemExit(f"xmodal: configuration error in {files}: {error}") from error
        raise

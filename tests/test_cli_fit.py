"""``xmodal fit`` as a user sees it: a step-budgeted run counts steps in its progress bar, and a run without a
validation split sets up no validation loop (so it does not warn about an empty one)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L

from tests.test_loggers import tiny_config
from xmodal.commands.lightning import StepBudgetRichBar, StepBudgetTQDMBar
from xmodal.commands.main import main


class BarReader(L.Callback):
    """After each training batch: the train bar's (description, completed, total)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        bar = trainer.progress_bar_callback
        if isinstance(bar, StepBudgetRichBar):
            task = next(t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id)  # type: ignore[union-attr]
            self.seen.append((task.description, task.completed, task.total or 0))
        elif isinstance(bar, StepBudgetTQDMBar):
            tqdm = bar.train_progress_bar
            self.seen.append((tqdm.desc, tqdm.n, tqdm.total))


def test_step_budget_shows_steps_and_no_empty_validation_warning(shapes_dir: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    reader = BarReader()
    # 64 training samples in batches of 16: the 6-step budget spans two epochs
    config = tiny_config(tmp_path / "fit.yaml", shapes_dir, steps=6, logger=False, enable_progress_bar=True,
                         callbacks=[])
    fit = L.Trainer.fit

    def fit_with_reader(self: L.Trainer, *args: Any, **kwargs: Any) -> Any:
        self.callbacks.append(reader)  # type: ignore[attr-defined]
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit_with_reader)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", str(config)])
    assert not [w for w in caught if "across ranks is zero" in str(w.message)]
    assert [(completed, total) for _, completed, total in reader.seen] == [(step, 6) for step in range(1, 7)]
    assert all(description.startswith("Step") and "/-" not in description for description, _, _ in reader.seen)

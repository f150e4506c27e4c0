"""The benchmark harness: recipes run through the ``xmodal`` console entry with rewritten configs, a declarative list
of runs (method, seed, step budget) that resumes from the results JSON, corpora built once, step timing and the
machine's facts. Each benchmark (``bench/<name>.py``) is a spec on top of this: its runs, its config overrides and
what it measures; :mod:`bench.stats` and :mod:`bench.report` hold the statistics, tables and plots they share.

The xmodal library is reached from here only: :func:`xmodal` (the console script, every verb) and
:func:`ensure_corpus` (corpus options the ``data make`` verb does not take).
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from bench.stats import run_key

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
RESULTS = ROOT / "bench" / "results"
XMODAL_MAIN = "xmodal.commands.main"  # the module of the `xmodal` console script (pyproject's [project.scripts])


def xmodal(argv: Sequence[str]) -> None:
    """Run one ``xmodal`` command in this process: ``xmodal(["fit", "--config", path])``."""
    importlib.import_module(XMODAL_MAIN).main(list(argv))


def xmodal_command(argv: Sequence[str]) -> list[str]:
    """The same command as a subprocess's argument list (for timing or memory measurement from outside)."""
    return [sys.executable, "-c", f"from {XMODAL_MAIN} import main; main()", *argv]


def fit(config: Path) -> float:
    """``xmodal fit --config config``; returns the wall seconds."""
    start = time.perf_counter()
    xmodal(["fit", "--config", str(config)])
    return time.perf_counter() - start


def rewrite(value: Any, mapping: Mapping[str, str]) -> Any:
    """Replace path prefixes in every string of a nested config (one pass, longest prefix first)."""
    if isinstance(value, str) and mapping:
        pattern = "|".join(re.escape(old) for old in sorted(mapping, key=len, reverse=True))
        return re.sub(pattern, lambda match: mapping[match.group()], value)
    if isinstance(value, dict):
        return {k: rewrite(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [rewrite(v, mapping) for v in value]
    return value


def load_recipe(path: Path, mapping: Mapping[str, str]) -> dict[str, Any]:
    """A recipe's YAML with its default paths rewritten (:func:`rewrite`)."""
    return dict(rewrite(yaml.safe_load(path.read_text()), mapping))


def write_config(config: Mapping[str, Any], path: Path) -> Path:
    """Write a run's config (key order kept) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


def scheduler_args(model: dict[str, Any]) -> dict[str, Any]:
    """Where a recipe's ``warmup_steps`` lives: its scheduler's ``init_args`` (``scheduler: {class_path: ...}``), or
    the model itself (the old ``scheduler: cosine`` form)."""
    scheduler = model.get("scheduler")
    return scheduler.setdefault("init_args", {}) if isinstance(scheduler, dict) else model


def scale_schedule(config: dict[str, Any], steps: int) -> None:
    """Set ``max_steps`` and shrink the warm-up and MixSpeech ramp in proportion when ``steps`` is below the
    recipe's own budget (never grown: a longer run keeps the recipe's warm-up and ramp)."""
    trainer = config["trainer"]
    scale = min(1.0, steps / int(trainer["max_steps"]))
    trainer["max_steps"] = steps
    trainer["val_check_interval"] = min(int(trainer.get("val_check_interval", steps)), steps)
    args = scheduler_args(config["model"])
    if "warmup_steps" in args:
        args["warmup_steps"] = int(round(int(args["warmup_steps"]) * scale))
    for callback in trainer.get("callbacks", []):
        if callback["class_path"].endswith("MixSpeechSchedule"):
            args = callback["init_args"]
            args["steps"] = max(1, int(round(args["steps"] * scale)))
            args["hold"] = int(round(args.get("hold", 0) * scale))


class StepTimer(L.Callback):
    """Record each training batch's wall seconds and write ``{"steps", "median_step_s", "step_s"}`` at fit end
    (the median leaves out the first step)."""

    def __init__(self, out_json: str) -> None:
        self.out_json, self._start = Path(out_json), 0.0
        self.times: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_json.parent.mkdir(parents=True, exist_ok=True)
        settled = self.times[1:] or self.times  # the first step carries one-off warm-up costs
        median = statistics.median(settled) if settled else None
        self.out_json.write_text(json.dumps({"steps": len(self.times), "median_step_s": median,
                                             "step_s": self.times}))


def step_timer(out_json: Path) -> dict[str, Any]:
    """The config entry of a :class:`StepTimer` callback writing ``out_json``."""
    return {"class_path": f"{StepTimer.__module__}.{StepTimer.__name__}", "init_args": {"out_json": str(out_json)}}


def ensure_corpus(name: str, out: Path, *, accept: Callable[[dict[str, Any]], bool] | None = None,
                  **options: Any) -> None:
    """Build corpus ``name`` in ``out`` (``make_corpus(name, out, **options)``) unless its ``meta.json`` is there
    and ``accept(meta)`` holds."""
    meta = out / "meta.json"
    if meta.is_file() and (accept is None or accept(json.loads(meta.read_text()))):
        return
    from xmodal.data.corpora import make_corpus

    print(f"[bench] building {name} in {out}")
    make_corpus(name, out, **options)


@dataclass(frozen=True)
class Run:
    """One entry of a benchmark's plan: a method's recipe trained with one seed for a step budget."""

    method: str
    seed: int
    recipe: str = ""  # the recipe's config file, relative to the benchmark's configs folder
    steps: int = 0  # optimizer steps

    @property
    def key(self) -> str:
        """Its key in the results JSON: ``"kd/seed3"``."""
        return run_key(self.method, self.seed)

    @property
    def name(self) -> str:
        """Its folder and config name: ``"kd-seed3"``."""
        return f"{self.method}-seed{self.seed}"


def plan(recipes: Mapping[str, str], seeds: Iterable[int], steps: int | Mapping[str, int],
         seed_major: bool = False) -> list[Run]:
    """Every method (``{method: recipe}``) x seed at its step budget (one for all, or per method), method by method
    (``seed_major``: seed by seed, so that an interrupted benchmark leaves every method with the same seeds done)."""
    seeds = list(seeds)
    budget = steps if isinstance(steps, Mapping) else dict.fromkeys(recipes, steps)
    pairs = [(m, s) for s in seeds for m in recipes] if seed_major else [(m, s) for m in recipes for s in seeds]
    return [Run(method, seed, recipes[method], budget[method]) for method, seed in pairs]


def run_pending(runs: Iterable[Run], done: MutableMapping[str, Any], execute: Callable[[Run], Any],
                save: Callable[[], None], pending: Callable[[Run], bool] | None = None) -> None:
    """Execute each run whose key is not in ``done`` (or for which ``pending`` says so), store its result under its
    key and ``save`` after each: an interrupted benchmark resumes where it stopped."""
    for run in runs:
        if not (pending(run) if pending is not None else run.key not in done):
            continue
        print(f"[bench] {run.key}")
        done[run.key] = execute(run)
        save()


def resume(path: Path, same: Callable[[dict[str, Any]], bool], keep: Sequence[str]) -> dict[str, Any]:
    """The parts ``keep`` of an earlier results JSON at ``path`` when ``same(previous)`` (same budget and data),
    else ``{}``."""
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    if not same(previous):
        print(f"[bench] {path} has another budget or corpus: starting afresh")
        return {}
    return {k: previous.get(k, {}) for k in keep}


def save_json(results: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info() -> dict[str, Any]:
    """Versions, threads, CPUs, start date and load average, for the JSON."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(), "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}

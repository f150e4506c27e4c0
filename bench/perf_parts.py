"""Pieces of ``bench/perf.py``: pure arithmetic and formatting (unit-tested), clocks, and timing harnesses.

The pure helpers (:func:`break_even_epochs`, :func:`parse_max_rss_kb`, :func:`ratio`, :func:`markdown_report`...)
take and return plain numbers and dicts. The harnesses time one side of a comparison: :func:`time_fit` runs
``Trainer.fit`` on a :class:`~xmodal.distiller.Distiller` over in-memory batches, :func:`time_plain_loop` runs the
hand-written PyTorch loop on the same batches, and :func:`time_calls` times a no-argument callable.
"""

from __future__ import annotations

import gc
import math
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bench.report import fmt, md_table
from xmodal.data.wds import move_batch

Batch = dict[str, Any]


# ---------------------------------------------------------------- pure helpers
def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (``nan`` when empty)."""
    return float(statistics.median(values)) if values else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; ``nan`` when the denominator is 0 or not finite."""
    if not denominator or not math.isfinite(denominator):
        return math.nan
    return numerator / denominator


def per_step_ms(stamps: Sequence[float], warmup: int) -> float:
    """Mean ms per step from end-of-step clock readings ``stamps`` (seconds), ignoring the first ``warmup`` steps.

    The interval runs from the end of step ``warmup - 1`` to the end of the last step, so it covers exactly
    ``len(stamps) - warmup`` full iterations (fetch, transfer, hooks, forward, backward, optimizer and scheduler).
    """
    if warmup < 1 or len(stamps) <= warmup:
        raise ValueError(f"need more than warmup={warmup} (>= 1) steps, got {len(stamps)}")
    return 1000.0 * (stamps[-1] - stamps[warmup - 1]) / (len(stamps) - warmup)


def break_even_epochs(build_s: float, live_epoch_s: float, cached_epoch_s: float) -> float | None:
    """Epochs after which building the cache once has paid for itself: ``build / (live - cached)``.

    Returns ``None`` ("never") when an epoch from the cache is not faster than one with the live teacher.
    """
    saving = live_epoch_s - cached_epoch_s
    if saving <= 0:
        return None
    return build_s / saving


def format_break_even(epochs: float | None) -> str:
    """``"never"`` for ``None``, else the epochs rounded up to a whole number with the exact value beside it."""
    if epochs is None:
        return "never (cached epochs are not faster)"
    return f"{math.ceil(epochs)} epochs ({epochs:.2f})"


def parse_max_rss_kb(time_v_output: str) -> int | None:
    """The ``Maximum resident set size (kbytes)`` that GNU ``/usr/bin/time -v`` prints, or ``None``."""
    match = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", time_v_output)
    return int(match.group(1)) if match else None


def markdown_report(results: dict[str, Any]) -> str:
    """The ``perf.md`` page: machine facts, one table per measured section, and the plain reading."""
    m = results["machine"]
    parts = [f"# xmodal performance ({results['mode']}, {results['date']})",
             f"{m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads, device {m['device']}."]
    if "overhead" in results:
        o = results["overhead"]
        parts += ["## 1. Framework overhead (CLIP pair, ms/step, median of repeats)",
                  md_table(["xmodal (Trainer.fit)", "plain PyTorch loop", "ratio", "target"],
                           [[o["xmodal_ms"], o["plain_ms"], f"{o['ratio']:.3f}x", "<= 1.05x"]])]
    if "cache" in results:
        c = results["cache"]
        parts += ["## 2. Teacher cache (CLIP pair, one epoch through WdsDataModule, s)",
                  md_table(["live-teacher epoch", "cache build (once)", "cached epoch", "break-even"],
                           [[c["live_epoch_s"], c["build_s"], c["cached_epoch_s"],
                             format_break_even(c["break_even"])]])]
    if "loader" in results:
        rows = [[name, r["batch_size"], *[r["workers"].get(str(w), {}).get("samples_per_s") for w in (0, 1, 2)],
                 f"{fmt(r['workers'].get(str(r.get('config_workers')), {}).get('samples_per_s', '-'))} "
                 f"({r.get('config_workers')})", r.get("step_samples_per_s"), r.get("verdict", "-")]
                for name, r in results["loader"].items()]
        parts += ["## 3. Data loading (samples/s)",
                  md_table(["recipe", "batch", "0 workers", "1 worker", "2 workers", "config's workers (count)",
                            "training step", "loader"], rows)]
    if "latency" in results:
        parts += ["## 4. Student against teacher (inference, median ms per batch)", latency_table(results["latency"])]
    if "memory" in results:
        rows = [[name, r.get("max_rss_mb"), r.get("steps"), r.get("note", "")] for name, r in results["memory"].items()]
        parts += ["## 5. Peak RSS of each default training run (MB, /usr/bin/time -v)",
                  md_table(["recipe", "peak RSS MB", "steps", "note"], rows)]
    parts += ["## Reading", "\n".join(f"- {line}" for line in results.get("reading", []))]
    return "\n\n".join(parts) + "\n"


def reading(results: dict[str, Any]) -> list[str]:
    """The plain-language lines under the tables."""
    lines = []
    if "overhead" in results:
        o = results["overhead"]
        verdict = "within" if o["ratio"] <= 1.05 else "ABOVE"
        lines.append(f"xmodal's step costs {o['ratio']:.3f}x the hand-written loop's ({verdict} the 1.05x target).")
    if "cache" in results:
        c = results["cache"]
        lines.append(f"The cache ({c['cache_dtype']}) pays for its build after {format_break_even(c['break_even'])}"
                     f"; reading it costs {c['read_only_epoch_s']['cache']:.2f} s/epoch against "
                     f"{c['read_only_epoch_s']['source']:.2f} s for the source shards. Top-k logits option: "
                     f"{'yes' if c['top_k_logits_option'] else 'not offered'}.")
    if "loader_in_epoch" in results:
        e = results["loader_in_epoch"]
        lines.append(f"CLIP: an epoch through the real loader took {e['ratio']:.2f}x its {e['steps']} in-memory steps "
                     f"({e['epoch_s']:.2f} s against {e['in_memory_steps_s']:.2f} s).")
    for name, row in results.get("loader", {}).items():
        lines.append(f"{name}: the loader {row['verdict'].lower()} with the config's {row['config_workers']} workers.")
    for name, pair in results.get("latency", {}).items():
        if "skipped" not in pair:
            cpu = pair["ms"]["cpu"]
            speedups = ", ".join(f"{ratio(c['teacher'], c['student']):.1f}x at batch {b}" for b, c in cpu.items())
            size = ratio(pair["teacher_params"], pair["student_params"])
            lines.append(f"{name}: the student has {size:.1f}x fewer parameters; CPU speed-up {speedups}.")
    memory = results.get("memory", {})
    base = memory.get("imports only (baseline)", {}).get("max_rss_mb")
    for name, row in memory.items():
        if base and row.get("max_rss_mb") and row.get("steps"):
            lines.append(f"{name}: peak RSS {row['max_rss_mb']:.0f} MB, {row['max_rss_mb'] - base:.0f} MB above the "
                         "imports alone.")
    lines.append("Peak RSS is GNU time's maximum over the main process and each worker separately, not their sum.")
    lines += results.get("notes", [])
    if results["mode"] == "smoke":
        lines.insert(0, "SMOKE RUN: tiny sizes on a busy machine; these numbers are not a measurement.")
    return lines



def latency_table(latency: dict[str, Any]) -> str:
    """Rows: recipe x device x batch size, teacher and student ms and their ratio."""
    rows = []
    for name, pair in latency.items():
        if "skipped" in pair:
            rows.append([name, "-", "-", "-", "-", "-", "-", "-", pair["skipped"]])
            continue
        for device, by_batch in pair["ms"].items():
            for batch, cell in by_batch.items():
                rows.append([name, pair["teacher_params"], pair["student_params"], device, batch, cell["teacher"],
                             cell["student"], f"{ratio(cell['teacher'], cell['student']):.1f}x", pair.get("note", "")])
    return md_table(["recipe", "teacher params", "student params", "device", "batch", "teacher ms", "student ms",
                     "speed-up", "note"], rows)


# ---------------------------------------------------------------- batches
def slice_batch(batch: Batch, n: int) -> Batch:
    """The first ``n`` samples of a batch (tensors and lists with a leading batch dimension)."""
    return {k: v[:n] if isinstance(v, Tensor | list) and (not isinstance(v, Tensor) or v.dim() > 0) else v
            for k, v in batch.items()}


def batch_loader(batches: Sequence[Batch]) -> DataLoader:
    """A plain DataLoader over ready batches (``batch_size=None``: each item is already a batch)."""
    return DataLoader(list(batches), batch_size=None, shuffle=False, num_workers=0, collate_fn=lambda b: b)


def grad_free(outputs: dict[str, Any]) -> bool:
    """True when no tensor output keeps an autograd graph (the teacher's activations are not kept)."""
    return all(not (isinstance(v, Tensor) and (v.requires_grad or v.grad_fn is not None)) for v in outputs.values())


# ---------------------------------------------------------------- clocks and harnesses
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class StepClock(L.Callback):
    """Records ``perf_counter`` at the end of every training batch (after synchronising a GPU)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        sync(pl_module.device)
        self.stamps.append(time.perf_counter())


class EpochClock(L.Callback):
    """Wall seconds of every training epoch (from ``on_train_epoch_start`` to ``on_train_epoch_end``)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.steps: list[int] = []
        self._start = 0.0
        self._step0 = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)
        self.steps.append(trainer.global_step - self._step0)


class ProfileSteps(L.Callback):
    """Runs a ``cProfile.Profile`` from the start of training batch ``first`` to the end of training only."""

    def __init__(self, profile: Any, first: int) -> None:
        self.profile, self.first = profile, first

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.first:
            self.profile.enable()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.profile.disable()


def trainer_kwargs(accelerator: str, clip: float | None, callbacks: list[L.Callback]) -> dict[str, Any]:
    """A quiet Trainer: no logger, progress bar, summary, checkpointing or validation."""
    return {"accelerator": accelerator, "devices": 1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "limit_val_batches": 0, "gradient_clip_val": clip, "callbacks": callbacks}


def time_fit(model: L.LightningModule, batches: Sequence[Batch], warmup: int, accelerator: str,
             clip: float | None, profiler: Any = None) -> float:
    """ms/step of ``Trainer.fit`` over ``batches`` (one step each), after ``warmup`` steps.

    ``profiler``: a ``cProfile.Profile`` that records the steps after the warm-up only.
    """
    clock = StepClock()
    callbacks: list[L.Callback] = [clock] + ([ProfileSteps(profiler, warmup)] if profiler is not None else [])
    trainer = L.Trainer(max_steps=len(batches), **trainer_kwargs(accelerator, clip, callbacks))
    trainer.fit(model, datamodule=InMemoryBatches(batches))
    return per_step_ms(clock.stamps, warmup)


class InMemoryBatches(L.LightningDataModule):
    """Ready batches behind the WdsDataModule's batch transfer (its device-side preparation is already done)."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return batch_loader(self.batches)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return move_batch(batch, device)


def plain_step_fn(student: nn.Module, teacher: nn.Module | None, losses: Sequence[nn.Module],
                  optimizer: torch.optim.Optimizer, scheduler: Any, clip: float | None) -> Callable[[Batch], Tensor]:
    """One hand-written distillation step: student forward, teacher forward under ``no_grad``, the weighted loss,
    backward, optional gradient-norm clipping, optimizer and scheduler step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step(batch: Batch) -> Tensor:
        s_out = student(batch)
        with torch.no_grad():
            t_out = teacher(batch) if teacher is not None else None
        total = sum(loss.weight * loss(*loss.select(s_out, t_out), batch) for loss in losses)
        assert isinstance(total, Tensor)
        total.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return total.detach()

    return step


def time_plain_loop(step: Callable[[Batch], Tensor], batches: Sequence[Batch], warmup: int,
                    device: torch.device | str) -> float:
    """ms/step of ``step`` over the same DataLoader kind as :func:`time_fit`, after ``warmup`` steps."""
    stamps = []
    for batch in batch_loader(batches):
        step(move_batch(batch, device))
        sync(device)
        stamps.append(time.perf_counter())
    return per_step_ms(stamps, warmup)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device | str) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    times = []
    for i in range(warmup + repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(1000.0 * (time.perf_counter() - start))
    return times


def top_costs(profile: Any, steps: int, limit: int = 25) -> dict[str, list[dict[str, Any]]]:
    """A ``cProfile.Profile`` of ``steps`` steps, as ms per step: the ``limit`` functions with the most own time, and
    the ``limit`` Lightning/xmodal functions with the most cumulative time (where framework overhead shows)."""
    import pstats

    stats = pstats.Stats(profile)
    rows = []
    for (file, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{file.split('site-packages/')[-1]}:{line}({func})", "calls_per_step": calls / steps,
                     "own_ms_per_step": round(1000 * tottime / steps, 3),
                     "cum_ms_per_step": round(1000 * cumtime / steps, 3)})
    framework = [r for r in rows if any(k in r["function"] for k in ("lightning", "xmodal", "/work/"))]
    return {"own_time": sorted(rows, key=lambda r: r["own_ms_per_step"], reverse=True)[:limit],
            "framework_cumulative": sorted(framework, key=lambda r: r["cum_ms_per_step"], reverse=True)[:limit]}


# ---------------------------------------------------------------- loaders and processes
def loader_epoch_s(dm: Any) -> float:
    """Seconds to read and decode one epoch of the training split (no model), with the module's workers."""
    start = time.perf_counter()
    for _ in dm.train_dataloader():
        pass
    seconds = time.perf_counter() - start
    dm.train_loader = None
    gc.collect()
    return seconds


def shard_bytes(pattern: str) -> int:
    """Total bytes of the shards a pattern expands to."""
    from xmodal.data.wds import expand_shards

    return sum(Path(p).stat().st_size for p in expand_shards(pattern))


def loader_rate(dm: Any, workers: int, batches: int) -> dict[str, float]:
    """Time to the first batch and samples/s over the next ``batches`` batches, with ``workers`` workers."""
    old, dm.num_workers = dm.num_workers, workers
    start = time.perf_counter()
    iterator, samples = iter(dm.train_dataloader()), 0
    next(iterator)
    first = time.perf_counter() - start
    t0 = time.perf_counter()
    for _, batch in zip(range(batches), iterator, strict=False):
        samples += len(batch["__key__"])
    seconds = time.perf_counter() - t0
    del iterator
    dm.num_workers, dm.train_loader = old, None
    gc.collect()
    return {"first_batch_s": first, "samples": samples, "samples_per_s": samples / seconds if seconds else float("nan")}


def loader_in_epoch(overhead: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    """The live-teacher epoch through the real loader against the same number of in-memory steps (section 1).

    The difference is what loading, host-to-device transfer and the device-side (training) transforms add while
    training, with the workers competing with the step for the same cores.
    """
    steps = cache["live"]["steps"][-1]
    in_memory = steps * overhead["xmodal_ms"] / 1000.0
    return {"steps": steps, "epoch_s": cache["live_epoch_s"], "in_memory_steps_s": in_memory,
            "ratio": ratio(cache["live_epoch_s"], in_memory)}


def max_rss_mb(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float | None, Any]:
    """Run ``command`` under GNU ``/usr/bin/time -v``; its peak RSS in MB (``None`` if unreadable) and the result."""
    done = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, env=env, capture_output=True, text=True)
    rss = parse_max_rss_kb(done.stderr)
    return (rss / 1024 if rss else None), done

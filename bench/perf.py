"""Performance benchmark: framework overhead, teacher cache, data loading, student vs teacher, memory.

    python -m bench.perf                    # full run (idle machine!) -> bench/results/perf.{json,md}
    python -m bench.perf --smoke            # tiny sizes, seconds; writes to a temp folder, numbers mean nothing
    python -m bench.perf --sections overhead cache

Every figure is measured in one run, on one machine, and reported as ratios beside the raw numbers:

1. ``overhead``: ms/step of ``Trainer.fit`` on the CLIP recipe's Distiller against a hand-written PyTorch loop
   (same student, teacher, losses, optimizer, scheduler, gradient clipping, in-memory batches through the same
   plain DataLoader; warm-up excluded; median of interleaved repeats). Above 1.05x, a cProfile of the xmodal side
   goes into the JSON.
2. ``cache``: one epoch with the live CLIP teacher, the ``xmodal cache`` build, one epoch from the cache shards, all
   through the real WdsDataModule (the config's workers); break-even epochs = build / (live - cached). Loader-only
   read times of both shard sets and their sizes show the shard read cost.
3. ``loader``: samples/s of each recipe's training loader with 0, 1 and 2 workers against the samples/s its
   training step consumes.
4. ``latency``: params and inference latency (batch 1 and 32) of each recipe's default teacher and student, CPU,
   and GPU when there is one.
5. ``memory``: peak RSS of each default training run for a few steps (``/usr/bin/time -v`` on ``xmodal fit``).

Weights are random (teachers are saved once from the recipes' architectures): speed does not depend on them, except
greedy decoding, whose length is noted. Configs are the recipes' defaults with only paths, step counts, loggers,
export callbacks and validation rewritten (under ``<work>/configs``).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from bench import harness
from bench import perf_parts as parts
from bench.harness import XMODAL_MAIN, rewrite, xmodal_command

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
RESULTS = ROOT / "bench" / "results"
SECTIONS = ("overhead", "cache", "loader", "latency", "memory")
RECIPES = {"clip": "clip_compression/student_distill.yaml", "promptkd": "prompt_distill/student_stage2.yaml",
           "lipreading": "lipreading/libs_full.yaml"}
FULL = {"warmup": 10, "steps": 60, "repeats": 5, "epochs": 2, "loader_batches": 40, "latency_batches": (1, 32),
        "latency_repeats": 10, "memory_steps": 20, "batch": {}}
SMOKE = {"warmup": 2, "steps": 5, "repeats": 2, "epochs": 2, "loader_batches": 3, "latency_batches": (1, 4),
         "latency_repeats": 2, "memory_steps": 2, "batch": {"clip": 8, "promptkd": 8, "lipreading": 2}}
NOTES = [
    "CLIP and PromptKD models and the lip reader have random weights in the recipes' architectures (speed does not "
    "depend on weights, except greedy decoding length); Whisper is the real tiny.en.",
    "Lip reading: the recipe's adapted teacher (runs/models/whisper-tiny-en-grid) is replaced by the plain Whisper "
    "tiny.en it is fine-tuned from (same architecture).",
    "The teacher runs under torch.inference_mode (Distiller.teacher_outputs; its outputs are copied out once so "
    "that losses may save them for backward); section 1 checks that its outputs keep no autograd graph.",
]


class Context:
    """Paths, sizes and the recipes' models, shared by the sections."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke: bool = args.smoke
        self.sizes = SMOKE if args.smoke else FULL
        self.work: Path = args.work.resolve()
        self.data = self.work / "data" / "shapes" if args.smoke else args.data_root.resolve() / "shapes"
        self.avspeech = args.data_root.resolve() / "avspeech-small"
        self.whisper = args.whisper.resolve()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.accelerator = "gpu" if self.device == "cuda" else "cpu"
        self.models: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}

    def mapping(self, recipe: str) -> dict[str, str]:
        w = str(self.work)
        return {"runs/data/shapes": str(self.data), "runs/demo": f"{w}/demo",
                "runs/prompt_distill/shapes": f"{w}/promptkd", "runs/data/avspeech-small": str(self.avspeech),
                "runs/models/whisper-tiny-en-grid": str(self.whisper), "runs/lipreading": f"{w}/lipreading"}

    def config(self, recipe: str, overlay: str | None = None) -> dict[str, Any]:
        """The recipe's default config with paths rewritten, export/logging/validation off, smoke batch sizes."""
        config = rewrite(yaml.safe_load((CONFIGS / RECIPES[recipe]).read_text()), self.mapping(recipe))
        if overlay:
            extra = rewrite(yaml.safe_load((CONFIGS / overlay).read_text()), self.mapping(recipe))
            for section, values in extra.items():
                config[section].update(values)
        trainer = config["trainer"]
        # no logger here: XmodalCLI leaves the recipes' LearningRateMonitor out itself
        callbacks = [c for c in trainer.get("callbacks", []) if not c["class_path"].endswith("ExportStudent")]
        config["trainer"] = {"accelerator": "auto", "devices": 1, "max_steps": trainer["max_steps"], "logger": False,
                             "enable_checkpointing": False, "enable_progress_bar": False, "callbacks": callbacks,
                             "gradient_clip_val": trainer.get("gradient_clip_val")}
        config["data"]["val"] = None
        if recipe in self.sizes["batch"]:
            config["data"]["batch_size"] = self.sizes["batch"][recipe]
        return config

    def write(self, config: dict[str, Any], name: str) -> Path:
        path = self.work / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def load(self, recipe: str, overlay: str | None = None, fresh: bool = False) -> tuple[Any, Any, dict[str, Any]]:
        """``(Distiller, WdsDataModule, config)`` of a recipe, instantiated by xmodal's own CLI (``run=False``)."""
        key = f"{recipe}+{overlay}"
        if key not in self.models or fresh:
            from xmodal.commands.lightning import Distiller, WdsDataModule, XmodalCLI
            from xmodal.plugins import load_plugins

            load_plugins()  # the recipes name plug-ins by their short class names
            config = self.config(recipe, overlay)
            path = self.write(config, key.replace("/", "_"))
            argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when sys.argv holds other arguments
            try:
                cli = XmodalCLI(Distiller, WdsDataModule, args=["--config", str(path)], run=False,
                                seed_everything_default=0, auto_configure_optimizers=False)
            finally:
                sys.argv = argv
            self.models[key] = (cli.model, cli.datamodule, config)
        return self.models[key]


# ---------------------------------------------------------------- assets
def ensure_assets(ctx: Context) -> None:
    """The shapes corpus, the CLIP teacher and student folders, and PromptKD's stage-2 inputs (random weights)."""
    if ctx.smoke:
        harness.ensure_corpus("shapes", ctx.data, seed=0, image_size=32, n_train=48, n_val=8, n_test=8, shard_size=16,
                              workers=1, progress=False)
    else:
        counts = {"train": 20000, "val": 1000, "test": 2000}
        harness.ensure_corpus("shapes", ctx.data, accept=lambda meta: meta.get("counts") == counts, seed=0,
                              image_size=32, n_train=20000, n_val=1000, n_test=2000)
    if not (ctx.work / "promptkd" / "split.json").is_file():  # written last
        build_models(ctx)
    if not ctx.whisper.is_dir():
        ctx.skipped["lipreading"] = f"no Whisper tiny.en at {ctx.whisper} (xmodal convert whisper-ct2 ...)"
    elif not (ctx.avspeech / "meta.json").is_file():
        ctx.skipped["lipreading"] = f"no lip-reading corpus at {ctx.avspeech} (xmodal data make avspeech-grid ...)"


def build_models(ctx: Context) -> None:
    from xmodal.eval.base2novel import make_split, write_split
    from xmodal.modalities.prompts import PromptedCLIP
    from xmodal.students.clip import CLIPStudent, save_open_clip_dir
    from xmodal.teachers.prompted import store_class_vectors
    from xmodal.zoo import save_pretrained

    def clip_args(name: str) -> dict[str, Any]:
        return rewrite(yaml.safe_load((CONFIGS / name).read_text()), ctx.mapping(""))["model"]["student"]["init_args"]

    torch.manual_seed(0)
    teacher = CLIPStudent(**clip_args("clip_compression/teacher.yaml"))
    for folder in ("demo/teacher", "promptkd/clip_teacher"):  # clip_teacher.yaml has teacher.yaml's architecture
        save_open_clip_dir(teacher, ctx.work / folder)
    save_open_clip_dir(CLIPStudent(**clip_args("prompt_distill/clip_student.yaml")), ctx.work / "promptkd/clip_student")
    stage1 = rewrite(yaml.safe_load((CONFIGS / "prompt_distill/teacher_stage1.yaml").read_text()), ctx.mapping(""))
    init = {**stage1["model"]["student"]["init_args"], "classes": str(ctx.data / "classes.json"), "split": None,
            "train_subset": "all"}
    prompted = PromptedCLIP(**init)
    save_pretrained(prompted, prompted.init_args, ctx.work / "promptkd" / "teacher_prompted")
    store_class_vectors(prompted, ctx.work / "promptkd" / "class_vectors.safetensors")
    classes = json.loads((ctx.data / "classes.json").read_text())["classes"]
    write_split(make_split(classes), ctx.work / "promptkd" / "split.json")  # the stage-2 recipe's val metric reads it


def ready_batches(dm: Any, n: int, batch_size: int | None = None) -> list[dict[str, Any]]:
    """``n`` training batches decoded once, prepared as on the device (evaluation transform), kept in memory."""
    from xmodal.data.wds import prepare_on_device

    old = (dm.batch_size, dm.num_workers)
    dm.batch_size, dm.num_workers = batch_size or dm.batch_size, 0
    decoded: list[dict[str, Any]] = []
    for batch in dm.train_dataloader():
        batch = {k: v for k, v in batch.items() if not k.startswith("__") or k == "__key__"}
        decoded.append(prepare_on_device(batch, dm.modalities, train=False))
        if len(decoded) == n:
            break
    dm.batch_size, dm.num_workers = old
    if not decoded:
        raise RuntimeError("the training split yielded no full batch")
    return [decoded[i % len(decoded)] for i in range(n)]


# ---------------------------------------------------------------- 1. framework overhead
def plain_side(model: Any, steps: int, clip: float | None, device: str) -> Any:
    """A fresh copy of the student and losses with the Distiller's optimizer and schedule, as a plain step."""
    from xmodal.distiller import build_scheduler, param_groups

    student, losses = copy.deepcopy(model.student).to(device).train(), copy.deepcopy(model.losses).to(device).train()
    holder = torch.nn.ModuleDict({"student": student, "losses": losses})
    optimizer = model.optimizer_factory(param_groups(holder, model.param_lr))
    scheduler = build_scheduler(model.scheduler_factory, optimizer, steps)
    teacher = model.teacher.to(device).eval() if model.teacher is not None else None
    return parts.plain_step_fn(student, teacher, list(losses), optimizer, scheduler, clip)


def section_overhead(ctx: Context) -> dict[str, Any]:
    model, dm, config = ctx.load("clip")
    s, clip = ctx.sizes, config["trainer"]["gradient_clip_val"]
    batches = ready_batches(dm, s["steps"])
    init = copy.deepcopy(model.state_dict())
    xmodal_ms, plain_ms = [], []
    for r in range(s["repeats"]):  # interleaved, alternating which side goes first
        for side in ("xmodal", "plain") if r % 2 == 0 else ("plain", "xmodal"):
            model.load_state_dict(init)
            if side == "xmodal":
                xmodal_ms.append(parts.time_fit(model, batches, s["warmup"], ctx.accelerator, clip))
            else:
                step = plain_side(model, len(batches), clip, ctx.device)
                plain_ms.append(parts.time_plain_loop(step, batches, s["warmup"], ctx.device))
    result = {"recipe": RECIPES["clip"], "batch_size": dm.batch_size, "steps": s["steps"], "warmup": s["warmup"],
              "repeats": s["repeats"], "xmodal_ms": parts.median(xmodal_ms), "plain_ms": parts.median(plain_ms),
              "xmodal_ms_all": xmodal_ms, "plain_ms_all": plain_ms, "gradient_clip_val": clip}
    result["ratio"] = parts.ratio(result["xmodal_ms"], result["plain_ms"])
    model.load_state_dict(init)
    with torch.no_grad():
        outputs = model.teacher_outputs(parts.move_batch(batches[0], ctx.device))
        result["teacher_outputs_grad_free"] = parts.grad_free(outputs or {})
    result["teacher_context"] = "torch.inference_mode (Distiller.teacher_outputs), outputs copied out once"
    if result["ratio"] > 1.05 or ctx.smoke:  # the smoke run exercises the profile path
        profile = cProfile.Profile()
        parts.time_fit(model, batches, s["warmup"], ctx.accelerator, clip, profiler=profile)
        result["profile"] = parts.top_costs(profile, s["steps"] - s["warmup"])
        model.load_state_dict(init)
    return result


# ---------------------------------------------------------------- 2. teacher cache
def fit_epochs(ctx: Context, overlay: str | None) -> dict[str, Any]:
    """Fit the CLIP recipe for ``epochs`` full epochs through its WdsDataModule; per-epoch seconds and steps."""
    model, dm, config = ctx.load("clip", overlay, fresh=True)
    clock = parts.EpochClock()
    import lightning as L

    trainer = L.Trainer(max_epochs=ctx.sizes["epochs"], max_steps=-1,
                        **parts.trainer_kwargs(ctx.accelerator, config["trainer"]["gradient_clip_val"], [clock]))
    trainer.fit(model, datamodule=dm)
    return {"epoch_s": clock.seconds, "steps": clock.steps, "workers": dm.num_workers, "batch_size": dm.batch_size}


def section_cache(ctx: Context) -> dict[str, Any]:
    from xmodal.data.cache import cache_teacher

    live = fit_epochs(ctx, None)
    cache_config = rewrite(yaml.safe_load((CONFIGS / "clip_compression/cache/teacher_outputs.yaml").read_text()),
                           ctx.mapping("clip"))
    out = Path(cache_config["out"])
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    harness.xmodal(["cache", "--config", str(ctx.write(cache_config, "teacher_cache"))])
    build_s = time.perf_counter() - start
    cached = fit_epochs(ctx, "clip_compression/cache/use_cache.yaml")
    manifest = json.loads((out / "manifest.json").read_text())
    _, live_dm, _ = ctx.load("clip")
    _, cached_dm, _ = ctx.load("clip", "clip_compression/cache/use_cache.yaml")
    result = {"live": live, "cached": cached, "build_s": build_s, "build_s_manifest": manifest["seconds"],
              "live_epoch_s": live["epoch_s"][-1], "cached_epoch_s": cached["epoch_s"][-1],
              "epoch_used": "last of the epochs (the first includes start-up)",
              "read_only_epoch_s": {"source": parts.loader_epoch_s(live_dm),
                                    "cache": parts.loader_epoch_s(cached_dm)},
              "shard_bytes": {"source": parts.shard_bytes(cache_config["shards"]),
                              "cache": parts.shard_bytes(manifest["shards"])},
              "cache_dtype": manifest["dtype"], "samples": manifest["count"],
              "top_k_logits_option": "top_k" in inspect.signature(cache_teacher).parameters}
    result["break_even"] = parts.break_even_epochs(build_s, result["live_epoch_s"], result["cached_epoch_s"])
    return result


# ---------------------------------------------------------------- 3. data loading
def step_rate(ctx: Context, recipe: str, overhead: dict[str, Any] | None) -> float:
    """Samples/s that the recipe's xmodal training step consumes (in-memory batches, no loading)."""
    model, dm, config = ctx.load(recipe)
    if recipe == "clip" and overhead:
        return 1000.0 * overhead["batch_size"] / overhead["xmodal_ms"]
    warmup = max(1, ctx.sizes["warmup"] // 2)
    steps = warmup + max(3, ctx.sizes["steps"] // 4)
    init = copy.deepcopy(model.state_dict())
    clip = config["trainer"]["gradient_clip_val"]
    ms = parts.time_fit(model, ready_batches(dm, steps), warmup, ctx.accelerator, clip)
    model.load_state_dict(init)
    return 1000.0 * dm.batch_size / ms


def section_loader(ctx: Context, overhead: dict[str, Any] | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for recipe in RECIPES:
        if recipe in ctx.skipped:
            continue
        _, dm, _ = ctx.load(recipe)
        row: dict[str, Any] = {"batch_size": dm.batch_size, "config_workers": dm.num_workers, "workers": {}}
        for workers in sorted({0, 1, 2, dm.num_workers}):  # the config's count too ("auto" resolves per machine)
            row["workers"][str(workers)] = parts.loader_rate(dm, workers, ctx.sizes["loader_batches"])
        row["step_samples_per_s"] = step_rate(ctx, recipe, overhead)
        at_config = row["workers"][str(dm.num_workers)]["samples_per_s"]
        row["verdict"] = "keeps up" if at_config >= row["step_samples_per_s"] else "BOTTLENECK"
        results[recipe] = row
    return results


# ---------------------------------------------------------------- 4. student against teacher
def section_latency(ctx: Context) -> dict[str, Any]:
    from xmodal.contracts import count_params

    results: dict[str, Any] = {}
    notes = {"promptkd": "teacher params include its text tower, which stage 2 never runs (class vectors stored)",
             "lipreading": "transcribe() = encoder + greedy decoding; the untrained student decodes to max_len (upper "
                           "bound), Whisper stops at its eos"}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for recipe in RECIPES:
        if recipe in ctx.skipped:
            results[recipe] = {"skipped": ctx.skipped[recipe]}
            continue
        model, dm, _ = ctx.load(recipe)
        teacher, student = model.teacher.eval(), model.student.eval()
        big = ready_batches(dm, 1, max(ctx.sizes["latency_batches"]))[0]
        pair: dict[str, Any] = {"teacher": type(teacher).__name__, "student": type(student).__name__,
                                "teacher_params": count_params(teacher), "student_params": count_params(student),
                                "torch_threads": torch.get_num_threads(), "ms": {}, "note": notes.get(recipe, "")}
        for device in devices:
            label = "cpu" if device == "cpu" else f"gpu ({torch.cuda.get_device_name()})"
            pair["ms"][label] = latency_on(recipe, teacher, student, big, device, ctx)
        teacher.to("cpu"), student.to("cpu").train()
        results[recipe] = pair
    return results


def latency_on(recipe: str, teacher: Any, student: Any, big: dict[str, Any], device: str,
               ctx: Context) -> dict[str, Any]:
    """Median ms per batch of the pair's inference call at each latency batch size, on ``device``."""
    teacher.to(device), student.to(device)
    out: dict[str, Any] = {}
    repeats = ctx.sizes["latency_repeats"] if recipe != "lipreading" else max(2, ctx.sizes["latency_repeats"] // 2)
    for size in ctx.sizes["latency_batches"]:
        batch = parts.move_batch(parts.slice_batch(big, size), device)
        cell = {}
        for side, net in (("teacher", teacher), ("student", student)):
            call = (lambda n=net, b=batch: n.transcribe(b)) if recipe == "lipreading" else (lambda n=net, b=batch: n(b))
            with torch.inference_mode():
                cell[side] = parts.median(parts.time_calls(call, repeats, 1, device))
        out[str(size)] = cell
    return out


# ---------------------------------------------------------------- 5. memory
def section_memory(ctx: Context) -> dict[str, Any]:
    results: dict[str, Any] = {}
    runs = [(r, r, None) for r in RECIPES]
    if (ctx.work / "demo" / "teacher_cache" / "manifest.json").is_file():
        runs.insert(1, ("clip (cached teacher)", "clip", "clip_compression/cache/use_cache.yaml"))
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if ctx.smoke else {})}
    rss, _ = parts.max_rss_mb([sys.executable, "-c", f"import {XMODAL_MAIN}, xmodal.teachers.whisper"], ROOT, env)
    results["imports only (baseline)"] = {"max_rss_mb": rss, "steps": 0,
                                          "note": "python + torch + lightning + transformers + open_clip, no model"}
    for name, recipe, overlay in runs:
        if recipe in ctx.skipped:
            results[name] = {"note": ctx.skipped[recipe]}
            continue
        config = ctx.config(recipe, overlay)
        config["trainer"]["max_steps"] = ctx.sizes["memory_steps"]
        path = ctx.write(config, f"memory-{name.split()[0]}{'-cached' if overlay else ''}")
        command = xmodal_command(["fit", "--config", str(path)])
        rss, done = parts.max_rss_mb(command, ROOT, env)
        results[name] = {"max_rss_mb": rss, "steps": ctx.sizes["memory_steps"], "returncode": done.returncode,
                         "workers": config["data"]["num_workers"],
                         "note": "" if done.returncode == 0 else done.stderr[-400:]}
    return results


# ---------------------------------------------------------------- report
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 thread, results in a temp folder")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--data-root", type=Path, default=ROOT / "runs" / "data")
    parser.add_argument("--whisper", type=Path, default=ROOT / "runs" / "models" / "whisper-tiny-en")
    parser.add_argument("--work", type=Path, default=None, help="models, configs and caches (default runs/bench/perf)")
    parser.add_argument("--out", type=Path, default=None, help="results stem (default bench/results/perf)")
    args = parser.parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)
        tmp = Path(tempfile.mkdtemp(prefix="xmodal-perf-smoke-"))
        args.work, args.out = args.work or tmp / "work", tmp / "perf"  # never bench/results in smoke mode
    args.work, args.out = args.work or ROOT / "runs" / "bench" / "perf", args.out or RESULTS / "perf"
    ctx = Context(args)
    ensure_assets(ctx)
    results: dict[str, Any] = {
        "mode": "smoke" if args.smoke else "full", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if ctx.device == "cuda" else "cpu",
                    "python": sys.version.split()[0]},
        "sizes": dict(ctx.sizes), "skipped": ctx.skipped, "notes": NOTES}
    runners = {"overhead": lambda: section_overhead(ctx), "cache": lambda: section_cache(ctx),
               "loader": lambda: section_loader(ctx, results.get("overhead")),
               "latency": lambda: section_latency(ctx), "memory": lambda: section_memory(ctx)}
    results["section_seconds"] = {}
    for section in SECTIONS:
        if section in args.sections:
            print(f"[perf] {section} ...", flush=True)
            start = time.perf_counter()
            results[section] = runners[section]()
            results["section_seconds"][section] = round(time.perf_counter() - start, 1)
    if "overhead" in results and "cache" in results:
        results["loader_in_epoch"] = parts.loader_in_epoch(results["overhead"], results["cache"])
    results["reading"] = parts.reading(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    args.out.with_suffix(".md").write_text(parts.markdown_report(results))
    print(parts.markdown_report(results))
    print(f"results: {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()

"""What a lip-reading training step costs on one device: the recipes' lip reader alone, full LIBS (reading the
cached Whisper outputs) and MixSpeech, at the benchmark's and the recipes' mouth-crop sizes.

The lip-reading benchmark (``bench.lipreading``) needs the whole corpus and its teacher cache (~1 GB), which a
lent GPU machine cannot receive, so this times the same recipes, through the same config rewriting and ``xmodal fit``,
on a small slice of that cache:

    python -m bench.lipreading_steps --make-slice runs/bench/lipreading_slice      # here, from the benchmark's cache
    python -m bench.lipreading_steps --slice runs/bench/lipreading_slice --device cuda --out $OUT/lipreading_steps

Step times are the median of each run's steps after the first (``StepTimer``: batch already loaded, CUDA
synchronised), so they leave the data loader out; the recipes' 6000 steps are extrapolated from them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.lipreading import METHODS, RECIPE_VIDEO_SIZE, Bench
from xmodal.data.shards import write_shards

RECIPE_STEPS = 6000
CACHE = Path("runs/bench/lipreading/cache")


def read_samples(shard: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` samples of ``shard`` as :func:`xmodal.data.shards.write_shards` takes them: ``__key__``
    and each file's bytes under its extension."""
    samples: list[dict[str, Any]] = []
    with tarfile.open(shard) as src:
        for member in src:
            key, _, extension = member.name.partition(".")
            if not samples or samples[-1]["__key__"] != key:
                if len(samples) == count:
                    break
                samples.append({"__key__": key})
            data = src.extractfile(member)
            samples[-1][extension] = data.read() if data is not None else b""
    return samples


def make_slice(cache: Path, out: Path, train: int, val: int, shards: int) -> None:
    """A slice of the benchmark's cache laid out as :class:`bench.lipreading.Bench` reads it: ``train/`` holds
    ``shards`` train shards, the manifest and a val shard (the data folder of the uncached recipes), ``val/`` the
    val shard and its manifest (the cached recipes')."""
    train_samples = read_samples(sorted((cache / "train").glob("train-*.tar"))[0], train)
    val_samples = read_samples(sorted((cache / "val").glob("val-*.tar"))[0], val)
    write_shards(train_samples, out / "train", "train", max_count=-(-len(train_samples) // shards))
    for split in ("train", "val"):
        write_shards(val_samples, out / split, "val", max_count=len(val_samples))
        (out / split / "manifest.json").write_bytes((cache / split / "manifest.json").read_bytes())
    print(f"[steps] wrote {len(train_samples)} train and {len(val_samples)} val clips to {out}")


def count_clips(shards: list[Path]) -> int:
    keys: set[str] = set()
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys |= {m.name.split(".", 1)[0] for m in tar}
    return len(keys)


def time_recipes(args: argparse.Namespace) -> dict[str, Any]:
    """Fit each method at each video size for ``args.steps`` steps; the step-time summary of each run."""
    work = Path(tempfile.mkdtemp(prefix="xmodal-lipsteps-"))
    runs: dict[str, Any] = {}
    for size in args.sizes:
        bench_args = argparse.Namespace(work=work, data=args.slice / "train", device=args.device, video_size=size,
                                        batch_size=args.batch_size, num_workers=args.num_workers, smoke=False)
        bench = Bench(bench_args)
        bench.cache, bench.check_cache = args.slice, False  # the Whisper weights stay behind; the manifest is read
        for method in args.methods:
            run = f"{method}-{size}px"
            print(f"[steps] {run}")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            fit = bench.fit(METHODS[method], run, seed=0, steps=args.steps)
            times = json.loads((work / "timers" / f"{run}.json").read_text())["step_s"][1:]
            runs[run] = {"method": method, "video_size": size, "steps": args.steps,
                         "median_step_s": fit["step_s"], "p90_step_s": statistics.quantiles(times, n=10)[-1],
                         "fit_wall_s": fit["seconds"],
                         "recipe_minutes": fit["step_s"] * RECIPE_STEPS / 60,
                         "peak_gpu_mib": (torch.cuda.max_memory_allocated() / 2**20
                                          if torch.cuda.is_available() else None)}
    return runs


def write_report(results: dict[str, Any], out: Path) -> Path:
    """``out``.md: one row per run."""
    lines = [f"# Lip-reading step cost ({results['device_name']})", "",
             f"torch {results['torch']}, batch {results['batch_size']}, {results['steps']} steps per run on a "
             f"{results['slice_train_clips']}-clip slice of the benchmark's teacher cache; median of the steps after "
             "the first, data loading excluded.", "",
             "| method | video | median s/step | p90 s/step | recipe's 6000 steps (min) | peak GPU MiB | fit wall s |",
             "|---|---|---|---|---|---|---|"]
    for run in results["runs"].values():
        peak = "-" if run["peak_gpu_mib"] is None else f"{run['peak_gpu_mib']:.0f}"
        lines.append(f"| {run['method']} | {run['video_size']} px | {run['median_step_s']:.4f} | "
                     f"{run['p90_step_s']:.4f} | {run['recipe_minutes']:.1f} | {peak} | {run['fit_wall_s']:.1f} |")
    lines += ["", f"fit wall s: the whole `xmodal fit` of {results['steps']} steps, start-up and data loading included "
              "(the loader runs in the main process, `--num-workers`); where it is far above steps x median, the "
              "loader, not the device, sets the pace of a real run."]
    path = out.with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-slice", type=Path, help="write a slice of --cache here and stop")
    parser.add_argument("--cache", type=Path, default=CACHE, help="the benchmark's teacher cache")
    parser.add_argument("--train-clips", type=int, default=24)
    parser.add_argument("--val-clips", type=int, default=4)
    parser.add_argument("--shards", type=int, default=1, help="train shards of the slice")
    parser.add_argument("--slice", type=Path, help="a slice written by --make-slice")
    parser.add_argument("--methods", nargs="+", default=["student_alone", "libs_full", "mixspeech"],
                        choices=list(METHODS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, RECIPE_VIDEO_SIZE])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0,
                        help="0: no worker start-up at each of the slice's one-step epochs")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/lipreading_steps"))
    args = parser.parse_args(argv)
    if args.make_slice:
        make_slice(args.cache, args.make_slice, args.train_clips, args.val_clips, args.shards)
        return
    if args.slice is None:
        parser.error("--slice (or --make-slice) is required")
    results = {"device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "batch_size": args.batch_size, "steps": args.steps,
               "slice_train_clips": count_clips(sorted((args.slice / "train").glob("train-*.tar"))),
               "runs": time_recipes(args)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"[steps] wrote {args.out.with_suffix('.json')} and {write_report(results, args.out)}")


if __name__ == "__main__":
    main()

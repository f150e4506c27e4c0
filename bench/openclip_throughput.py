"""Distillation throughput: xmodal vs ``open_clip_train --distill-model``, same shards, models, batch and device.

    python -m bench.openclip_throughput --teacher runs/bench/clip_compression/shapes/teacher

Both sides train the ``student_distill.yaml`` student (0.18 M params) from the same open_clip teacher folder on the
same ``shapes`` training shards, batch 128, one data-loader worker, fp32, on this machine's CPU, with the live
teacher running every step (no cache on either side):

* xmodal: ``xmodal fit --config <student_distill.yaml with paths rewritten, max_steps=N, no export/logger>``
  (CLIP loss + affinity mimicking);
* open_clip: ``python -m bench.openclip_launch --model-configs DIR -- <open_clip_train.main args>`` — the launcher
  only registers the two model configs (open_clip has no flag for a config folder) and calls
  ``open_clip_train.main.main``; its ``--distill-model`` loss is CLIP + KL on the in-batch logits.

Each side runs twice, for ``N1`` and ``N2`` optimizer steps; ``samples/s = (N2 - N1) * batch / (T2 - T1)`` over the
wall times of the whole commands, which cancels start-up (imports, shuffle-buffer fill, model creation). Peak RSS
is GNU time's "maximum resident set size" (the largest process of the run). The exact commands are recorded.
Run it on an otherwise idle machine. Results: ``bench/results/clip_compression_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench import harness
from bench.clip_compression import CONFIGS
from bench.harness import rewrite

RESULTS = Path(__file__).resolve().parent / "results" / "clip_compression_throughput"


def model_configs(student_args: dict[str, Any], teacher: Path, out: Path) -> Path:
    """Write ``xmodal-student.json`` and ``xmodal-teacher.json`` (open_clip model configs) into ``out``."""
    from xmodal.students.clip import CLIPStudent, save_open_clip_dir

    out.mkdir(parents=True, exist_ok=True)
    student_dir = save_open_clip_dir(CLIPStudent(**student_args), out / "student_dir")
    for name, folder in (("xmodal-student", Path(student_dir)), ("xmodal-teacher", teacher)):
        cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
        cfg["text_cfg"]["hf_tokenizer_name"] = str((folder / cfg["text_cfg"]["hf_tokenizer_name"]).resolve())
        (out / f"{name}.json").write_text(json.dumps(cfg, indent=1))
    return out


def timed(command: list[str], log: Path) -> dict[str, float]:
    """Run ``command`` under GNU time; wall seconds and peak RSS (MiB)."""
    start = time.perf_counter()
    with log.open("w") as handle:
        subprocess.run(["/usr/bin/time", "-v", *command], stdout=handle, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - start
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text())
    return {"seconds": seconds, "peak_rss_mib": int(match.group(1)) / 1024 if match else float("nan")}


def xmodal_command(data: Path, teacher: Path, steps: int, work: Path) -> list[str]:
    mapping = {"runs/data/shapes": str(data), "runs/demo/teacher": str(teacher), "runs/demo": str(work)}
    config = rewrite(yaml.safe_load((CONFIGS / "student_distill.yaml").read_text()), mapping)
    trainer = config["trainer"]
    trainer.update({"max_steps": steps, "logger": False, "callbacks": [], "enable_progress_bar": False})
    path = work / f"xmodal-{steps}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return harness.xmodal_command(["fit", "--config", str(path)])


def openclip_command(data: Path, teacher: Path, steps: int, batch: int, configs: Path, work: Path) -> list[str]:
    shards = json.loads((data / "meta.json").read_text())["patterns"]["train"]
    return [
        sys.executable, "-m", "bench.openclip_launch", "--model-configs", str(configs), "--",
        "--train-data", str(data / shards), "--dataset-type", "webdataset", "--train-num-samples", str(steps * batch),
        "--batch-size", str(batch), "--epochs", "1", "--workers", "1", "--model", "xmodal-student",
        "--distill-model", "xmodal-teacher", "--distill-pretrained", str(teacher / "open_clip_model.safetensors"),
        "--lr", "1e-3", "--wd", "0.05", "--warmup", "100", "--precision", "fp32", "--save-frequency", "0",
        "--logs", str(work / "openclip_logs"), "--name", f"steps{steps}", "--report-to", "", "--seed", "0",
        "--log-every-n-steps", "20",
    ]


def measure(name: str, commands: dict[int, list[str]], work: Path, batch: int) -> dict[str, Any]:
    runs = {steps: timed(command, work / f"{name}-{steps}.log") for steps, command in commands.items()}
    (n1, r1), (n2, r2) = sorted(runs.items())
    return {"commands": {str(n): " ".join(c) for n, c in commands.items()},
            "runs": {str(n): r for n, r in runs.items()},
            "samples_per_second": (n2 - n1) * batch / (r2["seconds"] - r1["seconds"]),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs.values())}


def markdown(results: dict[str, Any]) -> str:
    x, o = results["xmodal"], results["open_clip_train"]
    lines = [
        "| side | samples/s | peak RSS (MiB) | wall s per run (steps) |", "|---|---|---|---|",
        *(f"| {name} | {r['samples_per_second']:.0f} | {r['peak_rss_mib']:.0f} | "
          + ", ".join(f"{v['seconds']:.1f} ({k})" for k, v in r["runs"].items()) + " |"
          for name, r in (("xmodal", x), ("open_clip_train --distill-model", o))),
        "", f"Ratio xmodal / open_clip_train: {results['ratio']:.2f}× samples/s.", "", "Commands:", "",
        *(f"- `{c}`" for r in (x, o) for c in r["commands"].values()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/data/shapes"))
    parser.add_argument("--teacher", type=Path, default=Path("runs/demo/teacher"))
    parser.add_argument("--steps", type=int, nargs=2, default=[40, 160])
    parser.add_argument("--work", type=Path, default=Path("runs/bench/openclip_throughput"))
    args = parser.parse_args(argv)
    work, batch = args.work.resolve(), 128
    work.mkdir(parents=True, exist_ok=True)
    data, teacher = args.data.resolve(), args.teacher.resolve()
    student = rewrite(yaml.safe_load((CONFIGS / "student_distill.yaml").read_text()),
                      {"runs/data/shapes": str(data)})["model"]["student"]["init_args"]
    configs = model_configs(student, teacher, work / "model_configs")
    results = {
        "xmodal": measure("xmodal", {n: xmodal_command(data, teacher, n, work) for n in args.steps}, work, batch),
        "open_clip_train": measure(
            "openclip", {n: openclip_command(data, teacher, n, batch, configs, work) for n in args.steps}, work, batch),
        "batch_size": batch, "steps": args.steps,
    }
    results["ratio"] = results["xmodal"]["samples_per_second"] / results["open_clip_train"]["samples_per_second"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(results, indent=1))
    RESULTS.with_suffix(".md").write_text(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()

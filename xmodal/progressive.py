"""TinyCLIP progressive compression in stages, e.g. 100% -> 50% -> 25% (``xmodal compress --config stages.yaml``).

Each stage is an ordinary ``xmodal fit`` run whose student is a
:class:`~xmodal.students.autoinherit.MaskedCLIP` around an
:class:`~xmodal.students.inherit.InheritCLIPStudent` loaded from the previous stage's export (the original teacher
for the first stage), whose teacher is always the original teacher, and whose losses are the shared ones plus a
:class:`~xmodal.losses.sparsity.SparsityLagrangianLoss`. After each stage the gates are applied
(:func:`~xmodal.students.autoinherit.prune`) and the plain ``CLIPStudent`` is written to ``<out_dir>/stage<k>`` as a
zoo checkpoint *and* an open_clip ``local-dir`` folder, which the next stage inherits from.

The stages file::

    teacher: runs/demo/teacher              # open_clip folder (save_open_clip_dir) of the original teacher
    tokenizer: runs/data/shapes/tokenizer   # optional: the students' tokenizer (default: the teacher folder)
    out_dir: runs/demo/progressive
    fit: {...}                              # a Lightning config (inline, or a path) without model.student/teacher;
                                            # its model.losses are shared by every stage
    stages:
      - {target: 0.5, max_steps: 300, warmup_steps: 100}   # kept fraction of the ORIGINAL prunable parameters
      - {target: 0.25, max_steps: 300, warmup_steps: 100}

Strings in ``fit`` may contain ``{stage}``, replaced by the 1-based stage number (e.g. a per-stage output file).

Optional top-level key ``teacher_cache``: a folder written by ``xmodal cache`` for the original teacher; every stage
then reads the teacher's outputs from its shards (``data.train`` is replaced) instead of running the teacher.

Optional stage keys: ``warmup_steps`` and ``sparsity_weight`` (the sparsity loss), ``gate_heads``, ``init_keep`` and
``init_noise``, ``min_layers`` (the gates, see :class:`~xmodal.students.autoinherit.MaskedCLIP`).

A stage's target is converted to the kept fraction of its own input model, ``min(1, target * P_0 / P_k)``, with
``P`` counting the parameters of heads and MLP neurons (:func:`~xmodal.students.autoinherit.prunable_params`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

PRUNED = "pruned"


def load_stages(path: str | Path) -> dict[str, Any]:
    """The stages file, with ``fit`` read from its own file when it is a path (relative to the stages file)."""
    spec = yaml.safe_load(Path(path).read_text())
    for key in ("teacher", "out_dir", "fit", "stages"):
        if key not in spec:
            raise ValueError(f"{path}: the stages file needs {key!r}")
    if isinstance(spec["fit"], str):
        fit_path = Path(spec["fit"]) if Path(spec["fit"]).is_file() else Path(path).parent / spec["fit"]
        spec["fit"] = yaml.safe_load(fit_path.read_text())
    return dict(spec)


def with_stage_number(value: Any, number: int) -> Any:
    """``value`` with ``{stage}`` replaced by ``number`` in every string of a nested config."""
    if isinstance(value, str):
        return value.replace("{stage}", str(number))
    if isinstance(value, dict):
        return {k: with_stage_number(v, number) for k, v in value.items()}
    if isinstance(value, list):
        return [with_stage_number(v, number) for v in value]
    return value


def stage_config(
    spec: dict[str, Any], stage: dict[str, Any], source: str, target: float, log_dir: str, number: int = 1
) -> dict[str, Any]:
    """The ``xmodal fit`` config of stage ``number`` (see the module docstring)."""
    config = with_stage_number(copy.deepcopy(spec["fit"]), number)
    trainer = config.setdefault("trainer", {})
    trainer.update({k: stage[k] for k in ("max_steps",) if k in stage})
    trainer.setdefault("logger", {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                  "init_args": {"save_dir": log_dir, "name": "logs"}})
    trainer["enable_checkpointing"] = False
    trainer["default_root_dir"] = log_dir
    model = config.setdefault("model", {})
    inherit = {"teacher_dir": source}
    if spec.get("tokenizer"):
        inherit["tokenizer"] = spec["tokenizer"]
    gate_keys = ("gate_heads", "init_keep", "init_noise", "min_layers")
    masked: dict[str, Any] = {k: stage[k] for k in gate_keys if k in stage}
    masked["student"] = {"class_path": "xmodal.students.inherit.InheritCLIPStudent", "init_args": inherit}
    model["student"] = {"class_path": "xmodal.students.autoinherit.MaskedCLIP", "init_args": masked}
    live_teacher = {"class_path": "xmodal.teachers.open_clip.OpenCLIPTeacher",
                    "init_args": {"model_name": f"local-dir:{spec['teacher']}"}}
    model["teacher"] = live_teacher
    if spec.get("teacher_cache"):
        cache = Path(spec["teacher_cache"])
        model["teacher"] = {"class_path": "xmodal.teachers.cached.CachedTeacher",
                            "init_args": {"manifest": str(cache / "manifest.json"), "teacher": live_teacher}}
        config.setdefault("data", {})["train"] = str(cache / "train-*.tar")
    sparsity = {"class_path": "xmodal.losses.sparsity.SparsityLagrangianLoss",
                "init_args": {"target": target, "warmup_steps": int(stage.get("warmup_steps", 0)),
                              "weight": float(stage.get("sparsity_weight", 1.0))}}
    model["losses"] = [*model.get("losses", []), sparsity]
    return dict(config)


def run_stage(config_file: Path) -> Any:
    """Fit one stage's config and return its trained student (a ``MaskedCLIP``).

    Lightning's own CLI is enough here: stages write no checkpoint, and their configs come from :func:`stage_config`.
    """
    from lightning.pytorch.cli import LightningCLI

    from xmodal.data.wds import WdsDataModule
    from xmodal.distiller import Distiller
    from xmodal.plugins import load_plugins

    load_plugins()  # the shared fit config may name losses and callbacks by short class name
    cli = LightningCLI(Distiller, WdsDataModule, args=["--config", str(config_file)], run=False,
                       seed_everything_default=0, auto_configure_optimizers=False, save_config_callback=None)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model.student


def compress(spec: dict[str, Any]) -> list[Path]:
    """Run every stage; returns the exported stage folders (zoo checkpoint + open_clip local-dir each)."""
    from xmodal.students.autoinherit import prunable_params, prune
    from xmodal.students.clip import save_open_clip_dir
    from xmodal.zoo import save_pretrained

    out_dir = Path(spec["out_dir"])
    source = str(spec["teacher"])
    p0 = prunable_params(json.loads((Path(source) / "open_clip_config.json").read_text())["model_cfg"])
    exported = []
    for k, stage in enumerate(spec["stages"], start=1):
        stage_dir = out_dir / f"stage{k}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        pk = prunable_params(json.loads((Path(source) / "open_clip_config.json").read_text())["model_cfg"])
        target = min(1.0, float(stage["target"]) * p0 / pk)
        config = stage_config(spec, stage, source, target, str(stage_dir), k)
        (stage_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        pruned = prune(run_stage(stage_dir / "config.yaml"))
        export = stage_dir / PRUNED
        save_pretrained(pruned, pruned.init_args, export, teacher=f"local-dir:{spec['teacher']}",
                        metrics={"stage": k, "target": float(stage["target"]), "stage_target": target})
        save_open_clip_dir(pruned, export)
        exported.append(export)
        source = str(export)
    return exported

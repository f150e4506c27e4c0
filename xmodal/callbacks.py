"""Lightning callbacks that belong to every recipe."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


class ExportStudent(L.Callback):
    """At the end of ``fit``, write the student as a zoo checkpoint folder (safetensors + config + card).

    This is the clear way to get the student out of a run: ``xmodal.create_model("<out_dir>")`` loads it, and
    ``xmodal.register_model("<out_dir>", name=...)`` makes it loadable by name. The student must expose
    ``init_args`` (its constructor arguments).

    Args:
        out_dir: checkpoint folder to write.
        name: model name written into the card (defaults to the folder name).
        teacher: free-text teacher reference recorded in the card.
        open_clip: also write ``open_clip_config.json`` + ``open_clip_model.safetensors`` (CLIP students only), so
            ``open_clip.create_model("local-dir:<out_dir>")`` loads it too.
    """

    def __init__(self, out_dir: str, name: str | None = None, teacher: str | None = None, open_clip: bool = False):
        self.out_dir = Path(out_dir)
        self.name = name or self.out_dir.name
        self.teacher = teacher
        self.open_clip = open_clip

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from xmodal.zoo import save_pretrained

        student: torch.nn.Module = pl_module.student  # type: ignore[assignment]
        init_args = getattr(student, "init_args", None)
        if init_args is None:
            raise TypeError(f"{type(student).__name__} has no init_args; ExportStudent cannot rebuild it")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        metrics["global_step"] = trainer.global_step
        save_pretrained(student, init_args, self.out_dir, name=self.name, teacher=self.teacher, metrics=metrics)
        if self.open_clip:
            from xmodal.students.clip import save_open_clip_dir

            save_open_clip_dir(student, self.out_dir)
        rank_zero_info(f"student exported to {self.out_dir}")


class ZeroShotProbe(L.Callback):
    """Every ``every_n_steps`` optimizer steps, measure the student's zero-shot top-1 on held-out shards.

    The learning curve this gives answers "how many steps until the student reaches accuracy X" (TinyCLIP's
    training-speed claim). Each point is logged as ``probe/zeroshot_top1`` and kept in :attr:`history`; with
    ``out_json`` the history is also written as ``[{"step": ..., "zeroshot_top1": ...}, ...]`` after every probe.
    The student must have ``encode_image`` and ``encode_text`` (CLIP students, masked students).

    Args:
        shards: WebDataset pattern of the probe set (``png``/``jpg`` + json ``label``).
        classes: ``classes.json`` with ``classes`` and ``templates``.
        image_size: the student's input resolution.
        every_n_steps: probe interval; a final probe always runs at the end of training.
        batch_size: evaluation batch size.
        out_json: optional path for the history.
    """

    def __init__(self, shards: str, classes: str, image_size: int, every_n_steps: int = 50, batch_size: int = 256,
                 out_json: str | None = None) -> None:
        import json

        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        spec = json.loads(Path(classes).read_text())
        self.classnames, self.templates = spec["classes"], spec["templates"]
        self.shards, self.image_size = shards, image_size
        self.every_n_steps, self.batch_size = every_n_steps, batch_size
        self.out_json = Path(out_json) if out_json else None
        self.history: list[dict[str, float]] = []

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool = True) -> None:
        import json

        from xmodal.data.wds import make_pipeline
        from xmodal.eval.zeroshot import DualEncoder, evaluate_zeroshot
        from xmodal.modalities.image import ImageModality

        step = trainer.global_step
        if self.history and self.history[-1]["step"] == step:
            return
        loader = make_pipeline(self.shards, [ImageModality(self.image_size)], self.batch_size, train=False)
        student = cast(DualEncoder, pl_module.student)
        result = evaluate_zeroshot(student, loader, self.classnames, self.templates, device=pl_module.device)
        self.history.append({"step": step, "zeroshot_top1": float(result["top1"])})
        if log:
            pl_module.log("probe/zeroshot_top1", float(result["top1"]))
        if self.out_json is not None and trainer.is_global_zero:
            self.out_json.parent.mkdir(parents=True, exist_ok=True)
            self.out_json.write_text(json.dumps(self.history, indent=1))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.probe(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probe(trainer, pl_module, log=False)  # Lightning does not allow self.log here

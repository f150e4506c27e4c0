"""Lightning callbacks that belong to every recipe."""

from __future__ import annotations

from pathlib import Path

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

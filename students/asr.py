"""The trainable Whisper of the lip-reading recipe's adaptation stage (:class:`WhisperASR`, trained with
:class:`~xmodal.losses.logits.TokenCrossEntropyLoss`) and :class:`ExportPretrained`, which writes a trained speech
recognizer (this one, or :class:`~xmodal.modalities.speech_nets.ConformerASR`) where its frozen teacher wrapper
loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from xmodal.contracts import Batch, Outputs
from xmodal.modalities.whisper_nets import SAMPLE_RATE, WhisperFrontend

IGNORE_INDEX = -100


class WhisperASR(WhisperFrontend):
    """Trainable Whisper for the adaptation stage (``Distiller(student=WhisperASR(...), teacher=None)``).

    Outputs ``audio.token_logits`` float ``B x N x V`` (teacher-forced on ``" " + transcript`` after the prompt)
    and ``audio.token_targets`` int64 ``B x N`` (the transcript's tokens then ``eos``; ``-100`` at padding), for
    :class:`~xmodal.losses.logits.TokenCrossEntropyLoss`. Arguments as :class:`WhisperFrontend`, plus
    ``freeze_encoder`` (train the decoder only). Export with :meth:`export` or the :class:`ExportPretrained`
    callback.
    """

    def __init__(
        self, model: str | None = None, config: dict[str, Any] | None = None, tokenizer: str | None = None,
        seconds: float = 4.0, prompt_ids: Sequence[int] | None = None, eos_id: int | None = None,
        suppress_ids: Sequence[int] | None = None, suppress_ids_begin: Sequence[int] | None = None,
        input_sample_rate: int = SAMPLE_RATE, seed: int = 0, freeze_encoder: bool = False,
    ) -> None:
        super().__init__(model, config, tokenizer, seconds, prompt_ids, eos_id, suppress_ids, suppress_ids_begin,
                         input_sample_rate, seed)
        self.model.train()  # from_pretrained leaves it in eval mode, and Lightning keeps modules' modes
        if freeze_encoder:
            self.model.get_encoder().requires_grad_(False)
        self.model.get_encoder().embed_positions.requires_grad_(False)
        self.output_keys: tuple[str, ...] = ("audio.token_logits", "audio.token_targets")

    def forward(self, batch: Batch) -> Outputs:
        mel, _ = self.features(batch)
        ids, tokens, _ = self.forced_inputs(list(batch["transcript"]), append_eos=True)
        start = len(self.prompt_ids) - 1
        logits = self.decoder_logits(ids[:, :-1], self.encode(mel))[:, start:]
        targets = torch.full(logits.shape[:2], IGNORE_INDEX, dtype=torch.long, device=logits.device)
        for i, row in enumerate(tokens):
            targets[i, : len(row) + 1] = torch.tensor(row + [self.eos_id], device=logits.device)
        return {"audio.token_logits": logits, "audio.token_targets": targets}


class ExportPretrained(L.Callback):
    """At the end of ``fit``, write the student as a ``transformers`` folder (``student.export(dirpath)``).

    Args:
        dirpath: output folder, e.g. ``runs/models/whisper-tiny-en-grid``; the teacher config points here.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            student: Any = pl_module.student
            student.export(self.dirpath)

"""The from-scratch conformer ASR (:class:`~xmodal.students.asr.ConformerASR`), frozen, as the lip-reading
recipe's baseline teacher. Same outputs as :class:`~xmodal.teachers.whisper.WhisperTeacher`:

``audio.frames`` ``B x T x D`` (25 Hz) + ``audio.frames_mask``, ``audio.context`` ``B x L x D`` (the attention
decoder's cross-attention output, one per character, teacher-forced on ``transcript``) + ``audio.context_mask``,
``audio.sequence`` ``B x D``, and ``audio.cer`` ``B`` of its own greedy CTC transcript against ``transcript``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.contracts import Batch, Outputs, freeze
from xmodal.modalities.transcript import normalize_transcript, sentence_cer
from xmodal.students.asr import EXPORT_FILE, ConformerASR
from xmodal.teachers.common import state_dict_sha256


def load_conformer(path: str | Path) -> ConformerASR:
    """A :class:`ConformerASR` from an export folder (``conformer.pt``) or a Lightning checkpoint of a
    ``Distiller`` whose student it was (``student.*`` weights; the config is read from the sibling export or the
    checkpoint's ``hyper_parameters``/``conformer_config``)."""
    path = Path(path)
    file = path / EXPORT_FILE if path.is_dir() else path
    data = torch.load(file, map_location="cpu", weights_only=True)
    if "config" in data:
        model = ConformerASR(**data["config"])
        model.load_state_dict(data["state_dict"])
        return model
    state = {k.removeprefix("student."): v for k, v in data["state_dict"].items() if k.startswith("student.")}
    config = data.get("conformer_config") or data.get("hyper_parameters", {}).get("student", {}).get("init_args")
    if not isinstance(config, dict):
        raise ValueError(f"{file}: no conformer config found; export the model with ConformerASR.export")
    model = ConformerASR(**config)
    model.load_state_dict(state)
    return model


class ConformerTeacher(nn.Module):
    """Frozen :class:`ConformerASR` with LIBS's outputs and its own CER.

    Args:
        model: export folder (``ConformerASR.export`` / the ``ExportPretrained`` callback) or checkpoint.
    """

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model_name = model
        self.asr: ConformerASR = load_conformer(model)
        freeze(self.asr)
        self.output_keys: tuple[str, ...] = (
            "audio.frames", "audio.frames_mask", "audio.context", "audio.context_mask", "audio.sequence", "audio.cer",
        )

    def train(self, mode: bool = True) -> ConformerTeacher:
        """Stays in eval mode whatever ``mode`` is: a teacher is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: Batch) -> Outputs:
        out = self.asr(batch)
        hypotheses = self.asr.ctc_greedy(out["audio.ctc_logits"], out["audio.frames_mask"])
        refs = [normalize_transcript(t) for t in batch["transcript"]]
        cer = [sentence_cer(r, h) for r, h in zip(refs, hypotheses, strict=True)]
        result = {key: out[key] for key in self.output_keys if key in out}
        result["audio.cer"] = torch.tensor(cer, dtype=torch.float32, device=out["audio.frames"].device)
        return result

    def transcribe(self, batch: Batch) -> list[str]:
        with torch.no_grad():
            memory, valid = self.asr.encode(batch["audio"], batch["audio_lengths"])
            return self.asr.ctc_greedy(self.asr.ctc_head(memory), valid)

    def manifest(self) -> dict[str, Any]:
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}", "model": self.model_name,
            "config": self.asr.config, "weights_sha256": state_dict_sha256(self.asr),
            "preprocessing": {"sample_rate": 16000, "log_mel": "torchaudio, per-utterance normalised"},
            "output_keys": list(self.output_keys),
        }

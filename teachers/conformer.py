"""The from-scratch conformer ASR (:class:`~xmodal.modalities.speech_nets.ConformerASR`), frozen, as the lip-reading
recipe's baseline teacher. Generic outputs like :class:`~xmodal.teachers.whisper.WhisperTeacher`'s, with characters
as the decoder's tokens:

``audio.frames`` ``B x T x D`` (``audio.frame_rate`` 25 Hz) + ``audio.frames_mask``, ``audio.sequence`` ``B x D``,
``audio.token_ids`` ``B x L`` (the :class:`~xmodal.modalities.transcript.CharVocab` ids of ``transcript``),
``audio.token_states`` ``B x L x D`` (the attention decoder's cross-attention output per character, teacher-forced on
``transcript``), ``audio.char_token`` ``B x L`` (character ``i`` is token ``i``), each with its ``_mask``, and
``audio.hypothesis_chars`` (code points of its greedy CTC transcript) + ``audio.hypothesis_chars_mask``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.contracts import Batch, Outputs, freeze
from xmodal.modalities.speech_nets import EXPORT_FILE, FRAME_RATE, ConformerASR
from xmodal.modalities.transcript import identity_char_tokens, texts_to_codepoints
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
    """Frozen :class:`ConformerASR` with generic encoder, decoder and hypothesis outputs (see the module docstring).

    Args:
        model: export folder (``ConformerASR.export`` / the ``ExportPretrained`` callback) or checkpoint.
    """

    output_keys = (
        "audio.frames", "audio.frames_mask", "audio.frame_rate", "audio.sequence", "audio.token_ids",
        "audio.token_ids_mask", "audio.token_states", "audio.token_states_mask", "audio.char_token",
        "audio.char_token_mask", "audio.hypothesis_chars", "audio.hypothesis_chars_mask",
    )

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model_name = model
        self.asr: ConformerASR = load_conformer(model)
        freeze(self.asr)

    def train(self, mode: bool = True) -> ConformerTeacher:
        """Stays in eval mode whatever ``mode`` is: a teacher is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: Batch) -> Outputs:
        out = self.asr(batch)
        device = out["audio.frames"].device
        mask = out["audio.token_states_mask"]
        token_ids = self.asr.vocab.batch_targets(batch["transcript"])[0][:, : mask.shape[1]].to(device) * mask
        hypotheses = self.asr.ctc_greedy(out["audio.ctc_logits"], out["audio.frames_mask"])
        chars, chars_mask = texts_to_codepoints(hypotheses, device)
        return {
            **{key: out[key] for key in ("audio.frames", "audio.frames_mask", "audio.sequence", "audio.token_states",
                                         "audio.token_states_mask")},
            "audio.frame_rate": torch.tensor(FRAME_RATE, device=device),
            "audio.token_ids": token_ids, "audio.token_ids_mask": mask,
            "audio.char_token": identity_char_tokens(mask), "audio.char_token_mask": mask,
            "audio.hypothesis_chars": chars, "audio.hypothesis_chars_mask": chars_mask,
        }

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

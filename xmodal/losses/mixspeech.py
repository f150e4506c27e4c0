"""MixSpeech (arXiv 2303.05309): audio-visual mixup on a curriculum, with the mixed stream regularising the visual one.

The :class:`~xmodal.students.lipreader.LipReader` (``audio_frontend=True``) mixes frontend features at the video
rate, ``m = lam * a + (1 - lam) * v``, runs the shared encoder/decoder on ``m`` and outputs ``av.char_logits``
next to the visual-only ``video.char_logits``. Training loss (with :class:`~xmodal.losses.libs.CharCELoss` on
the visual stream)::

    CE(visual) + ce_weight * CE(mixed) + kl_weight * KL(p_mixed || p_visual)

``lam`` follows :func:`mix_ratio` from ``start`` (1: audio only, the audio branch is trained on audio) to ``end``
(0: the mixed stream is the visual stream) over ``steps`` optimizer steps;
:class:`xmodal.callbacks.MixSpeechSchedule` sets it on the student before every training batch and logs it as
``train/mix_lambda``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from xmodal.contracts import Batch, DistillLoss, Keys
from xmodal.modalities.transcript import VocabularySpec, check_targets, decoder_targets, load_vocabulary


def mix_ratio(
    step: int, steps: int, start: float = 1.0, end: float = 0.0, shape: Literal["linear", "cosine"] = "linear",
    hold: int = 0,
) -> float:
    """The audio share ``lam`` at optimizer ``step``.

    ``start`` for the first ``hold`` steps, then ``start -> end`` over ``steps`` steps (linearly, or along a half
    cosine, which lingers at both ends), then ``end``.
    """
    if shape not in ("linear", "cosine"):
        raise ValueError(f"shape must be 'linear' or 'cosine', got {shape!r}")
    progress = min(1.0, max(0.0, (step - hold) / max(steps, 1)))
    if shape == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return start + (end - start) * progress


class MixSpeechLoss(DistillLoss):
    """``ce_weight * CE(mixed) + kl_weight * KL(p_mixed || p_visual)`` over the valid decoder steps.

    Reads ``student_key = [video.char_logits, av.char_logits]`` (both ``B x (L+1) x V``); no teacher output.

    Args:
        ce_weight: weight of the mixed stream's cross-entropy against ``transcript``.
        kl_weight: weight of the KL regulariser pulling the visual predictions toward the mixed ones.
        temperature: softens both distributions in the KL (scaled back by ``T^2``).
        detach_mixed: the mixed stream is the KL's target (no gradient through it), as a teacher would be.
        vocabulary: the student's character vocabulary (``None``: English ``a-z``).
    """

    def __init__(
        self, student_key: Keys = ("video.char_logits", "av.char_logits"), ce_weight: float = 1.0,
        kl_weight: float = 1.0, temperature: float = 1.0, detach_mixed: bool = True, weight: float = 1.0,
        name: str | None = "mixspeech", vocabulary: VocabularySpec = None,
    ) -> None:
        super().__init__(list(student_key), None, weight, name)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.ce_weight, self.kl_weight = ce_weight, kl_weight
        self.temperature, self.detach_mixed = temperature, detach_mixed
        self.vocab = load_vocabulary(vocabulary)
        self.last_metrics: dict[str, Tensor] = {}

    def forward(self, s: tuple[Tensor, Tensor], t: Any, batch: Batch) -> Tensor:
        visual, mixed = s[0].float(), s[1].float()
        _, targets, lengths = decoder_targets(self.vocab, batch["transcript"])
        check_targets(self.vocab, batch["transcript"], lengths, mixed.shape[-1], f"loss {self.name!r}")
        targets = targets.to(visual.device)
        valid = targets != -100
        ce = torch.nn.functional.cross_entropy(mixed[valid], targets[valid])
        kl = mixed_kl(visual[valid], mixed[valid].detach() if self.detach_mixed else mixed[valid], self.temperature)
        self.last_metrics = {"ce_mixed": ce.detach(), "kl": kl.detach()}
        return self.ce_weight * ce + self.kl_weight * kl


def mixed_kl(visual: Tensor, mixed: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * mean_rows KL(softmax(mixed / T) || softmax(visual / T))`` for ``N x V`` logits."""
    log_v = (visual / temperature).log_softmax(-1)
    log_m = (mixed / temperature).log_softmax(-1)
    kl = (log_m.exp() * (log_m - log_v)).sum(-1)
    return kl.mean() * temperature**2 if kl.numel() else visual.sum() * 0.0

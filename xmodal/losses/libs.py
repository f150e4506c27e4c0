"""LIBS (arXiv 1911.11502): distilling a seq2seq ASR teacher into a lip reader at three granularities, with filtering.

* :class:`LIBSSequenceLoss`: L2 between the student's and the teacher's whole-utterance vectors (``*.sequence``).
* :class:`LIBSContextLoss`: L2 between decoder context vectors, character by character (both decoders are
  teacher-forced on the same ground-truth characters, so position ``i`` means the same character on both sides).
* :class:`LIBSFrameLoss`: video frames run at 25 fps, the teacher's encoder at 50 or 100 Hz. A learned
  :class:`FrameAligner` lets each video frame attend over the teacher's audio frames; the attended teacher feature
  becomes that frame's target (L2). ``alignment="interpolate"`` is the linear-time baseline.

**What the losses derive.** The teacher exposes generic outputs only; what LIBS alone needs is computed here. The
context term gathers per-character teacher vectors from the per-token decoder states (``audio.token_states``)
through the character -> token map ``audio.char_token``. The teacher's own CER is the CER of its greedy hypothesis
(``audio.hypothesis_chars``, Unicode code points) against ``batch["transcript"]``.

**Filtering.** With ``max_cer`` set, every term computes the teacher's CER and averages only over
samples whose CER is ``<= max_cer``; the others get zero weight, hence zero gradient. ``last_metrics`` holds the
kept fraction, which the :class:`~xmodal.distiller.Distiller` logs as ``<stage>/<loss name>/kept_fraction``.
Averaging over kept samples keeps the loss scale independent of how many survive; a batch with none kept gives
0 (with a graph, so the backward still runs).

**Normalisation.** Every term takes ``normalize`` (:mod:`xmodal.losses.normalize`), default ``"none"`` as in LIBS,
which regresses raw teacher vectors; issue 21 reports that standardised Whisper targets stop the frame term from
saturating the student. The context term normalises the per-character vectors, so its running statistics count
a token once per character it holds (stored ones count it once).

**Keeping the frame attention from collapsing.** The attention is trained through the loss it feeds, so it can
learn to point video frames at whichever audio frames are easiest to predict (silence, say) instead of the ones
spoken at the same time. Guards: the values are the *detached* teacher features, so a target is always a convex
mix of real teacher frames, never a learned vector that shrinks to zero; only the query/key maps learn; with
``detach_query=True`` (default) the student is trained to match targets, not to make queries that pick easy
ones; a Gaussian log-prior around the linear-time diagonal (``prior_sigma``, a fraction of the utterance) starts
the attention on the interpolation alignment; a hard band (``max_offset``, default 0.1 of the utterance) bounds
how far it can move; and a coverage penalty (``coverage_weight``, default 0.1) keeps a few "hub" audio frames
from taking every video frame's attention. Measured with Whisper tiny.en features on 8 AVSpeech-GRID clips
(60 steps, frame + CE losses): with the prior alone the attention's peak drifted from 2.7 to 29 audio frames
(0.6 s) off the diagonal within 45 steps while the frame loss fell fastest (the shortcut); with the band it
stayed at about 6 frames but piled onto a few hub frames; with band + coverage it stayed at about 5 frames with
higher entropy (3.3 vs 3.0 nats) and no hubs away from the clip ends. ``xmodal eval asr --plot`` shows this.

The student's own supervised terms live here too: :class:`CharCELoss` (next-character cross-entropy against
``transcript``) and :class:`CharCTCLoss`; they read no teacher output, so the lip reader alone is the same recipe
without the LIBS terms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, DistillLoss, Keys, key_list
from xmodal.losses.features import make_projector
from xmodal.losses.logits import HardLabelLoss
from xmodal.losses.normalize import NormOption, target_norm
from xmodal.modalities.audio import resample_to
from xmodal.modalities.transcript import (
    VocabularySpec,
    check_targets,
    codepoints_to_texts,
    decoder_targets,
    load_vocabulary,
    normalize_transcript,
    sentence_cer,
)

HYPOTHESIS_KEYS = ("audio.hypothesis_chars", "audio.hypothesis_chars_mask")  # the filter's default


def keep_weights(cer: Tensor | None, max_cer: float | None, batch: int, device: torch.device) -> Tensor:
    """Per-sample weights ``B`` (float): 1 where ``cer <= max_cer`` (or no filtering), else 0."""
    if max_cer is None or cer is None:
        return torch.ones(batch, device=device)
    return (cer.reshape(-1).to(device).float() <= max_cer).float()


def kept_mean(per_sample: Tensor, keep: Tensor) -> Tensor:
    """Mean of ``per_sample`` (``B``) over kept samples; 0 (still differentiable) when none is kept."""
    return (per_sample * keep).sum() / keep.sum().clamp(min=1.0)


def masked_sq_error(s: Tensor, t: Tensor, mask: Tensor) -> Tensor:
    """Per-sample mean squared error over valid steps and channels: ``B x T x D`` twice, bool ``B x T`` -> ``B``."""
    valid = mask[..., None].to(s.dtype)
    return ((s - t) ** 2 * valid).sum((1, 2)) / (valid.sum((1, 2)) * s.shape[-1]).clamp(min=1.0)


def teacher_cer(hypothesis: Tensor, mask: Tensor, transcripts: Sequence[str]) -> Tensor:
    """Per-sample CER ``B`` of a teacher's hypotheses (code points ``B x C`` + bool mask) against the transcripts."""
    hypotheses = codepoints_to_texts(hypothesis, mask)
    cers = [sentence_cer(normalize_transcript(ref), hyp) for ref, hyp in zip(transcripts, hypotheses, strict=True)]
    return torch.tensor(cers, dtype=torch.float32)


def char_vectors(token_states: Tensor, char_token: Tensor, char_mask: Tensor) -> Tensor:
    """Per-character vectors ``B x L x D``: each character gets the state of the token that holds it (0 at padding).

    Args:
        token_states: ``B x N x D``. char_token: int ``B x L``, the token index of each character. char_mask: ``B x L``.
    """
    index = char_token.long().clamp(min=0).to(token_states.device)
    gathered = token_states.gather(1, index[..., None].expand(-1, -1, token_states.shape[-1]))
    return gathered * char_mask.to(gathered.device)[..., None].to(gathered.dtype)


class _FilteredLoss(DistillLoss):
    """Shared by the LIBS terms: a projector to the teacher width, the CER filter and ``last_metrics``."""

    def __init__(
        self, student_key: Keys, teacher_key: Keys, student_dim: int | None, teacher_dim: int | None,
        max_cer: float | None, hypothesis_key: Keys, weight: float, name: str | None, normalize: NormOption,
    ) -> None:
        hypothesis = key_list(hypothesis_key) if max_cer is not None else []
        if len(hypothesis) not in (0, 2):
            raise ValueError(f"hypothesis_key must name [code points, mask], got {hypothesis_key!r}")
        super().__init__(student_key, key_list(teacher_key) + hypothesis, weight, name)
        self.max_cer = max_cer
        self.projector = make_projector(student_dim, teacher_dim)
        self.target_norm = target_norm(normalize, teacher_key)
        self.last_metrics: dict[str, Tensor] = {}

    def split(self, t: tuple[Tensor, ...], batch: Batch, device: torch.device) -> tuple[tuple[Tensor, ...], Tensor]:
        """Teacher tensors without the hypothesis, and the per-sample keep weights (``kept_fraction`` is recorded)."""
        tensors = t[:-2] if self.max_cer is not None else t
        cer = teacher_cer(t[-2], t[-1], batch["transcript"]) if self.max_cer is not None else None
        keep = keep_weights(cer, self.max_cer, tensors[0].shape[0], device)
        self.last_metrics = {"kept_fraction": keep.mean().detach()}
        return tuple(tensors), keep


class LIBSSequenceLoss(_FilteredLoss):
    """Sequence level: L2 between projected ``video.sequence`` ``B x Ds`` and ``audio.sequence`` ``B x Dt``.

    Args:
        student_key, teacher_key: the utterance vectors. student_dim, teacher_dim: widths (a linear projector
            is learned when they differ). max_cer: filtering threshold (``None``: keep all). hypothesis_key: the
            teacher's greedy hypotheses (code points ``B x C`` and mask), read only with ``max_cer``; their CER
            against ``batch["transcript"]`` is the filter's. weight, name: as every :class:`DistillLoss`.
            normalize: see the module docstring.
    """

    def __init__(
        self, student_key: Keys = "video.sequence", teacher_key: Keys = "audio.sequence",
        student_dim: int | None = None, teacher_dim: int | None = None, max_cer: float | None = None,
        hypothesis_key: Keys = HYPOTHESIS_KEYS, weight: float = 1.0, name: str | None = "libs_sequence",
        normalize: NormOption = "none",
    ) -> None:
        super().__init__(student_key, teacher_key, student_dim, teacher_dim, max_cer, hypothesis_key, weight, name,
                         normalize)

    def forward(self, s: Tensor, t: tuple[Tensor, ...], batch: Batch) -> Tensor:
        (target,), keep = self.split(t, batch, s.device)
        norm = self.target_norm
        per_sample = ((norm.student(self.projector(s.float())) - norm.teacher(target.detach().float())) ** 2).mean(-1)
        return kept_mean(per_sample, keep)


class LIBSContextLoss(_FilteredLoss):
    """Context level: L2 between decoder context vectors, per character.

    Reads ``student_key = [video.context B x L x Ds, video.context_mask B x L]`` and ``teacher_key =
    [audio.token_states B x N x Dt, audio.char_token B x L', audio.char_token_mask B x L']``: the teacher's
    per-token decoder states and, per character, the token that holds it (:func:`char_vectors`); positions beyond
    ``min(L, L')`` or masked on either side are ignored. Arguments as :class:`LIBSSequenceLoss`.
    """

    def __init__(
        self, student_key: Keys = ("video.context", "video.context_mask"),
        teacher_key: Keys = ("audio.token_states", "audio.char_token", "audio.char_token_mask"),
        student_dim: int | None = None, teacher_dim: int | None = None, max_cer: float | None = None,
        hypothesis_key: Keys = HYPOTHESIS_KEYS, weight: float = 1.0, name: str | None = "libs_context",
        normalize: NormOption = "none",
    ) -> None:
        super().__init__(list(student_key), teacher_key, student_dim, teacher_dim, max_cer, hypothesis_key, weight,
                         name, normalize)

    def forward(self, s: tuple[Tensor, Tensor], t: tuple[Tensor, ...], batch: Batch) -> Tensor:
        s_ctx, s_mask = s
        (t_states, t_char, t_mask), keep = self.split(t, batch, s_ctx.device)
        t_ctx = self.target_norm.teacher(char_vectors(t_states, t_char, t_mask).detach().float(), t_mask)
        n = min(s_ctx.shape[1], t_ctx.shape[1])
        mask = s_mask[:, :n].bool() & t_mask[:, :n].bool().to(s_mask.device)
        s_pred = self.target_norm.student(self.projector(s_ctx[:, :n].float()))
        per_sample = masked_sq_error(s_pred, t_ctx[:, :n], mask)
        return kept_mean(per_sample, keep)


class FrameAligner(nn.Module):
    """Attention from student video frames (queries) to teacher audio frames (keys), with a diagonal prior.

    Args:
        student_dim, teacher_dim: feature widths. attn_dim: query/key width.
        prior_sigma: width of the Gaussian log-prior around the linear-time diagonal, as a fraction of the
            utterance (``None``: no prior). temperature: divides the scores.
        max_offset: a hard band: audio frames farther than this fraction of the utterance from a video frame's
            linear-time position get no weight (the nearest audio frame is always allowed); ``None``: no band.

    ``forward(s, s_mask, t, t_mask)``: ``B x Tv x Ds``, bool ``B x Tv``, ``B x Ta x Dt``, bool ``B x Ta`` ->
    weights ``B x Tv x Ta`` (rows sum to 1 at valid video frames, 0 at padded ones; 0 at padded audio frames).
    """

    def __init__(
        self, student_dim: int, teacher_dim: int, attn_dim: int = 64, prior_sigma: float | None = 0.1,
        temperature: float = 1.0, max_offset: float | None = 0.1,
    ) -> None:
        super().__init__()
        self.query = nn.Linear(student_dim, attn_dim)
        self.key = nn.Linear(teacher_dim, attn_dim)
        self.prior_sigma = prior_sigma
        self.temperature = temperature
        self.max_offset = max_offset

    def forward(self, s: Tensor, s_mask: Tensor, t: Tensor, t_mask: Tensor) -> Tensor:
        q, k = self.query(s.float()), self.key(t.float())
        scores = torch.einsum("bvd,bad->bva", q, k) / (math.sqrt(q.shape[-1]) * self.temperature)
        if self.prior_sigma is not None:
            scores = scores + diagonal_log_prior(s_mask, t_mask, self.prior_sigma)
        allowed = t_mask[:, None, :].bool()
        if self.max_offset is not None:
            allowed = allowed & diagonal_band(s_mask, t_mask, self.max_offset)
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # rows of clips with no audio frame
        return weights * s_mask[..., None].to(weights.dtype)


def relative_positions(mask: Tensor) -> Tensor:
    """Centre of each step as a fraction of its sequence's valid length: bool ``B x T`` -> ``B x T`` in (0, 1)."""
    lengths = mask.sum(1, keepdim=True).clamp(min=1).float()
    return (torch.arange(mask.shape[1], device=mask.device)[None, :].float() + 0.5) / lengths


def diagonal_log_prior(s_mask: Tensor, t_mask: Tensor, sigma: float) -> Tensor:
    """``-(pos_v - pos_a)^2 / (2 sigma^2)`` for every (video frame, audio frame) pair: ``B x Tv x Ta``."""
    diff = relative_positions(s_mask)[:, :, None] - relative_positions(t_mask)[:, None, :]
    return -(diff**2) / (2 * sigma**2)


def diagonal_band(s_mask: Tensor, t_mask: Tensor, max_offset: float) -> Tensor:
    """Bool ``B x Tv x Ta``: audio frames within ``max_offset`` (or half an audio frame, if wider) of the diagonal."""
    diff = (relative_positions(s_mask)[:, :, None] - relative_positions(t_mask)[:, None, :]).abs()
    half_frame = 0.5 / t_mask.sum(1).clamp(min=1).float()
    return diff <= torch.clamp(half_frame, min=max_offset)[:, None, None] + 1e-6


def interpolation_weights(s_mask: Tensor, t_mask: Tensor) -> Tensor:
    """The linear-time alignment as a matrix ``B x Tv x Ta``: row ``i`` holds :func:`resample_to`'s weights."""
    b, ta = t_mask.shape
    eye = torch.eye(ta, device=t_mask.device).expand(b, ta, ta)
    weights = resample_to(eye, t_mask.sum(1), s_mask.sum(1), s_mask.shape[1])
    return weights * s_mask[..., None].float() * t_mask[:, None, :].float()


class LIBSFrameLoss(_FilteredLoss):
    """Frame level: each video frame's projected feature against its aligned teacher audio-frame target (L2).

    Reads ``student_key = [video.frames B x Tv x Ds, video.frames_mask B x Tv]`` and ``teacher_key =
    [audio.frames B x Ta x Dt, audio.frames_mask B x Ta]``. The targets ``A @ t`` use the attention ``A``
    (``B x Tv x Ta``) of a :class:`FrameAligner` or, with ``alignment="interpolate"``, the linear-time weights.
    The last ``A`` is kept in ``last_attention`` (detached) for plots.

    Args:
        student_dim, teacher_dim: feature widths (required: the aligner and projector are sized from them).
        alignment: ``"attention"`` (learned, the paper's) or ``"interpolate"`` (baseline).
        attn_dim, prior_sigma, temperature, max_offset: see :class:`FrameAligner`.
        coverage_weight: weight of :func:`coverage_penalty`, which keeps a few audio frames from taking all the
            attention (0: off); its value is logged as ``<name>/coverage``.
        detach_query: build queries from detached student features (see the module docstring).
        max_cer, hypothesis_key, weight, name, normalize: as :class:`LIBSSequenceLoss`. The aligner's keys read
            the normalised teacher frames too.
    """

    def __init__(
        self, student_dim: int, teacher_dim: int, student_key: Keys = ("video.frames", "video.frames_mask"),
        teacher_key: Keys = ("audio.frames", "audio.frames_mask"),
        alignment: Literal["attention", "interpolate"] = "attention", attn_dim: int = 64,
        prior_sigma: float | None = 0.1, temperature: float = 1.0, max_offset: float | None = 0.1,
        coverage_weight: float = 0.1, detach_query: bool = True, max_cer: float | None = None,
        hypothesis_key: Keys = HYPOTHESIS_KEYS, weight: float = 1.0, name: str | None = "libs_frame",
        normalize: NormOption = "none",
    ) -> None:
        super().__init__(list(student_key), teacher_key, student_dim, teacher_dim, max_cer, hypothesis_key, weight,
                         name, normalize)
        if alignment not in ("attention", "interpolate"):
            raise ValueError(f"alignment must be 'attention' or 'interpolate', got {alignment!r}")
        self.alignment = alignment
        self.detach_query = detach_query
        self.coverage_weight = coverage_weight
        self.aligner = FrameAligner(student_dim, teacher_dim, attn_dim, prior_sigma, temperature, max_offset)
        self.last_attention: Tensor | None = None

    def attention(self, s: Tensor, s_mask: Tensor, t: Tensor, t_mask: Tensor) -> Tensor:
        """Alignment weights ``B x Tv x Ta`` from video frames to audio frames."""
        t_mask = t_mask.bool().to(s.device)
        if self.alignment == "interpolate":
            return interpolation_weights(s_mask.bool(), t_mask)
        query = s.detach() if self.detach_query else s
        return self.aligner(query, s_mask.bool(), t.detach(), t_mask)

    def forward(self, s: tuple[Tensor, Tensor], t: tuple[Tensor, ...], batch: Batch) -> Tensor:
        s_feat, s_mask = s
        (t_feat, t_mask), keep = self.split(t, batch, s_feat.device)
        t_feat = self.target_norm.teacher(t_feat.detach().float(), t_mask)
        weights = self.attention(s_feat, s_mask, t_feat, t_mask)
        self.last_attention = weights.detach()
        target = torch.bmm(weights, t_feat.detach().float())
        per_sample = masked_sq_error(self.target_norm.student(self.projector(s_feat.float())), target, s_mask.bool())
        if self.coverage_weight > 0 and self.alignment == "attention":
            coverage = coverage_penalty(weights, s_mask.bool(), t_mask.bool().to(weights.device))
            self.last_metrics["coverage"] = kept_mean(coverage, keep).detach()
            per_sample = per_sample + self.coverage_weight * coverage
        return kept_mean(per_sample, keep)


def coverage_penalty(weights: Tensor, s_mask: Tensor, t_mask: Tensor) -> Tensor:
    """Per-sample mean of ``(received / fair share - 1)^2`` over valid audio frames: ``B``.

    An audio frame's received attention is its column sum of ``weights`` (``B x Tv x Ta``); its fair share is
    ``Tv / Ta``. Zero for a uniform spread (the linear-time alignment is close to it), large when a few "hub"
    frames (silence, say) take every video frame's attention.
    """
    share = (s_mask.sum(1).float() / t_mask.sum(1).clamp(min=1).float())[:, None]
    ratio = weights.sum(1) / share.clamp(min=1e-6)
    valid = t_mask.float()
    return (((ratio - 1) ** 2) * valid).sum(1) / valid.sum(1).clamp(min=1)


class CharCELoss(HardLabelLoss):
    """Next-character cross-entropy of a decoder's logits ``B x (L+1) x V`` against ``batch["transcript"]``.

    Targets are the characters of ``vocabulary`` (the student's; ``None``: English ``a-z``) then ``<eos>``
    (:func:`~xmodal.modalities.transcript.decoder_targets`); padding is ignored. Reads no teacher output.
    """

    def __init__(
        self, student_key: Keys = "video.char_logits", label_smoothing: float = 0.0, weight: float = 1.0,
        name: str | None = "char_ce", vocabulary: VocabularySpec = None,
    ) -> None:
        super().__init__(student_key, label_key="char_targets", label_smoothing=label_smoothing, weight=weight,
                         name=name)
        self.vocab = load_vocabulary(vocabulary)

    def forward(self, s: Tensor, t: Any, batch: Batch) -> Tensor:
        _, targets, lengths = decoder_targets(self.vocab, batch["transcript"])
        check_targets(self.vocab, batch["transcript"], lengths, s.shape[-1], f"loss {self.name!r}")
        if targets.shape != s.shape[:2]:
            raise ValueError(f"loss {self.name!r}: logits {tuple(s.shape)} do not match targets {tuple(targets.shape)}")
        return super().forward(s, None, {**batch, self.label_key: targets.to(s.device)})


class CharCTCLoss(DistillLoss):
    """CTC of per-frame logits ``B x T x V`` (blank 0) against ``batch["transcript"]``, mean over the batch.

    Reads ``student_key = [video.ctc_logits, video.frames_mask]``; no teacher output. ``vocabulary``: the
    student's (``None``: English ``a-z``).
    """

    def __init__(
        self, student_key: Keys = ("video.ctc_logits", "video.frames_mask"), weight: float = 1.0,
        name: str | None = "char_ctc", vocabulary: VocabularySpec = None,
    ) -> None:
        super().__init__(list(student_key), None, weight, name)
        self.vocab = load_vocabulary(vocabulary)

    def forward(self, s: tuple[Tensor, Tensor], t: Any, batch: Batch) -> Tensor:
        logits, mask = s
        targets, lengths = self.vocab.batch_targets(batch["transcript"])
        check_targets(self.vocab, batch["transcript"], lengths, logits.shape[-1], f"loss {self.name!r}")
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)
        return F.ctc_loss(log_probs, targets.to(logits.device), mask.sum(1), lengths.to(logits.device),
                          blank=self.vocab.blank, reduction="mean", zero_infinity=True)

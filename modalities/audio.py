"""Audio modality: soundfile decoding in workers, int16 batches, float conversion and gain on the device.

Batch fields: ``audio`` (int16 ``B x S`` on the wire, float32 in [-1, 1] after :meth:`AudioModality.on_device`,
zero-padded) and ``audio_lengths`` (int64 ``B``, samples).

The towers live here too: :class:`LogMel` features, the :class:`AudioEncoder` (log-mel -> strided conv
frontend -> transformer), and the pieces the video tower reuses: :class:`TemporalTransformer`,
:class:`AlignmentHead`, :func:`lengths_to_mask`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from xmodal.contracts import Batch, Modality

AUDIO_EXTENSIONS = ("flac", "wav")
INT16_SCALE = 32768.0


def decode_audio(data: bytes, sample_rate: int, max_samples: int | None = None) -> Tensor:
    """Decode ``flac``/``wav`` bytes to mono int16 ``S`` at ``sample_rate``, keeping the first ``max_samples``."""
    wave, source_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if wave.shape[0] == 0:
        raise ValueError("empty audio")
    mono = torch.from_numpy(wave.mean(axis=1))
    if source_rate != sample_rate:
        if max_samples is not None:  # resample only what is kept (plus a margin for the filter)
            mono = mono[: math.ceil(max_samples * source_rate / sample_rate) + 64]
        mono = torchaudio.functional.resample(mono, source_rate, sample_rate)
    if max_samples is not None:
        mono = mono[:max_samples]
    return (mono * INT16_SCALE).round_().clamp_(-INT16_SCALE, INT16_SCALE - 1).to(torch.int16)


def encode_audio(wave: np.ndarray | Tensor, sample_rate: int, format: str = "FLAC") -> bytes:
    """Encode a mono waveform (float in [-1, 1] or int16, shape ``S``) as ``FLAC``/``WAV`` bytes (16-bit)."""
    array = wave.numpy() if isinstance(wave, Tensor) else np.asarray(wave)
    buf = io.BytesIO()
    sf.write(buf, array, sample_rate, format=format, subtype="PCM_16")
    return buf.getvalue()


class AudioModality(Modality):
    """Decode ``flac``/``wav`` fields to ``audio`` (int16 ``S``, mono, at ``sample_rate``).

    Args:
        sample_rate: rate the worker resamples to.
        max_seconds: keep the first ``max_seconds`` of each clip (``None`` keeps everything).
        gain_db: in training, scale each clip by a random gain uniform in ``[-gain_db, gain_db]`` dB (0 = off).
    """

    name = "audio"
    fields = ("audio", "audio_lengths")

    def __init__(self, sample_rate: int = 16000, max_seconds: float | None = 30.0, gain_db: float = 0.0) -> None:
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds
        self.gain_db = gain_db

    @property
    def max_samples(self) -> int | None:
        return None if self.max_seconds is None else round(self.max_seconds * self.sample_rate)

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        for ext in AUDIO_EXTENSIONS:
            if ext in sample:
                return {"audio": decode_audio(sample[ext], self.sample_rate, self.max_samples)}
        raise KeyError(f"sample {sample.get('__key__')!r} has no audio field ({', '.join(AUDIO_EXTENSIONS)})")

    def collate(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        waves = [item["audio"] for item in items]
        return {
            "audio": pad_sequence(waves, batch_first=True),
            "audio_lengths": torch.tensor([w.shape[0] for w in waves], dtype=torch.int64),
        }

    def on_device(self, batch: Batch, train: bool) -> Batch:
        audio = batch["audio"]
        audio = audio.float().div_(INT16_SCALE) if audio.dtype == torch.int16 else audio.float()
        if train and self.gain_db > 0:
            db = torch.empty(audio.shape[0], 1, device=audio.device).uniform_(-self.gain_db, self.gain_db)
            audio = (audio * torch.pow(10.0, db / 20.0)).clamp_(-1.0, 1.0)
        batch["audio"] = audio
        return batch


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``B`` lengths -> bool ``B x max_len``, True at valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def resample_to(features: Tensor, source_lengths: Tensor, target_lengths: Tensor, target_steps: int) -> Tensor:
    """Linearly resample each sequence's valid part to the target length, by centre-aligned positions.

    Args:
        features: ``B x S x D`` source features (padding beyond ``source_lengths`` is ignored).
        source_lengths: ``B`` valid source steps. target_lengths: ``B`` valid target steps.
        target_steps: ``T``, the padded target length.

    Returns:
        ``B x T x D``; step ``j < target_lengths[b]`` samples the source at ``(j + 0.5) * S_b / T_b - 0.5``.
    """
    b, _, d = features.shape
    steps = torch.arange(target_steps, device=features.device, dtype=torch.float32)[None, :]
    src = source_lengths.float().clamp(min=1)[:, None]
    tgt = target_lengths.float().clamp(min=1)[:, None]
    position = ((steps + 0.5) * src / tgt - 0.5).clamp(min=0)
    position = torch.minimum(position, src - 1)
    low = position.floor().long()
    high = torch.minimum(low + 1, (src - 1).long())
    frac = (position - low.float())[..., None]
    gather = lambda index: features.gather(1, index[..., None].expand(b, target_steps, d))  # noqa: E731
    return gather(low) * (1 - frac) + gather(high) * frac


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """The transformer's fixed sine/cosine position table, ``length x dim``."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


class TemporalTransformer(nn.Module):
    """Pre-norm transformer encoder over time with sinusoidal positions and a padding mask.

    Input ``B x T x dim`` and ``B`` lengths; output ``B x T x dim`` (padded positions are zeroed).
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # nested tensors are off: they are not used with norm_first and warn on every construction
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        valid = lengths_to_mask(lengths, x.shape[1])
        x = self.dropout(x + sinusoidal_positions(x.shape[1], x.shape[2], x.device).to(x.dtype))
        x = self.norm(self.encoder(x, src_key_padding_mask=~valid))
        return x * valid[..., None].to(x.dtype)


class AlignmentHead(nn.Module):
    """Per-step projection to a target (teacher) width: linear, or a two-layer MLP when ``hidden`` is set.

    Input ``... x in_dim``; output ``... x out_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        if hidden is None:
            self.proj: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def reflect_tails(wave: Tensor, lengths: Tensor, width: int) -> Tensor:
    """``B x S`` -> ``B x (S + width)``: each waveform continued past its own end by its reflection, as a centred
    STFT's reflect padding continues one waveform alone. Without it, a short clip's last frames would see the zeros
    its batch padded it with, and its features (and, through the normalisation, all its frames) would depend on the
    batch it came in: a cached teacher output would not match the live one."""
    out = nn.functional.pad(wave, (0, width))
    steps = torch.arange(width, device=wave.device)
    lengths = lengths.to(wave.device)[:, None]
    source = (lengths - 2 - steps).clamp(min=0, max=max(wave.shape[-1] - 1, 0))
    return out.scatter(1, lengths + steps, wave.gather(1, source))


class LogMel(nn.Module):
    """Log-mel spectrogram with per-utterance mean/variance normalisation over valid frames.

    Input float ``B x S`` waveform in [-1, 1] and ``B`` lengths (samples); output ``B x n_mels x F`` and ``B``
    lengths (frames). Computed in float32 even under autocast.
    """

    def __init__(
        self, sample_rate: int = 16000, n_fft: int = 400, hop_length: int = 160, n_mels: int = 80,
        normalize: bool = True, eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.hop_length = hop_length
        self.normalize = normalize
        self.eps = eps
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft, hop_length=hop_length, n_mels=n_mels)

    def num_frames(self, lengths: Tensor) -> Tensor:
        """Frames for ``lengths`` samples (centred STFT): ``lengths // hop_length + 1``."""
        return torch.div(lengths, self.hop_length, rounding_mode="floor") + 1

    def forward(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        frames = self.num_frames(lengths)
        with torch.autocast(wave.device.type, enabled=False):
            padded = reflect_tails(wave.float(), lengths, self.mel.spectrogram.n_fft // 2)
            feats = torch.log(self.mel(padded)[..., : int(self.num_frames(torch.tensor(wave.shape[-1])))] + self.eps)
        valid = lengths_to_mask(frames, feats.shape[-1])[:, None, :]
        if self.normalize:
            count = frames[:, None, None].to(feats.dtype)
            mean = (feats * valid).sum(-1, keepdim=True) / count
            var = (((feats - mean) * valid) ** 2).sum(-1, keepdim=True) / count
            feats = (feats - mean) / (var + self.eps).sqrt()
        return feats * valid, frames


def conv_frontend(n_mels: int, dim: int, stride: int, name: str = "stride") -> nn.Sequential:
    """Conv1d (kernel 3) + GELU, then ``log2(stride)`` stride-2 convs + GELU: log-mel ``B x n_mels x F`` ->
    ``B x dim x ceil(F / stride)`` (run it with :func:`masked_convs`). ``name``: the argument named in errors."""
    if stride < 1 or stride & (stride - 1):
        raise ValueError(f"{name} must be a power of two, got {stride}")
    layers: list[nn.Module] = [nn.Conv1d(n_mels, dim, 3, padding=1), nn.GELU()]
    for _ in range(int(math.log2(stride))):
        layers += [nn.Conv1d(dim, dim, 3, stride=2, padding=1), nn.GELU()]
    return nn.Sequential(*layers)


def masked_convs(layers: nn.Sequential, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Run conv1d/activation ``layers`` over ``B x C x T`` (stride-2 convs halve ``lengths``, rounding up), zeroing
    every activation past each clip's length: the next conv reads those positions at the clip's end, and they must
    be the zeros the clip would see alone, not ``act(bias)``, for a clip's features not to depend on its batch."""
    for layer in layers:
        x = layer(x)
        if isinstance(layer, nn.Conv1d):
            if layer.stride[0] != 1:
                lengths = torch.div(lengths + layer.stride[0] - 1, layer.stride[0], rounding_mode="floor")
        else:
            x = x * lengths_to_mask(lengths, x.shape[-1])[:, None].to(x.dtype)
    return x, lengths


class AudioEncoder(nn.Module):
    """Audio tower: log-mel -> conv frontend (time stride ``stride``) -> transformer.

    Args:
        dim: model width. depth: transformer layers. heads: attention heads.
        stride: total time subsampling of the frontend, a power of two (1, 2, 4...).
        sample_rate, n_fft, hop_length, n_mels: log-mel settings (10 ms hop at 16 kHz by default).
        mlp_ratio: transformer MLP width over ``dim``. dropout: transformer dropout.

    ``forward(wave, lengths)``: float ``B x S`` in [-1, 1] (int16 is converted) and ``B`` lengths (samples)
    -> features ``B x T' x dim`` (zero at padding) and ``B`` lengths ``T'`` (frames after subsampling).
    """

    def __init__(
        self, dim: int = 256, depth: int = 4, heads: int = 4, stride: int = 2, sample_rate: int = 16000,
        n_fft: int = 400, hop_length: int = 160, n_mels: int = 80, mlp_ratio: float = 4.0, dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.logmel = LogMel(sample_rate, n_fft, hop_length, n_mels)
        self.frontend = conv_frontend(n_mels, dim, stride)
        self.transformer = TemporalTransformer(dim, depth, heads, mlp_ratio, dropout)
        self.dim = dim

    def forward(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if wave.dtype == torch.int16:
            wave = wave.float() / INT16_SCALE
        x, out_lengths = masked_convs(self.frontend, *self.logmel(wave, lengths))
        return self.transformer(x.transpose(1, 2), out_lengths), out_lengths

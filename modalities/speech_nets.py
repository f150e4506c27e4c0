"""The from-scratch conformer ASR network that the lip-reading recipe trains as a student and then uses, frozen, as
its baseline teacher (:class:`~xmodal.teachers.conformer.ConformerTeacher`).

:class:`ConformerASR`: log-mel (80 bins, 10 ms hop, per-utterance normalised) -> 2-D conv subsampling (4x, so
40 ms = 25 Hz frames, the video rate) -> conformer blocks (Gulati et al., arXiv 2005.08100: half FFN, self-
attention, convolution module, half FFN, LayerNorm; absolute sinusoidal positions instead of relative ones) ->
a CTC head and a transformer attention decoder over :class:`~xmodal.modalities.transcript.CharVocab` characters.
Train it with ``Distiller(student=ConformerASR(...), teacher=None, losses=[CharCTCLoss, CharCELoss])`` reading
``audio.ctc_logits`` / ``audio.frames_mask`` and ``audio.char_logits`` (``xmodal.losses.libs``); export it with
:meth:`ConformerASR.export` (or :class:`~xmodal.students.asr.ExportPretrained`).

Outputs of ``forward(batch)``: ``audio.frames`` float ``B x T x D`` (zero at padding), ``audio.frames_mask``
bool ``B x T``, ``audio.ctc_logits`` ``B x T x V``, ``audio.char_logits`` ``B x (L+1) x V`` (teacher-forced on
``<sos>`` + the characters of ``transcript``; targets are the characters then ``<eos>``), ``audio.token_states``
``B x L x D``: the last decoder layer's cross-attention output at the step that predicts each character (the
decoder's tokens are characters; after ``out_proj``), ``audio.token_states_mask`` ``B x L``, ``audio.sequence``
``B x D`` (mean of valid frames).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from xmodal.contracts import Batch, Outputs
from xmodal.modalities.audio import INT16_SCALE, LogMel, lengths_to_mask, sinusoidal_positions
from xmodal.modalities.transcript import CharVocab, decoder_targets

EXPORT_FILE = "conformer.pt"
FRAME_RATE = 25.0  # Hz: 10 ms log-mel frames, subsampled 4x


class ConvSubsampling(nn.Module):
    """Two 3x3 stride-2 convs over (time, mel): ``B x n_mels x F`` -> ``B x ceil(ceil(F/2)/2) x dim``."""

    def __init__(self, n_mels: int, dim: int, channels: int = 32) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.proj = nn.Linear(channels * ((n_mels + 3) // 4), dim)

    @staticmethod
    def output_lengths(frames: Tensor) -> Tensor:
        for _ in range(2):
            frames = torch.div(frames + 1, 2, rounding_mode="floor")
        return frames

    def forward(self, feats: Tensor, frames: Tensor | None = None) -> Tensor:
        """``frames`` (``B`` valid lengths): zero the first conv's outputs past them, so that the second conv reads
        the same zeros at a clip's end whether or not its batch padded it (else it reads ``SiLU(bias)``)."""
        x = self.conv[:2](feats.transpose(1, 2)[:, None])  # B x C x T'' x M''
        if frames is not None:
            half = torch.div(frames + 1, 2, rounding_mode="floor")
            x = x * lengths_to_mask(half.to(x.device), x.shape[2])[:, None, :, None]
        x = self.conv[2:](x)  # B x C x T' x M'
        return self.proj(x.permute(0, 2, 1, 3).flatten(2))


class ConvModule(nn.Module):
    """Conformer convolution module: pointwise + GLU, depthwise (padding zeroed), LayerNorm, SiLU, pointwise."""

    def __init__(self, dim: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.depth_norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        y = nn.functional.glu(self.pointwise_in(self.norm(x)), dim=-1) * valid[..., None]
        y = self.depthwise(y.transpose(1, 2)).transpose(1, 2)
        return self.dropout(self.pointwise_out(nn.functional.silu(self.depth_norm(y))))


class ConformerBlock(nn.Module):
    """``x + FFN/2 -> + MHSA -> + Conv -> + FFN/2 -> LayerNorm`` on ``B x T x dim`` with a padding mask."""

    def __init__(self, dim: int, heads: int, ff_mult: int = 4, kernel: int = 15, dropout: float = 0.1) -> None:
        super().__init__()

        def ffn() -> nn.Sequential:
            return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(ff_mult * dim, dim), nn.Dropout(dropout))

        self.ff1, self.ff2 = ffn(), ffn()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.conv = ConvModule(dim, kernel, dropout)
        self.out_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = x + 0.5 * self.ff1(x)
        h = self.attn_norm(x)
        x = x + self.dropout(self.attn(h, h, h, key_padding_mask=~valid, need_weights=False)[0])
        x = x + self.conv(x, valid)
        return self.out_norm(x + 0.5 * self.ff2(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer that also returns its cross-attention output ``B x N x dim``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: Tensor, memory: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        n = y.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=y.device).triu(1)
        h = self.norms[0](y)
        y = y + self.dropout(self.self_attn(h, h, h, attn_mask=causal, need_weights=False)[0])
        context = self.cross_attn(self.norms[1](y), memory, memory, key_padding_mask=~valid, need_weights=False)[0]
        y = y + self.dropout(context)
        return y + self.dropout(self.ffn(self.norms[2](y))), context


class ConformerASR(nn.Module):
    """Conformer encoder + CTC head + attention decoder over characters (see the module docstring).

    Args:
        dim: model width. depth: conformer blocks. heads: attention heads. decoder_depth: decoder layers.
        kernel: depthwise conv kernel. dropout: dropout everywhere. n_mels: log-mel bins.
        max_chars: longest transcript the decoder's position table covers.
    """

    def __init__(
        self, dim: int = 144, depth: int = 4, heads: int = 4, decoder_depth: int = 1, kernel: int = 15,
        dropout: float = 0.1, n_mels: int = 80, max_chars: int = 256,
    ) -> None:
        super().__init__()
        self.config = {"dim": dim, "depth": depth, "heads": heads, "decoder_depth": decoder_depth,
                       "kernel": kernel, "dropout": dropout, "n_mels": n_mels, "max_chars": max_chars}
        self.vocab = CharVocab()
        self.logmel = LogMel(n_mels=n_mels)
        self.subsample = ConvSubsampling(n_mels, dim)
        self.blocks = nn.ModuleList(ConformerBlock(dim, heads, kernel=kernel, dropout=dropout) for _ in range(depth))
        self.ctc_head = nn.Linear(dim, len(self.vocab))
        self.embed = nn.Embedding(len(self.vocab), dim)
        self.decoder = nn.ModuleList(DecoderLayer(dim, heads, dropout) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim)
        self.char_head = nn.Linear(dim, len(self.vocab))
        self.char_positions: Tensor
        self.register_buffer("char_positions", sinusoidal_positions(max_chars + 1, dim), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.output_keys: tuple[str, ...] = (
            "audio.frames", "audio.frames_mask", "audio.ctc_logits", "audio.char_logits",
            "audio.token_states", "audio.token_states_mask", "audio.sequence",
        )

    def encode(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Waveform ``B x S`` (float or int16) + ``B`` sample counts -> states ``B x T x dim`` and mask ``B x T``."""
        wave = wave.float() / INT16_SCALE if wave.dtype == torch.int16 else wave.float()
        feats, frames = self.logmel(wave, lengths)
        x = self.subsample(feats, frames)
        valid = lengths_to_mask(self.subsample.output_lengths(frames).clamp(max=x.shape[1]), x.shape[1])
        x = self.dropout(x + sinusoidal_positions(x.shape[1], x.shape[2], x.device))
        for block in self.blocks:
            x = block(x, valid)
        return x * valid[..., None], valid

    def decode_steps(self, memory: Tensor, valid: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: ids ``B x N`` -> logits ``B x N x V`` and last-layer contexts ``B x N x dim``."""
        y = self.dropout(self.embed(inputs) + self.char_positions[: inputs.shape[1]])
        context = y
        for layer in self.decoder:
            y, context = layer(y, memory, valid)
        return self.char_head(self.decoder_norm(y)), context

    def forward(self, batch: Batch) -> Outputs:
        memory, valid = self.encode(batch["audio"], batch["audio_lengths"].to(batch["audio"].device))
        inputs, _, lengths = decoder_targets(self.vocab, batch["transcript"])
        inputs = inputs[:, : self.char_positions.shape[0]].to(memory.device)
        logits, context = self.decode_steps(memory, valid, inputs)
        n_chars = context.shape[1] - 1
        context_mask = lengths_to_mask(lengths.to(memory.device).clamp(max=n_chars), n_chars)
        return {
            "audio.frames": memory, "audio.frames_mask": valid, "audio.ctc_logits": self.ctc_head(memory),
            "audio.char_logits": logits, "audio.token_states": context[:, :n_chars] * context_mask[..., None],
            "audio.token_states_mask": context_mask,
            "audio.sequence": memory.sum(1) / valid.sum(1, keepdim=True).clamp(min=1),
        }

    def ctc_greedy_ids(self, ctc_logits: Tensor, valid: Tensor) -> list[list[int]]:
        """Best-path CTC decoding: argmax per frame, merge repeats, drop blanks -> character ids per sample."""
        rows = []
        for row, n in zip(ctc_logits.argmax(-1).tolist(), valid.sum(1).tolist(), strict=True):
            rows.append([c for i, c in enumerate(row[:n]) if c != self.vocab.blank and (i == 0 or c != row[i - 1])])
        return rows

    def ctc_greedy(self, ctc_logits: Tensor, valid: Tensor) -> list[str]:
        """Best-path CTC transcripts (:meth:`ctc_greedy_ids`, decoded)."""
        return [self.vocab.decode(ids) for ids in self.ctc_greedy_ids(ctc_logits, valid)]

    def export(self, dst: str | Path) -> None:
        """Write ``dst/conformer.pt`` (config + weights) for :class:`~xmodal.teachers.conformer.ConformerTeacher`."""
        Path(dst).mkdir(parents=True, exist_ok=True)
        torch.save({"config": self.config, "state_dict": self.state_dict()}, Path(dst) / EXPORT_FILE)
        (Path(dst) / "config.json").write_text(json.dumps({"class": "ConformerASR", **self.config}, indent=2))

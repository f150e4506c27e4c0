"""A sequence-to-sequence lip reader (the LIBS / MixSpeech student) and its audio branch as a frozen teacher.

:class:`LipReader`: 3D-conv frontend -> ResNet-lite per frame -> temporal encoder (BiGRU or transformer) ->
attention decoder over a :class:`~xmodal.modalities.transcript.CharVocab` (``vocabulary``), teacher-forced on
``transcript`` in training; an optional CTC head; greedy and beam-search decoding. With ``audio_frontend=True`` it
also has a log-mel conv frontend whose features are resampled to the video rate and mixed with the visual ones
(MixSpeech, ``m = lam * a + (1 - lam) * v``) before the shared temporal encoder and decoder.

Outputs (``B`` clips, ``Tv`` video frames, ``L`` characters of the longest transcript, ``V`` vocabulary):
``video.frames`` ``B x Tv x dim`` and ``video.frames_mask``, ``video.sequence`` ``B x dim`` (mean of valid
frames), ``video.context`` ``B x L x dim`` (decoder context vector per character) and ``video.context_mask``,
``video.char_logits`` ``B x (L+1) x V`` (next character, ``<eos>`` last), ``video.ctc_logits`` ``B x Tv x V``
(with ``ctc=True``) and ``av.char_logits`` (the mixed stream, with ``audio_frontend=True`` and audio in the batch).

:class:`LipReaderAudioTeacher` runs the audio branch alone (frozen) and produces the LIBS teacher contract
(generic outputs like :class:`~xmodal.teachers.whisper.WhisperTeacher`'s: encoder frames, per-character decoder
states, greedy hypotheses); the tiny configs use it with random weights so the recipe runs end to end without
downloading Whisper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from xmodal.checkpoint import state_dict_digest
from xmodal.contracts import Batch, Outputs, Student, Teacher, freeze, to_float_image
from xmodal.modalities.audio import (
    INT16_SCALE,
    LogMel,
    TemporalTransformer,
    conv_frontend,
    lengths_to_mask,
    masked_convs,
    resample_to,
)
from xmodal.modalities.blocks import conv_bn
from xmodal.modalities.image import OPENAI_MEAN, OPENAI_STD
from xmodal.modalities.transcript import (
    VocabularySpec,
    decoder_targets,
    identity_char_tokens,
    load_vocabulary,
    texts_to_codepoints,
)
from xmodal.zoo.hub import HubMixin

MEL_FRAME_RATE = 100.0  # Hz: the 10 ms hop of the audio frontend's log-mel


class ResBlock(nn.Module):
    """Basic residual block (two 3x3 convs) with a strided 1x1 shortcut: ``N x cin x H x W -> N x cout x H/s x W/s``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class VisualFrontend(nn.Module):
    """Conv3d (5, 7, 7) stride (1, 2, 2) -> per-frame BN/ReLU/max-pool -> two residual blocks -> pool -> linear.

    ``forward(video, valid)``: normalised ``B x T x 3 x H x W`` (zero at padding) and bool ``B x T`` ->
    ``B x T x dim`` (zero at padding). Only valid frames reach the batch-norm statistics.
    """

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(3, channels, (5, 7, 7), (1, 2, 2), (2, 3, 3), bias=False)
        self.stem = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        self.trunk = nn.Sequential(ResBlock(channels, 2 * channels, 2), ResBlock(2 * channels, 4 * channels, 2))
        self.proj = nn.Linear(4 * channels, dim)

    def forward(self, video: Tensor, valid: Tensor) -> Tensor:
        b, t = valid.shape
        x = self.conv3d(video.transpose(1, 2)).transpose(1, 2)
        frames = self.trunk(self.stem(x[valid])).mean(dim=(-2, -1))
        out = frames.new_zeros(b, t, frames.shape[-1])
        out[valid] = frames
        return self.proj(out) * valid[..., None].to(out.dtype)


class AudioFrontend(nn.Module):
    """Log-mel (10 ms hop) -> conv1d -> ``log2(stride)`` stride-2 convs: ``B x S`` waveform -> ``B x F' x dim``.

    ``stride=4`` gives 25 Hz (the video rate), ``stride=2`` 50 Hz.
    """

    def __init__(self, dim: int, stride: int = 4, n_mels: int = 40, sample_rate: int = 16000) -> None:
        super().__init__()
        self.logmel = LogMel(sample_rate, n_fft=400, hop_length=160, n_mels=n_mels)
        self.convs = conv_frontend(n_mels, dim, stride, name="audio_stride")

    def forward(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if wave.dtype == torch.int16:
            wave = wave.float() / INT16_SCALE
        x, frames = masked_convs(self.convs, *self.logmel(wave, lengths))
        return x.transpose(1, 2), frames


class TemporalEncoder(nn.Module):
    """BiGRU (``kind="gru"``) or transformer over time: ``B x T x dim`` and ``B`` lengths -> ``B x T x dim``."""

    def __init__(self, dim: int, depth: int, kind: str, heads: int, dropout: float) -> None:
        super().__init__()
        if kind not in ("gru", "transformer"):
            raise ValueError(f"encoder must be 'gru' or 'transformer', got {kind!r}")
        self.kind = kind
        if kind == "gru":
            if dim % 2:
                raise ValueError(f"a BiGRU encoder needs an even dim, got {dim}")
            self.rnn = nn.GRU(dim, dim // 2, depth, batch_first=True, bidirectional=True,
                              dropout=dropout if depth > 1 else 0.0)
        else:
            self.transformer = TemporalTransformer(dim, depth, heads, dropout=dropout)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        if self.kind == "transformer":
            return self.transformer(x, lengths)
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out * lengths_to_mask(lengths, x.shape[1])[..., None].to(out.dtype)


class AttentionDecoder(nn.Module):
    """GRU decoder with dot-product attention over the encoder states (Luong style).

    Step ``i``: ``h_i = GRU([emb(y_{i-1}); c_{i-1}], h_{i-1})``, ``c_i = attend(h_i, memory)``,
    ``logits_i = W [h_i; c_i]``. ``c_i`` is the context vector that LIBS distils at the context level.
    """

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Embedding(vocab_size, dim)
        self.cell = nn.GRUCell(2 * dim, dim)
        self.init = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.out = nn.Linear(2 * dim, vocab_size)

    def start(self, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Initial state ``h`` ``B x dim``, context ``B x dim`` and attention keys ``B x T x dim``."""
        pooled = (memory * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return torch.tanh(self.init(pooled)), memory.new_zeros(memory.shape[0], self.dim), self.key(memory)

    def step(
        self, y: Tensor, h: Tensor, c: Tensor, keys: Tensor, memory: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One step from previous tokens ``y`` (``B``): returns logits ``B x V``, new ``h`` and context ``c``."""
        h = self.cell(torch.cat([self.embed(y), c], dim=-1), h)
        scores = torch.einsum("bd,btd->bt", self.query(h), keys) / math.sqrt(self.dim)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        c = torch.einsum("bt,btd->bd", weights, memory)
        return self.out(torch.cat([h, c], dim=-1)), h, c

    def forward(self, memory: Tensor, mask: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: ``inputs`` ``B x N`` -> logits ``B x N x V`` and contexts ``B x N x dim``."""
        h, c, keys = self.start(memory, mask)
        logits, contexts = [], []
        for i in range(inputs.shape[1]):
            step_logits, h, c = self.step(inputs[:, i], h, c, keys, memory, mask)
            logits.append(step_logits)
            contexts.append(c)
        return torch.stack(logits, 1), torch.stack(contexts, 1)


class LipReader(nn.Module, HubMixin, Student):
    """Seq2seq lip reader (see the module docstring).

    Args:
        dim: width of frontends, encoder and decoder. channels: width of the 3D conv (the trunk goes to 4x).
        encoder: ``"gru"`` (bidirectional) or ``"transformer"``. depth: encoder layers. heads: transformer heads.
        ctc: add a CTC head on the encoder states (``video.ctc_logits``).
        audio_frontend: add the MixSpeech audio branch (log-mel conv frontend at ``audio_stride`` x 10 ms).
        audio_stride: time subsampling of the audio frontend (4 -> 25 Hz). n_mels: log-mel bands.
        max_len: longest decoded transcript (characters). dropout: encoder dropout.
        mean, std: per-channel normalisation of [0, 1] frames.
        vocabulary: the characters the decoder and CTC head predict (``None``: English ``a-z``; a list, a file or a
            converted corpus folder, see :func:`~xmodal.modalities.transcript.load_vocabulary`). A non-default one
            is recorded in ``init_args`` as its characters, so a saved model rebuilds without the file.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, dim: int = 256, channels: int = 32, encoder: Literal["gru", "transformer"] = "gru", depth: int = 2,
        heads: int = 4, ctc: bool = False, audio_frontend: bool = False, audio_stride: int = 4, n_mels: int = 40,
        max_len: int = 100, dropout: float = 0.1, mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD, vocabulary: VocabularySpec = None,
    ) -> None:
        super().__init__()
        self.init_args: dict[str, Any] = {
            "dim": dim, "channels": channels, "encoder": encoder, "depth": depth, "heads": heads, "ctc": ctc,
            "audio_frontend": audio_frontend, "audio_stride": audio_stride, "n_mels": n_mels, "max_len": max_len,
            "dropout": dropout, "mean": list(mean), "std": list(std),
        }
        self.vocab = load_vocabulary(vocabulary)
        if not self.vocab.is_default:  # the default stays out, so existing configs and cards are unchanged
            self.init_args["vocabulary"] = self.vocab.to_json()
        self.max_len = max_len
        self.mix_lambda = 0.0  # MixSpeech ratio of audio in the mixed stream; set by MixSpeechSchedule
        self.register_buffer("mean", torch.tensor(mean).view(1, 1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 1, -1, 1, 1), persistent=False)
        self.visual = VisualFrontend(dim, channels)
        self.audio = AudioFrontend(dim, audio_stride, n_mels) if audio_frontend else None
        self.encoder = TemporalEncoder(dim, depth, encoder, heads, dropout)
        self.decoder = AttentionDecoder(len(self.vocab), dim)
        self.ctc_head = nn.Linear(dim, len(self.vocab)) if ctc else None
        keys = ["video.frames", "video.frames_mask", "video.sequence", "video.context", "video.context_mask",
                "video.char_logits"]
        self.output_keys = tuple(keys + ["video.ctc_logits"] * ctc + ["av.char_logits"] * audio_frontend)

    def visual_features(self, video: Tensor, lengths: Tensor) -> Tensor:
        """Frontend features of ``B x T x 3 x H x W`` frames (uint8 or [0, 1]): ``B x T x dim``, zero at padding."""
        valid = lengths_to_mask(lengths, video.shape[1])
        video = (to_float_image(video) - self.mean) / self.std
        return self.visual(video * valid[:, :, None, None, None].to(video.dtype), valid)

    def audio_features(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Audio frontend features ``B x F x dim`` (at ``audio_stride`` x 10 ms) and their ``B`` lengths."""
        if self.audio is None:
            raise RuntimeError("this LipReader has no audio frontend (audio_frontend=False)")
        return self.audio(wave, lengths)

    def mixed_features(self, visual: Tensor, video_lengths: Tensor, wave: Tensor, wave_lengths: Tensor) -> Tensor:
        """MixSpeech ``lam * a + (1 - lam) * v`` at the video rate (audio resampled to each clip's frame count)."""
        lam = float(self.mix_lambda)
        if lam == 0.0:
            return visual
        audio, audio_lengths = self.audio_features(wave, wave_lengths)
        audio = resample_to(audio, audio_lengths, video_lengths, visual.shape[1])
        audio = audio * lengths_to_mask(video_lengths, visual.shape[1])[..., None].to(audio.dtype)
        return lam * audio + (1.0 - lam) * visual

    def stream(self, feats: Tensor, lengths: Tensor, texts: Sequence[str] | None, prefix: str) -> Outputs:
        """Encoder + (teacher-forced) decoder over frontend features ``B x T x dim``; outputs keyed ``prefix.*``."""
        mask = lengths_to_mask(lengths, feats.shape[1])
        states = self.encoder(feats, lengths)
        out = {f"{prefix}.frames": states, f"{prefix}.frames_mask": mask,
               f"{prefix}.sequence": (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)}
        if self.ctc_head is not None:
            out[f"{prefix}.ctc_logits"] = self.ctc_head(states)
        if texts is not None:
            inputs, _, char_lengths = decoder_targets(self.vocab, texts)
            logits, contexts = self.decoder(states, mask, inputs.to(feats.device))
            out[f"{prefix}.char_logits"] = logits
            out[f"{prefix}.context"] = contexts[:, :-1]
            out[f"{prefix}.context_mask"] = lengths_to_mask(char_lengths.to(feats.device), contexts.shape[1] - 1)
        return out

    def forward(self, batch: Batch) -> Outputs:
        video = batch["video"]
        lengths = batch["video_lengths"].to(video.device)
        texts = batch.get("transcript")
        visual = self.visual_features(video, lengths)
        out = self.stream(visual, lengths, texts, "video")
        if self.audio is not None and texts is not None and "audio" in batch:
            wave_lengths = batch["audio_lengths"].to(video.device)
            mixed = self.mixed_features(visual, lengths, batch["audio"], wave_lengths)
            out["av.char_logits"] = self.stream(mixed, lengths, texts, "av")["av.char_logits"]
        return out

    def encode(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Encoder states ``B x T x dim`` and bool mask ``B x T`` of the visual stream."""
        lengths = batch["video_lengths"].to(batch["video"].device)
        states = self.encoder(self.visual_features(batch["video"], lengths), lengths)
        return states, lengths_to_mask(lengths, states.shape[1])

    @torch.no_grad()
    def greedy_decode(self, states: Tensor, mask: Tensor) -> list[str]:
        """Greedy transcripts from encoder states ``B x T x dim`` and mask ``B x T``."""
        b = states.shape[0]
        h, c, keys = self.decoder.start(states, mask)
        y = torch.full((b,), self.vocab.sos, dtype=torch.long, device=states.device)
        tokens, done = [], torch.zeros(b, dtype=torch.bool, device=states.device)
        for _ in range(self.max_len + 1):
            logits, h, c = self.decoder.step(y, h, c, keys, states, mask)
            y = logits.argmax(-1)
            tokens.append(y)
            done |= y == self.vocab.eos
            if bool(done.all()):
                break
        ids = torch.stack(tokens, 1).cpu()
        return [self.vocab.decode(row) for row in ids]

    @torch.no_grad()
    def beam_decode(self, states: Tensor, mask: Tensor, beam_size: int = 4, length_penalty: float = 1.0) -> list[str]:
        """Beam-search transcripts, one utterance at a time; ``beam_size=1`` is greedy decoding.

        Hypotheses are ranked by ``log p / steps ** length_penalty`` (``steps`` counts ``<eos>``). Each step keeps
        the ``beam_size`` best unfinished expansions; finished ones are collected, and the search stops when no
        unfinished hypothesis can still beat the best finished one (log-probabilities only fall) or at ``max_len``.
        """
        if beam_size <= 1:
            return self.greedy_decode(states, mask)
        return [self._beam_one(states[i : i + 1], mask[i : i + 1], beam_size, length_penalty)
                for i in range(states.shape[0])]

    def _beam_one(self, states: Tensor, mask: Tensor, beam_size: int, length_penalty: float) -> str:
        h, c, keys = self.decoder.start(states, mask)
        beams: list[tuple[float, list[int]]] = [(0.0, [self.vocab.sos])]
        finished: list[tuple[float, list[int]]] = []
        best_possible = float((self.max_len + 1) ** length_penalty)
        for _ in range(self.max_len + 1):
            k = len(beams)
            y = torch.tensor([seq[-1] for _, seq in beams], device=states.device)
            logits, h, c = self.decoder.step(y, h, c, keys.expand(k, -1, -1), states.expand(k, -1, -1),
                                             mask.expand(k, -1))
            scores = torch.tensor([s for s, _ in beams])[:, None] + logits.log_softmax(-1).cpu()
            finished += [(float(scores[row, self.vocab.eos]) / len(seq) ** length_penalty, seq + [self.vocab.eos])
                         for row, (_, seq) in enumerate(beams)]
            scores[:, self.vocab.eos] = float("-inf")
            top = scores.flatten().topk(min(beam_size, k * (scores.shape[1] - 1)))
            rows = [flat // scores.shape[1] for flat in top.indices.tolist()]
            beams = [(score, beams[row][1] + [flat % scores.shape[1]])
                     for score, row, flat in zip(top.values.tolist(), rows, top.indices.tolist(), strict=True)]
            index = torch.tensor(rows, device=states.device)
            h, c = h[index], c[index]
            if max(f[0] for f in finished) >= beams[0][0] / best_possible:
                break
        return self.vocab.decode(max(finished, key=lambda item: item[0])[1][1:])

    @torch.no_grad()
    def transcribe(self, batch: Batch, beam_size: int = 1) -> list[str]:
        """Transcripts of a batch's video: greedy with ``beam_size=1``, beam search otherwise."""
        states, mask = self.encode(batch)
        if beam_size <= 1:
            return self.greedy_decode(states, mask)
        return self.beam_decode(states, mask, beam_size)


class LipReaderAudioTeacher(nn.Module, Teacher):
    """The audio branch of a :class:`LipReader` as a frozen seq2seq ASR teacher (LIBS contract).

    Args:
        checkpoint: a zoo folder of a ``LipReader`` trained with ``audio_frontend=True`` (``xmodal.create_model``);
            ``None`` builds a randomly initialised one from ``lipreader`` (tests, smoke runs).
        lipreader: ``LipReader`` constructor arguments when ``checkpoint`` is ``None`` (``audio_frontend`` is forced
            on; ``audio_stride: 2`` makes 50 Hz frames like Whisper's encoder).
        seed: seed of the random initialisation.

    Outputs: ``audio.frames`` ``B x Ta x D`` (zero at padding), ``audio.frames_mask``, ``audio.frame_rate`` (Hz),
    ``audio.sequence`` ``B x D``; the decoder's tokens are characters: ``audio.token_ids`` ``B x L``,
    ``audio.token_states`` ``B x L x D`` (context vectors, teacher-forced on ``transcript``), ``audio.char_token``
    ``B x L`` (character ``i`` is token ``i``), each with its ``_mask``; ``audio.hypothesis_chars`` (code points of
    the greedy transcript) + ``audio.hypothesis_chars_mask``.
    """

    output_keys = (
        "audio.frames", "audio.frames_mask", "audio.frame_rate", "audio.sequence", "audio.token_ids",
        "audio.token_ids_mask", "audio.token_states", "audio.token_states_mask", "audio.char_token",
        "audio.char_token_mask", "audio.hypothesis_chars", "audio.hypothesis_chars_mask",
    )
    model: LipReader

    def __init__(self, checkpoint: str | None = None, lipreader: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__()
        if checkpoint is not None:
            from xmodal.zoo import create_model

            model = create_model(checkpoint)
        else:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            model = LipReader(**{**(lipreader or {}), "audio_frontend": True})
            torch.random.set_rng_state(generator_state)
        if not isinstance(model, LipReader) or model.audio is None:
            raise TypeError("the teacher checkpoint must be a LipReader with audio_frontend=True")
        freeze(model)
        self.model = model
        self.checkpoint = checkpoint

    def train(self, mode: bool = True) -> LipReaderAudioTeacher:
        return super().train(False)  # frozen, eval() forever

    @torch.no_grad()
    def forward(self, batch: Batch) -> Outputs:
        wave = batch["audio"]
        feats, lengths = self.model.audio_features(wave, batch["audio_lengths"].to(wave.device))
        out = self.model.stream(feats, lengths, batch["transcript"], "audio")
        mask = out["audio.context_mask"]
        chars, chars_mask = texts_to_codepoints(
            self.model.greedy_decode(out["audio.frames"], out["audio.frames_mask"]), wave.device
        )
        token_ids = self.model.vocab.batch_targets(batch["transcript"])[0].to(wave.device)
        return {
            "audio.frames": out["audio.frames"], "audio.frames_mask": out["audio.frames_mask"],
            "audio.frame_rate": torch.tensor(MEL_FRAME_RATE / self.model.init_args["audio_stride"], device=wave.device),
            "audio.sequence": out["audio.sequence"], "audio.token_ids": token_ids, "audio.token_ids_mask": mask,
            "audio.token_states": out["audio.context"], "audio.token_states_mask": mask,
            "audio.char_token": identity_char_tokens(mask), "audio.char_token_mask": mask,
            "audio.hypothesis_chars": chars, "audio.hypothesis_chars_mask": chars_mask,
        }

    def manifest(self) -> dict[str, Any]:
        return {"teacher": type(self).__name__, "checkpoint": self.checkpoint,
                "weights_sha256": state_dict_digest(self.model.state_dict()), "preprocessing": {"sample_rate": 16000},
                "output_keys": list(self.output_keys)}

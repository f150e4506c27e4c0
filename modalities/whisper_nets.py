"""Whisper's network side that the frozen teacher (:class:`~xmodal.teachers.whisper.WhisperTeacher`) and the
trainable Whisper of the adaptation stage (:class:`~xmodal.students.asr.WhisperASR`) share: :class:`WhisperFrontend`
(model, tokenizer, token ids, features, greedy decoding, export).

Preprocessing, on the device: float waveform at ``input_sample_rate`` -> resampled to 16 kHz -> trimmed or
zero-padded to ``seconds`` -> Whisper's log-mel (80 bins, 25 ms window, 10 ms hop, ``log10``, floor at the
utterance's max - 8, ``(x + 4) / 4``; the same numbers as ``WhisperFeatureExtractor``).

Short clips: the ``transformers`` encoder insists on 30 s of mel frames. :func:`slice_encoder_positions` sets
``max_source_positions`` to ``50 * seconds`` and keeps the first rows of the (sinusoidal, frozen) position table,
so a 4 s window costs 4 s of compute. Whisper's encoder has no padding mask, so the encoder states of a clip
depend slightly on how much silence follows it: the sliced path is *not* bit-equal to the 30 s padded path
(tiny.en: see the tests and the report), but it is what CTranslate2 does for short inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchaudio
import transformers
from torch import Tensor, nn

from xmodal.contracts import Batch
from xmodal.modalities.audio import INT16_SCALE, lengths_to_mask
from xmodal.modalities.hf_nets import build_model
from xmodal.modalities.transcript import normalize_transcript

SAMPLE_RATE = 16000
# the decoder's cache argument: ``cache`` since transformers 5.x deprecated ``past_key_values``
_DECODER_FORWARD = transformers.models.whisper.modeling_whisper.WhisperDecoder.forward
CACHE_KWARG = "cache" if "cache" in inspect.signature(_DECODER_FORWARD).parameters else "past_key_values"
HOP_LENGTH = 160
N_FFT = 400


# ---------------------------------------------------------------- features and the short-input trick
def whisper_log_mel(wave: Tensor, mel_filters: Tensor) -> Tensor:
    """Whisper's log-mel spectrogram of zero-padded waveforms.

    Args:
        wave: float ``B x S`` at 16 kHz, already padded to the window length.
        mel_filters: ``F x n_mels`` filter bank (``WhisperFeatureExtractor.mel_filters``, ``F = 201``).

    Returns:
        ``B x n_mels x S // 160``, as ``WhisperFeatureExtractor`` computes it (per-row floor at max - 8).
    """
    with torch.autocast(wave.device.type, enabled=False):
        window = torch.hann_window(N_FFT, device=wave.device)
        stft = torch.stft(wave.float(), N_FFT, HOP_LENGTH, window=window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        log_spec = torch.clamp(mel_filters.T.float() @ power, min=1e-10).log10()
        floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0
        return (torch.maximum(log_spec, floor) + 4.0) / 4.0


def slice_encoder_positions(model: Any, positions: int) -> None:
    """Make a ``WhisperForConditionalGeneration``'s encoder accept ``2 * positions`` mel frames.

    Sets ``max_source_positions`` and replaces ``embed_positions`` with its first ``positions`` rows (frozen, as
    ``transformers`` keeps them). Growing back needs the original table: pass ``full_table`` to
    :func:`restore_encoder_positions`.
    """
    encoder = model.get_encoder()
    table = encoder.embed_positions.weight.detach()
    if positions > table.shape[0]:
        raise ValueError(f"the encoder has {table.shape[0]} positions; {positions} were asked for")
    embedding = nn.Embedding(positions, table.shape[1], device=table.device, dtype=table.dtype)
    embedding.weight.data.copy_(table[:positions])
    embedding.requires_grad_(False)
    encoder.embed_positions = embedding
    encoder.max_source_positions = positions
    encoder.config.max_source_positions = positions


def restore_encoder_positions(model: Any, full_table: Tensor) -> None:
    """Put the full ``P x D`` position table back (the inverse of :func:`slice_encoder_positions`)."""
    encoder = model.get_encoder()
    embedding = nn.Embedding(full_table.shape[0], full_table.shape[1], device=full_table.device, dtype=full_table.dtype)
    embedding.weight.data.copy_(full_table)
    embedding.requires_grad_(False)
    encoder.embed_positions = embedding
    encoder.max_source_positions = full_table.shape[0]
    encoder.config.max_source_positions = full_table.shape[0]


def load_tokenizer(path: str | Path) -> Any:
    """A Whisper tokenizer from a folder (``tokenizer.json`` inside) or a ``tokenizer.json`` file; offline."""
    path = Path(path)
    if path.is_file():
        return transformers.WhisperTokenizer(tokenizer_file=str(path))
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def token_id_defaults(model: Any) -> dict[str, Any]:
    """Prompt, eos and suppression lists from the model's config / generation config."""
    config, generation = model.config, getattr(model, "generation_config", None)
    no_ts = getattr(generation, "no_timestamps_token_id", None)
    prompt = [config.decoder_start_token_id] + ([no_ts] if no_ts is not None else [])
    return {
        "prompt_ids": prompt, "eos_id": config.eos_token_id,
        "suppress_ids": list(getattr(generation, "suppress_tokens", None) or config.suppress_tokens or []),
        "suppress_ids_begin": list(
            getattr(generation, "begin_suppress_tokens", None) or config.begin_suppress_tokens or []
        ),
    }


class WhisperFrontend(nn.Module):
    """What the teacher and the trainable wrapper share: the model, tokenizer, token ids and features.

    Args:
        model: a local ``transformers`` Whisper folder (``xmodal convert whisper-ct2`` writes one).
        config: instead of ``model``, a ``WhisperConfig`` dict (``model_type: whisper`` + fields) for a random model.
        tokenizer: tokenizer folder or ``tokenizer.json``; defaults to ``model``.
        seconds: analysis window; clips are trimmed or zero-padded to it (``50 * seconds`` encoder frames).
        prompt_ids, eos_id, suppress_ids, suppress_ids_begin: decoding tokens; default from the model's
            (generation) config: ``[<|startoftranscript|>, <|notimestamps|>]`` = ``[50257, 50362]`` for tiny.en.
        input_sample_rate: rate of the batch's ``audio``.
        seed: seed of the random init when built from ``config``.
    """

    def __init__(
        self, model: str | None = None, config: dict[str, Any] | None = None, tokenizer: str | None = None,
        seconds: float = 4.0, prompt_ids: Sequence[int] | None = None, eos_id: int | None = None,
        suppress_ids: Sequence[int] | None = None, suppress_ids_begin: Sequence[int] | None = None,
        input_sample_rate: int = SAMPLE_RATE, seed: int = 0,
    ) -> None:
        super().__init__()
        self.model_name, self.config_dict, self.seed = model, config, seed
        self.model: Any = build_model(model, config, "WhisperForConditionalGeneration", seed)
        self.full_positions = self.model.get_encoder().embed_positions.weight.detach().clone()
        self.positions = round(seconds * SAMPLE_RATE / HOP_LENGTH) // 2
        slice_encoder_positions(self.model, self.positions)
        self.seconds, self.input_sample_rate = seconds, input_sample_rate
        tokenizer_path = tokenizer or model
        if tokenizer_path is None:
            raise ValueError("give tokenizer (a folder or tokenizer.json) when building Whisper from a config")
        self.tokenizer_path = str(tokenizer_path)
        self.tokenizer = load_tokenizer(tokenizer_path)
        defaults = token_id_defaults(self.model)
        self.prompt_ids = list(prompt_ids if prompt_ids is not None else defaults["prompt_ids"])
        self.eos_id = int(eos_id if eos_id is not None else defaults["eos_id"])
        self.suppress_ids = list(suppress_ids if suppress_ids is not None else defaults["suppress_ids"])
        self.suppress_ids_begin = list(
            suppress_ids_begin if suppress_ids_begin is not None else defaults["suppress_ids_begin"]
        )
        mel = transformers.WhisperFeatureExtractor(feature_size=self.model.config.num_mel_bins).mel_filters
        self.mel_filters: Tensor
        self.register_buffer("mel_filters", torch.as_tensor(mel, dtype=torch.float32), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mel_filters.device

    def features(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Batch ``audio`` ``B x S`` + ``audio_lengths`` -> log-mel ``B x n_mels x 100 * seconds`` and ``B``
        valid encoder frames (``ceil(samples / 320)``, at most ``50 * seconds``)."""
        wave, lengths = batch["audio"].to(self.device), batch["audio_lengths"].to(self.device)
        wave = wave.float() / INT16_SCALE if wave.dtype == torch.int16 else wave.float()
        if self.input_sample_rate != SAMPLE_RATE:
            wave = torchaudio.functional.resample(wave, self.input_sample_rate, SAMPLE_RATE)
            lengths = torch.ceil(lengths * (SAMPLE_RATE / self.input_sample_rate)).long()
        window = 2 * self.positions * HOP_LENGTH
        wave = wave * lengths_to_mask(lengths, wave.shape[-1])
        wave = nn.functional.pad(wave, (0, max(0, window - wave.shape[-1])))[:, :window]
        frames = torch.div(lengths.clamp(max=window) + 2 * HOP_LENGTH - 1, 2 * HOP_LENGTH, rounding_mode="floor")
        return whisper_log_mel(wave, self.mel_filters), frames

    def encode(self, mel: Tensor) -> Tensor:
        """Log-mel ``B x n_mels x 2P`` -> encoder states ``B x P x D`` (float32)."""
        dtype = next(self.model.parameters()).dtype
        return self.model.get_encoder()(input_features=mel.to(dtype)).last_hidden_state.float()

    def text_tokens(self, text: str) -> tuple[list[int], list[int]]:
        """BPE ids of ``" " + normalize_transcript(text)`` and, per character of the normalised text, the index
        of the token that holds it (a character between tokens goes to the following token)."""
        norm = normalize_transcript(text)
        encoded = self.tokenizer(" " + norm, add_special_tokens=False, return_offsets_mapping=True)
        ids, ends = list(encoded["input_ids"]), [end for _, end in encoded["offset_mapping"]]
        owner, j = [], 0
        for k in range(len(norm)):
            while j < len(ends) - 1 and ends[j] <= k + 1:
                j += 1
            owner.append(j)
        return ids, owner

    def decode_text(self, ids: Sequence[int]) -> str:
        """Normalised text of generated ids (stopping at ``eos``, special tokens dropped)."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return normalize_transcript(self.tokenizer.decode(ids, skip_special_tokens=True))

    def decoder_logits(self, ids: Tensor, states: Tensor, last_only: bool = False) -> Tensor:
        """Decoder on ``B x N`` ids over encoder ``states`` -> logits ``B x N x V`` (``B x 1 x V`` if ``last_only``)."""
        dtype = next(self.model.parameters()).dtype
        hidden = self.model.get_decoder()(
            input_ids=ids, encoder_hidden_states=states.to(dtype), use_cache=False
        ).last_hidden_state
        return self.model.proj_out(hidden[:, -1:] if last_only else hidden).float()

    @torch.no_grad()
    def greedy(self, states: Tensor, max_new_tokens: int, use_cache: bool = True) -> Tensor:
        """Greedy decoding from ``prompt_ids`` with Whisper's suppression (``suppress_ids`` at every step,
        ``suppress_ids_begin`` at the first); ``B x P x D`` states -> ``B x H`` new ids, ``eos``-padded.

        With ``use_cache`` the decoder keeps its keys/values between steps (``transformers``' cache); without, it
        recomputes the whole prefix each step (the reference the tests compare against).
        """
        b = states.shape[0]
        ids = torch.tensor([self.prompt_ids] * b, device=states.device)
        limit = min(max_new_tokens, self.model.config.max_target_positions - len(self.prompt_ids))
        done = torch.zeros(b, dtype=torch.bool, device=states.device)
        decoder, cache, step_ids = self.model.get_decoder(), None, ids
        states = states.to(self.model.dtype)
        for step in range(limit):
            if use_cache:
                out = decoder(input_ids=step_ids, encoder_hidden_states=states, use_cache=True,
                              **({CACHE_KWARG: cache} if cache is not None else {}))
                cache = out[CACHE_KWARG] if CACHE_KWARG in out else out.past_key_values
                logits = self.model.proj_out(out.last_hidden_state[:, -1]).float()
            else:
                logits = self.decoder_logits(ids, states, last_only=True)[:, -1]
            logits[:, self.suppress_ids] = float("-inf")
            if step == 0:
                logits[:, self.suppress_ids_begin] = float("-inf")
            nxt = torch.where(done, torch.full_like(done, self.eos_id, dtype=torch.long), logits.argmax(-1))
            ids, step_ids = torch.cat([ids, nxt[:, None]], dim=1), nxt[:, None]
            done |= nxt == self.eos_id
            if bool(done.all()):
                break
        return ids[:, len(self.prompt_ids):]

    def forced_inputs(self, texts: Sequence[str], append_eos: bool) -> tuple[Tensor, list[list[int]], list[list[int]]]:
        """Decoder inputs ``prompt + tokens (+ eos)`` padded with ``eos`` -> ``B x N`` ids, token lists, owners."""
        tokens, owners = zip(*(self.text_tokens(t) for t in texts), strict=True) if texts else ((), ())
        room = self.model.config.max_target_positions - len(self.prompt_ids) - int(append_eos)
        tokens = tuple(t[:room] for t in tokens)
        rows = [self.prompt_ids + t + ([self.eos_id] if append_eos else []) for t in tokens]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.eos_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids.to(self.device), [list(t) for t in tokens], [list(o) for o in owners]

    def export(self, dst: str | Path) -> None:
        """Write a ``transformers`` folder (full 30 s positions, tokenizer, feature extractor) for the teacher."""
        restore_encoder_positions(self.model, self.full_positions.to(self.device))
        try:
            self.model.save_pretrained(dst)
        finally:
            slice_encoder_positions(self.model, self.positions)
        self.tokenizer.save_pretrained(dst)
        transformers.WhisperFeatureExtractor(feature_size=self.model.config.num_mel_bins).save_pretrained(dst)

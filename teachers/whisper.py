"""Whisper as the speech-recognizer teacher of the lip-reading recipe, on the shared
:class:`~xmodal.modalities.whisper_nets.WhisperFrontend` (preprocessing and the short-input trick are described there).

Teacher outputs (:class:`WhisperTeacher`), generic, so that a loss derives what it alone needs (the LIBS losses derive
their per-character context and the teacher's CER from them):

* ``audio.frames`` float32 ``B x Ta x D``: encoder states, zero beyond each clip's length; ``audio.frames_mask``
  bool ``B x Ta``; ``audio.frame_rate``: their rate in Hz (50), a scalar.
* ``audio.sequence`` float32 ``B x D``: the mean of the valid encoder states.
* ``audio.token_ids`` int64 ``B x N``: the BPE tokens of ``" " + normalize_transcript(transcript)``;
  ``audio.token_ids_mask``.
* ``audio.token_states`` float32 ``B x N x D``: the cross-attention context of decoder layer ``context_layer``
  (default: the last), with the decoder teacher-forced on those tokens, taken at the step that *predicts* each
  token. By default (``context_point="attention"``) it is the attention-weighted sum of the value-projected
  encoder states, i.e. the input of ``encoder_attn.out_proj``; ``"output"`` takes ``out_proj``'s output.
  ``audio.token_states_mask``.
* ``audio.char_token`` int64 ``B x L``: per character of the normalised transcript, the index of the token that
  holds it (spaces belong to the following word's token); ``audio.char_token_mask``.
* ``audio.hypothesis_ids`` int64 ``B x H``: Whisper's greedy token ids (``eos``-padded), ``audio.hypothesis_ids_mask``
  (the tokens before ``eos``); ``audio.hypothesis_chars`` int64 ``B x C``: its normalised text as Unicode code
  points (:func:`~xmodal.modalities.transcript.texts_to_codepoints`), ``audio.hypothesis_chars_mask``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from xmodal.contracts import Batch, Outputs, freeze
from xmodal.modalities.audio import lengths_to_mask
from xmodal.modalities.transcript import pad_ids, texts_to_codepoints
from xmodal.modalities.whisper_nets import HOP_LENGTH, SAMPLE_RATE, WhisperFrontend
from xmodal.teachers.common import state_dict_sha256


@contextmanager
def capture_context(layer: Any, point: str) -> Iterator[list[Tensor]]:
    """Record the cross-attention context of one decoder layer: ``out_proj``'s input or output, ``B x N x D``."""
    store: list[Tensor] = []
    out_proj = layer.encoder_attn.out_proj
    if point == "attention":
        handle = out_proj.register_forward_pre_hook(lambda _m, args: store.append(args[0]))
    else:
        handle = out_proj.register_forward_hook(lambda _m, _a, out: store.append(out))
    try:
        yield store
    finally:
        handle.remove()


class WhisperTeacher(nn.Module):
    """Frozen Whisper with generic encoder, decoder and hypothesis outputs (see the module docstring).

    Args:
        frontend arguments: see :class:`WhisperFrontend` (``model`` or ``config``, ``tokenizer``, ``seconds``...).
        context_layer: decoder layer whose cross-attention gives ``audio.token_states`` (``-1``: the last).
        context_point: ``"attention"`` (weighted sum of value-projected encoder states, before ``out_proj``) or
            ``"output"`` (after ``out_proj``).
        max_new_tokens: greedy decoding limit.
        dtype: weight dtype; outputs are float32.
    """

    output_keys = (
        "audio.frames", "audio.frames_mask", "audio.frame_rate", "audio.sequence", "audio.token_ids",
        "audio.token_ids_mask", "audio.token_states", "audio.token_states_mask", "audio.char_token",
        "audio.char_token_mask", "audio.hypothesis_ids", "audio.hypothesis_ids_mask", "audio.hypothesis_chars",
        "audio.hypothesis_chars_mask",
    )

    def __init__(
        self, model: str | None = None, config: dict[str, Any] | None = None, tokenizer: str | None = None,
        seconds: float = 4.0, prompt_ids: Sequence[int] | None = None, eos_id: int | None = None,
        suppress_ids: Sequence[int] | None = None, suppress_ids_begin: Sequence[int] | None = None,
        context_layer: int = -1, context_point: Literal["attention", "output"] = "attention",
        max_new_tokens: int = 32, input_sample_rate: int = SAMPLE_RATE, dtype: str = "float32", seed: int = 0,
    ) -> None:
        super().__init__()
        if context_point not in ("attention", "output"):
            raise ValueError(f"context_point must be 'attention' or 'output', got {context_point!r}")
        self.frontend = WhisperFrontend(model, config, tokenizer, seconds, prompt_ids, eos_id, suppress_ids,
                                        suppress_ids_begin, input_sample_rate, seed)
        self.frontend.model.to(getattr(torch, dtype))
        freeze(self.frontend)
        self.context_layer, self.context_point = context_layer, context_point
        self.max_new_tokens, self.dtype = max_new_tokens, dtype

    def train(self, mode: bool = True) -> WhisperTeacher:
        """Stays in eval mode whatever ``mode`` is: a teacher is frozen."""
        return super().train(False)

    def token_outputs(self, states: Tensor, texts: Sequence[str]) -> Outputs:
        """Teacher-forced decoder outputs on ``texts``: ``audio.token_ids``, ``audio.token_states`` and
        ``audio.char_token``, with their masks (see the module docstring)."""
        fe = self.frontend
        ids, tokens, owners = fe.forced_inputs(texts, append_eos=False)
        layer = fe.model.get_decoder().layers[self.context_layer]
        with capture_context(layer, self.context_point) as store:
            fe.model.get_decoder()(input_ids=ids, encoder_hidden_states=states.to(fe.model.dtype), use_cache=False)
        token_ids, token_mask = pad_ids(tokens, fe.device)
        start = len(fe.prompt_ids) - 1  # step start + k predicts token k
        token_states = store[0].float()[:, start : start + token_ids.shape[1]] * token_mask[..., None]
        # characters past a transcript cut to the decoder's length keep its last token
        owners = [[min(o, len(t) - 1) for o in owner] for owner, t in zip(owners, tokens, strict=True)]
        char_token, char_mask = pad_ids(owners, fe.device)
        return {"audio.token_ids": token_ids, "audio.token_ids_mask": token_mask, "audio.token_states": token_states,
                "audio.token_states_mask": token_mask, "audio.char_token": char_token,
                "audio.char_token_mask": char_mask}

    def hypothesis_outputs(self, states: Tensor) -> Outputs:
        """Greedy hypotheses as token ids and as the code points of their normalised text, with masks."""
        fe = self.frontend
        hyp = fe.greedy(states, self.max_new_tokens)
        chars, chars_mask = texts_to_codepoints([fe.decode_text(h.tolist()) for h in hyp], fe.device)
        return {"audio.hypothesis_ids": hyp, "audio.hypothesis_ids_mask": (hyp == fe.eos_id).cumsum(1) == 0,
                "audio.hypothesis_chars": chars, "audio.hypothesis_chars_mask": chars_mask}

    @torch.no_grad()
    def forward(self, batch: Batch) -> Outputs:
        fe = self.frontend
        mel, frames = fe.features(batch)
        states = fe.encode(mel)
        mask = lengths_to_mask(frames, states.shape[1])
        states_out = states * mask[..., None]
        return {
            "audio.frames": states_out, "audio.frames_mask": mask,
            "audio.frame_rate": torch.tensor(SAMPLE_RATE / (2 * HOP_LENGTH), device=fe.device),
            "audio.sequence": states_out.sum(1) / frames.clamp(min=1)[:, None].float(),
            **self.token_outputs(states, list(batch["transcript"])), **self.hypothesis_outputs(states),
        }

    def transcribe(self, batch: Batch) -> list[str]:
        """Normalised greedy transcripts of the batch's audio."""
        with torch.no_grad():
            mel, _ = self.frontend.features(batch)
            hyp = self.frontend.greedy(self.frontend.encode(mel), self.max_new_tokens)
        return [self.frontend.decode_text(h.tolist()) for h in hyp]

    def manifest(self) -> dict[str, Any]:
        fe = self.frontend
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "model": fe.model_name, "config": fe.config_dict, "seed": fe.seed if fe.config_dict else None,
            "weights_sha256": state_dict_sha256(fe.model), "tokenizer": fe.tokenizer_path,
            "preprocessing": {"seconds": fe.seconds, "input_sample_rate": fe.input_sample_rate, "log_mel": "whisper"},
            "prompt_ids": fe.prompt_ids, "eos_id": fe.eos_id, "suppress_ids": fe.suppress_ids,
            "suppress_ids_begin": fe.suppress_ids_begin, "context_layer": self.context_layer,
            "context_point": self.context_point, "max_new_tokens": self.max_new_tokens,
            "output_keys": list(self.output_keys), "dtype": self.dtype,
        }

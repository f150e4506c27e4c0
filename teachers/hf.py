"""A frozen Hugging Face ``transformers`` model as a teacher: speech encoders (wav2vec2, HuBERT, WavLM...) on the
``audio`` field, text encoders on the ``caption`` field.

The teacher does its own preprocessing on the device, mirroring the model's Hugging Face preprocessor:

* audio: float waveform (int16 is scaled) at ``input_sample_rate`` -> resampled to the model's rate ->
  zero-mean unit-variance per utterance over the valid samples (``do_normalize``) -> zero padding; the attention
  mask is passed only when the preprocessor says the model was trained with one (``return_attention_mask``;
  wav2vec2-base style models with ``feat_extract_norm="group"`` were not). Log-mel models (Whisper) are not
  supported by this path.
* text: the model's own tokenizer, loaded offline.

Outputs: ``output_key`` (e.g. ``audio.feat``, float32 ``B x T x D``, zero at padding), ``<modality>.mask``
(bool ``B x T``, True at valid steps), and the logits under ``logits_key`` when set (e.g. ``audio.logits`` from an
``AutoModelForCTC``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchaudio
import transformers
from torch import Tensor, nn

from xmodal.contracts import Batch, Outputs, freeze
from xmodal.modalities.audio import INT16_SCALE, lengths_to_mask
from xmodal.modalities.hf_nets import build_model
from xmodal.teachers.common import state_dict_sha256

AUDIO_DEFAULTS = {"sampling_rate": 16000, "do_normalize": True, "padding_value": 0.0}


def audio_preprocessing(
    model: nn.Module, name: str | None, feature_extractor: str | dict[str, Any] | None
) -> dict[str, Any]:
    """The audio preprocessing settings: from a dict, a local preprocessor folder, or the model config."""
    settings = dict(AUDIO_DEFAULTS)
    settings["return_attention_mask"] = getattr(model.config, "feat_extract_norm", "layer") == "layer"
    if feature_extractor is None and name is not None and (Path(name) / "preprocessor_config.json").is_file():
        feature_extractor = name
    if isinstance(feature_extractor, str):
        extractor = transformers.AutoFeatureExtractor.from_pretrained(feature_extractor, local_files_only=True)
        if not hasattr(extractor, "do_normalize"):
            raise ValueError(f"{type(extractor).__name__} is not a waveform feature extractor")
        settings.update({k: getattr(extractor, k) for k in (*AUDIO_DEFAULTS, "return_attention_mask")})
    elif isinstance(feature_extractor, dict):
        settings.update(feature_extractor)
    return settings


def normalize_waveform(wave: Tensor, valid: Tensor, padding_value: float = 0.0) -> Tensor:
    """Zero-mean unit-variance per row over ``valid`` samples (as ``Wav2Vec2FeatureExtractor``), padding set."""
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (wave * valid).sum(-1, keepdim=True) / count
    var = (((wave - mean) * valid) ** 2).sum(-1, keepdim=True) / count
    return torch.where(valid, (wave - mean) / torch.sqrt(var + 1e-7), torch.full_like(wave, padding_value))


class HFTeacher(nn.Module):
    """A frozen ``transformers`` model mapping a batch to ``{output_key, <modality>.mask[, logits_key]}``.

    Args:
        model: local folder (or a name already in the local cache) for ``from_pretrained(local_files_only=True)``.
        config: instead of ``model``, a config dict (``model_type`` + fields) for a randomly initialised model.
        model_class: ``transformers`` class used to load/build (``AutoModel``, ``AutoModelForCTC``...).
        input_field: batch field fed to the model: ``audio`` (waveform + ``audio_lengths``) or ``caption``.
        output_key: key of the features, ``<modality>.<kind>``; the mask goes under ``<modality>.mask``.
        feature_extractor: audio: preprocessing settings as a dict (``sampling_rate``, ``do_normalize``,
            ``return_attention_mask``, ``padding_value``) or a local preprocessor folder (defaults to ``model``'s);
            text: the tokenizer folder (defaults to ``model``).
        input_sample_rate: sample rate of the batch's ``audio`` (the audio modality's ``sample_rate``).
        hidden_layer: take ``hidden_states[hidden_layer]`` instead of the last hidden state.
        logits_key: also return the model's ``logits`` under this key.
        dtype: weight dtype (``float32``, ``float16``, ``bfloat16``); outputs are float32.
        seed: seed of the random init when built from ``config``.
        max_text_length: truncation length of the tokenizer.
    """

    def __init__(
        self, model: str | None = None, config: dict[str, Any] | None = None, model_class: str = "AutoModel",
        input_field: str = "audio", output_key: str = "audio.feat",
        feature_extractor: str | dict[str, Any] | None = None, input_sample_rate: int = 16000,
        hidden_layer: int | None = None, logits_key: str | None = None, dtype: str = "float32", seed: int = 0,
        max_text_length: int = 77,
    ) -> None:
        super().__init__()
        if input_field not in ("audio", "caption"):
            raise ValueError(f"input_field must be 'audio' or 'caption', got {input_field!r}")
        self.model_name, self.config_dict, self.model_class, self.seed = model, config, model_class, seed
        self.model = freeze(build_model(model, config, model_class, seed).to(getattr(torch, dtype)))
        self.input_field, self.input_sample_rate = input_field, input_sample_rate
        self.hidden_layer, self.logits_key, self.dtype = hidden_layer, logits_key, dtype
        self.max_text_length = max_text_length
        self.output_key = output_key
        self.mask_key = f"{output_key.split('.')[0]}.mask"
        self.output_keys: tuple[str, ...] = (output_key, self.mask_key) + ((logits_key,) if logits_key else ())
        if input_field == "audio":
            self.preprocessing = audio_preprocessing(self.model, model, feature_extractor)
            self.tokenizer = None
        else:
            tokenizer_path = feature_extractor if isinstance(feature_extractor, str) else model
            if tokenizer_path is None:
                raise ValueError("a text teacher needs a tokenizer folder: pass feature_extractor or model")
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
            self.preprocessing = {"tokenizer": str(tokenizer_path), "max_length": max_text_length}

    def train(self, mode: bool = True) -> HFTeacher:
        """Stays in eval mode whatever ``mode`` is: a teacher is frozen."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare_audio(self, batch: Batch) -> tuple[dict[str, Tensor], Tensor]:
        """Batch ``audio`` ``B x S`` + ``audio_lengths`` -> model kwargs and ``B`` input lengths (samples)."""
        wave, lengths = batch["audio"].to(self.device), batch["audio_lengths"].to(self.device)
        wave = wave.float() / INT16_SCALE if wave.dtype == torch.int16 else wave.float()
        rate = self.preprocessing["sampling_rate"]
        if rate != self.input_sample_rate:
            wave = torchaudio.functional.resample(wave, self.input_sample_rate, rate)
            lengths = torch.ceil(lengths * (rate / self.input_sample_rate)).long().clamp(max=wave.shape[-1])
        valid = lengths_to_mask(lengths, wave.shape[-1])
        pad = self.preprocessing["padding_value"]
        if self.preprocessing["do_normalize"]:
            wave = normalize_waveform(wave, valid, pad)
        else:
            wave = torch.where(valid, wave, torch.full_like(wave, pad))
        kwargs = {"input_values": wave.to(getattr(torch, self.dtype))}
        if self.preprocessing["return_attention_mask"]:
            kwargs["attention_mask"] = valid.long()
        return kwargs, lengths

    def output_lengths(self, lengths: Tensor, in_steps: int, out_steps: int) -> Tensor:
        """Output steps per row: the model's own formula when it has one, else proportional."""
        formula = getattr(self.model, "_get_feat_extract_output_lengths", None)
        if formula is not None:
            return formula(lengths).long().clamp(max=out_steps)
        if in_steps == out_steps:
            return lengths
        return torch.ceil(lengths * (out_steps / in_steps)).long().clamp(max=out_steps)

    def prepare_text(self, batch: Batch) -> tuple[dict[str, Tensor], Tensor]:
        """Batch ``caption`` (``B`` strings) -> tokenizer outputs and ``B`` token counts."""
        assert self.tokenizer is not None
        tokens = self.tokenizer(
            list(batch["caption"]), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        ).to(self.device)
        return dict(tokens), tokens["attention_mask"].sum(-1)

    def features(self, result: Mapping[str, Any]) -> Tensor:
        """``hidden_states[hidden_layer]``, or the last hidden state: float32 ``B x T x D``."""
        if self.hidden_layer is None and "last_hidden_state" in result:
            return result["last_hidden_state"].float()
        return result["hidden_states"][-1 if self.hidden_layer is None else self.hidden_layer].float()

    @torch.no_grad()
    def forward(self, batch: Batch) -> Outputs:
        kwargs, lengths = self.prepare_audio(batch) if self.input_field == "audio" else self.prepare_text(batch)
        in_steps = kwargs["input_values" if self.input_field == "audio" else "input_ids"].shape[-1]
        # task heads (ForCTC...) only expose hidden_states; base models give last_hidden_state
        hidden = self.hidden_layer is not None or self.model.base_model is not self.model
        result = self.model(**kwargs, output_hidden_states=hidden, return_dict=True)
        feats = self.features(result)
        mask = lengths_to_mask(self.output_lengths(lengths, in_steps, feats.shape[1]), feats.shape[1])
        outputs = {self.output_key: feats * mask[..., None], self.mask_key: mask}
        if self.logits_key is not None:
            outputs[self.logits_key] = result["logits"].float()
        return outputs

    def manifest(self) -> dict[str, Any]:
        """Identity for cache checks: class, weights source and hash, preprocessing, output keys, dtype."""
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "model": self.model_name,
            "config": self.config_dict,
            "seed": self.seed if self.config_dict is not None else None,
            "model_class": self.model_class,
            "weights_sha256": state_dict_sha256(self.model),
            "input_field": self.input_field,
            "input_sample_rate": self.input_sample_rate if self.input_field == "audio" else None,
            "preprocessing": dict(self.preprocessing),
            "hidden_layer": self.hidden_layer,
            "output_keys": list(self.output_keys),
            "dtype": self.dtype,
        }

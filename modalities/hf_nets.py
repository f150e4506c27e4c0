"""Hugging Face ``transformers`` models built offline, for the teachers and students that wrap one."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn


def build_model(model: str | None, config: dict[str, Any] | None, model_class: str, seed: int) -> nn.Module:
    """Load ``model_class`` from a local folder (never downloads), or build it from a config dict.

    ``config`` holds ``model_type`` plus that config class's fields, e.g. ``{"model_type": "wav2vec2",
    "hidden_size": 32}``; the random init is seeded with ``seed`` without touching the global RNG.
    """
    if (model is None) == (config is None):
        raise ValueError("give exactly one of model (a local path or cached name) and config")
    cls = getattr(transformers, model_class, None)
    if cls is None:
        raise ValueError(f"transformers has no {model_class!r}")
    if model is not None:
        return cls.from_pretrained(model, local_files_only=True)
    kwargs = dict(config or {})
    hf_config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Auto classes build through from_config; a concrete class (WhisperForConditionalGeneration) is the builder
        return cls.from_config(hf_config) if hasattr(cls, "from_config") else cls(hf_config)

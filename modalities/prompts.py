"""Prompted CLIP towers (PromptKD): deep visual prompts, and the stage-1 prompt learner over a frozen CLIP.

:class:`PromptedCLIP` (IVLP-style): a frozen open_clip CLIP with learnable deep text and visual prompts, trained
on few-shot base-class labels as the Distiller's *student* in stage 1; once trained it becomes the frozen
:class:`xmodal.teachers.prompted.PromptedCLIPTeacher` of stage 2. It lives here, beside the towers, because both
the stage-1 student and the stage-2 teacher use it.

* Text: ``n_ctx`` learnable context vectors are inserted right after the start token of every class prompt
  (``template`` filled with the class name); before each of the next ``text_depth - 1`` blocks those positions
  are replaced by fresh learnable vectors (IVLP's deep language prompts).
* Image: deep visual prompts (:class:`VisualPrompts`, VPT-deep): ``n_ctx`` learnable tokens are appended to the
  patch sequence before the first block and replaced by a fresh set before each of the next ``depth - 1``
  blocks; they are dropped before pooling, so the class token (or patch mean) reads them only through attention.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Batch, Outputs, freeze
from xmodal.eval.formats import read_classes
from xmodal.modalities.image import ImageNormalize
from xmodal.teachers.common import state_dict_sha256
from xmodal.zoo.hub import HubMixin


class VisualPrompts(nn.Module):
    """Deep visual prompts for an open_clip ``VisionTransformer``.

    Args:
        width: the tower's token width.
        n_ctx: prompt tokens per layer.
        depth: number of blocks that get their own prompts (0 disables prompting; at most the tower's depth).
        init_std: standard deviation of the normal initialisation.
    """

    def __init__(self, width: int, n_ctx: int, depth: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.n_ctx = n_ctx
        self.depth = depth
        self.prompts = nn.Parameter(torch.randn(depth, n_ctx, width) * init_std)

    def forward(self, visual: Any, pixels: Tensor) -> Tensor:
        """Encode normalised ``B x 3 x H x W`` pixels with prompts; returns the pooled, projected ``B x D``."""
        x = visual._embeds(pixels)  # B x (1 + P) x W, after ln_pre
        blocks = visual.transformer.resblocks
        if self.depth > len(blocks):
            raise ValueError(f"prompt depth {self.depth} exceeds the tower's {len(blocks)} blocks")
        batch_first = getattr(visual.transformer, "batch_first", True)
        n = self.n_ctx if self.depth else 0
        for i, block in enumerate(blocks):
            if i < self.depth:
                keep = x if i == 0 else x[:, :-n]
                x = torch.cat([keep, self.prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        if n:
            x = x[:, :-n]
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled


def image_size_of(visual: Any) -> int:
    size = visual.image_size
    return int(size if isinstance(size, int) else size[0])


Subset = Literal["all", "base", "novel"]


def read_class_names(path_or_names: str | Sequence[str]) -> list[str]:
    """Class names from a classes/split JSON (``{"classes": [...]}`` or a list) or a list of names."""
    if not isinstance(path_or_names, str):
        return [str(c) for c in path_or_names]
    return read_classes(path_or_names)[0] or []


def subset_indices(split: str | None, subset: Subset, n_classes: int) -> list[int]:
    """Class indices of ``subset`` in a split file ({"base": [...], "novel": [...]}); ``all`` is every class."""
    if subset == "all":
        return list(range(n_classes))
    if split is None:
        raise ValueError(f"subset {subset!r} needs a split file")
    return [int(i) for i in json.loads(Path(split).read_text())[subset]]


def pool_positions(tokens: Tensor, pool_type: str, eos_id: int | None) -> Tensor:
    """Index of the pooled token in each ``N x L`` token row, as open_clip's ``text_global_pool`` picks it."""
    n, length = tokens.shape
    if pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if pool_type == "eos":
        if eos_id is None:
            raise ValueError("text pool type 'eos' needs the model's eos token id")
        return tokens.eq(eos_id).int().argmax(dim=-1)
    if pool_type == "first":
        return torch.zeros(n, dtype=torch.long, device=tokens.device)
    if pool_type == "last":
        return torch.full((n,), length - 1, dtype=torch.long, device=tokens.device)
    raise ValueError(f"text pool type {pool_type!r} is not supported with text prompts")


class PromptedCLIP(nn.Module, HubMixin):
    """A frozen open_clip ``CLIP`` with learnable deep text and visual prompts (IVLP).

    Outputs ``image.emb`` (``B x D``), ``image.logits`` (``B x C_train``, against the prompted text features
    of the training classes, recomputed each call: this is stage 1) and ``logit_scale``.

    Args:
        clip_dir: an open_clip ``local-dir`` folder (e.g. written by ``save_open_clip_dir``).
        classes: a classes or split JSON, or the class names in label order.
        split: a split JSON with ``base``/``novel`` class indices; needed when ``train_subset`` is not ``all``.
        train_subset: the classes ``image.logits`` covers in training (``base`` in the base-to-novel protocol).
        template: the class prompt; the context vectors go in front of it.
        n_ctx: text context vectors (ignored when ``ctx_init`` is given: its token count is used).
        ctx_init: words whose token embeddings initialise the context (``"a photo of a"``); random otherwise.
        text_depth: text blocks with their own prompts (1 = shallow CoOp-style context).
        vision_n_ctx: visual prompt tokens per block.
        vision_depth: image blocks with their own prompts (0 = none).
        init_std: standard deviation of random prompt initialisation.
    """

    output_keys = ("image.emb", "image.logits", "logit_scale")
    model: Any  # an open_clip CLIP, whose internals (token_embedding, transformer, ...) are used

    def __init__(
        self, clip_dir: str, classes: str | list[str], split: str | None = None, train_subset: Subset = "all",
        template: str = "{}.", n_ctx: int = 4, ctx_init: str | None = None, text_depth: int = 1,
        vision_n_ctx: int = 4, vision_depth: int = 1, init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.init_args = {"clip_dir": clip_dir, "classes": classes, "split": split, "train_subset": train_subset,
                          "template": template, "n_ctx": n_ctx, "ctx_init": ctx_init, "text_depth": text_depth,
                          "vision_n_ctx": vision_n_ctx, "vision_depth": vision_depth, "init_std": init_std}
        self.model = freeze(open_clip.create_model(f"local-dir:{clip_dir}", weights_only=True))
        if not isinstance(self.model, open_clip.CLIP):
            raise TypeError(f"PromptedCLIP needs an open_clip CLIP, got {type(self.model).__name__}")
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
        cfg = self.model.visual.preprocess_cfg
        self.normalize = ImageNormalize(image_size_of(self.model.visual), cfg["mean"], cfg["std"])
        self.all_classes = read_class_names(classes)
        self.train_classes = subset_indices(split, train_subset, len(self.all_classes))
        self.template = template
        width = self.model.transformer.width
        ctx = self._init_context(ctx_init, n_ctx, width, init_std)
        self.text_ctx = nn.Parameter(ctx)
        self.text_deep = nn.Parameter(torch.randn(max(text_depth - 1, 0), ctx.shape[0], width) * init_std)
        self.visual_prompts = VisualPrompts(self.model.visual.transformer.width, vision_n_ctx, vision_depth, init_std)

    def _init_context(self, ctx_init: str | None, n_ctx: int, width: int, init_std: float) -> Tensor:
        if not ctx_init:
            return torch.randn(n_ctx, width) * init_std
        tokens = self.tokenizer([ctx_init])
        end = int(pool_positions(tokens, self.model.text_pool_type, self.model.text_eos_id)[0])
        with torch.no_grad():
            return self.model.token_embedding(tokens[0, 1:end]).clone()

    def train(self, mode: bool = True) -> PromptedCLIP:
        super().train(mode)
        self.model.eval()
        return self

    @property
    def n_ctx(self) -> int:
        return int(self.text_ctx.shape[0])

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        """Normalised ``B x 3 x H x W`` (open_clip's ``preprocess``) -> ``B x D`` with the visual prompts."""
        features = self.visual_prompts(self.model.visual, image)
        return F.normalize(features, dim=-1) if normalize else features

    def embed_images(self, images: Tensor) -> Tensor:
        """Raw uint8 or float ``B x 3 x H x W`` -> L2-normalised ``B x D`` with the visual prompts."""
        return self.encode_image(self.normalize(images), normalize=True)

    def embed_texts(self, texts: list[str]) -> Tensor:
        """``N`` prompts -> L2-normalised ``N x D``, with the learnt context inserted after the start token."""
        return self.encode_text(self.tokenizer(texts).to(self.text_ctx.device), normalize=True)

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """``N x L`` token ids -> ``N x D`` text features with deep text prompts."""
        tokens, m, n = text, self.model, self.n_ctx
        length = tokens.shape[1]
        pooled_at = pool_positions(tokens, m.text_pool_type, m.text_eos_id)
        if m.text_pool_type in ("argmax", "eos"):
            if int(pooled_at.max()) + n >= length:
                raise ValueError(f"a prompt of {int(pooled_at.max()) + 1} tokens + {n} context tokens exceeds the "
                                 f"context length {length}: shorten the template or n_ctx")
            pooled_at = pooled_at + n
        x = m.token_embedding(tokens)
        ctx = self.text_ctx.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], ctx, x[:, 1:]], dim=1)[:, :length] + m.positional_embedding.to(x.dtype)
        for i, block in enumerate(m.transformer.resblocks):
            if 1 <= i <= self.text_deep.shape[0]:
                deep = self.text_deep[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], deep, x[:, 1 + n:]], dim=1)
            x = block(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), pooled_at]
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def class_embeddings(self, classes: Sequence[str] | None = None) -> Tensor:
        """L2-normalised ``C x D`` prompted text features of ``classes`` (default: every class)."""
        names = self.all_classes if classes is None else list(classes)
        return self.embed_texts([self.template.format(c) for c in names])

    def forward(self, batch: Batch) -> Outputs:
        emb = self.embed_images(batch["image"])
        scale = self.model.logit_scale.exp()
        classifier = self.class_embeddings([self.all_classes[i] for i in self.train_classes])
        return {"image.emb": emb, "image.logits": scale * emb @ classifier.T, "logit_scale": scale}

    def prompts_sha256(self) -> str:
        """Hash of the learnt prompts (text context, deep text and visual prompts) and the template."""
        digest = hashlib.sha256(self.template.encode())
        for tensor in (self.text_ctx, self.text_deep, self.visual_prompts.prompts):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def identity(self) -> dict[str, Any]:
        """What the stored class vectors' manifest records about this teacher."""
        return {"class": type(self).__name__, "clip_sha256": state_dict_sha256(self.model),
                "prompts_sha256": self.prompts_sha256(), "template": self.template}


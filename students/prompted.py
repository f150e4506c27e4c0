"""PromptKD's stage-2 prompted image student, and the label guard of stage 2.

:class:`PromptedImageStudent` (stage 2): a frozen CLIP image tower with deep visual prompts
(:class:`~xmodal.modalities.prompts.VisualPrompts`) and a projector to the teacher's embedding size, classifying
against stored class vectors (:mod:`xmodal.classvectors`); no text tower is kept, and the teacher is not needed at
inference. Only the prompts and the projector are trainable. Stage 1's prompt learner,
:class:`~xmodal.modalities.prompts.PromptedCLIP`, lives beside the towers, as the stage-2 teacher uses it too.

This module also holds the label guard of stage 2: :class:`LabelGuard` (a batch that raises on any read of
``label``) and :class:`DropLabels` (a callback that removes labels from training batches), so "no label is read
in stage 2" is a property a test can check and a config can enforce.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.classvectors import load_class_vectors
from xmodal.contracts import Batch, Outputs, freeze
from xmodal.modalities.image import ImageNormalize
from xmodal.modalities.prompts import VisualPrompts, image_size_of
from xmodal.zoo.hub import HubMixin

Projector = Literal["linear", "mlp", "identity"]


class LabelReadError(KeyError):
    """Something read ``label`` from a batch that must stay unlabeled."""


class LabelGuard(dict):
    """A batch whose labels are hidden: reading ``label`` in any way raises :class:`LabelReadError`.

    Wrap a labelled batch in it (``LabelGuard(batch)``) to check that code under test never reads labels;
    the label is removed from the visible items, so iterating over the batch does not leak it either.
    """

    def __init__(self, batch: Mapping[str, Any], key: str = "label") -> None:
        super().__init__({k: v for k, v in batch.items() if k != key})
        self.guarded = key

    def _check(self, key: object) -> None:
        if key == self.guarded:
            raise LabelReadError(f"batch[{self.guarded!r}] was read in a stage that must not use labels")

    def __getitem__(self, key: str) -> Any:
        self._check(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._check(key)
        return super().__contains__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._check(key)
        return super().get(key, default)

    def pop(self, key: str, *default: Any) -> Any:
        self._check(key)
        return super().pop(key, *default)


class DropLabels(L.Callback):
    """Remove ``label`` from every training batch before the step sees it (stage 2 trains on unlabeled images).

    Args:
        key: the batch field to drop.
    """

    def __init__(self, key: str = "label") -> None:
        self.key = key

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(batch, dict):
            batch.pop(self.key, None)


def make_projector(kind: Projector, in_dim: int, out_dim: int) -> nn.Module:
    """``linear``: one layer; ``mlp``: linear-GELU-linear; ``identity``: needs ``in_dim == out_dim``."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"projector 'identity' needs equal sizes, got {in_dim} -> {out_dim}")
        return nn.Identity()
    raise ValueError(f"unknown projector {kind!r}; use 'linear', 'mlp' or 'identity'")


class PromptedImageStudent(nn.Module, HubMixin):
    """A frozen CLIP image tower + deep visual prompts + projector, classifying against stored class vectors.

    Outputs ``image.emb`` (``B x D_teacher``, L2-normalised), ``image.logits`` (``B x C``:
    ``logit_scale * image.emb @ class_vectors.T``) and ``logit_scale``.

    Args:
        clip_dir: an open_clip ``local-dir`` folder holding the student CLIP (only its image tower is kept).
        class_vectors: the teacher's stored class vectors file; kept as a non-trainable buffer.
        n_ctx: visual prompt tokens per layer.
        depth: prompted blocks.
        projector: ``linear``, ``mlp`` or ``identity``, from the student's to the teacher's embedding size.
        logit_classes: class indices whose columns ``image.logits`` keeps (e.g. the base classes when training
            on labels only); ``None`` keeps every class. Evaluation always uses every class vector.
        logit_scale: multiplier of the cosine logits; ``None`` takes the teacher's from the class vectors file.
    """

    output_keys = ("image.emb", "image.logits", "logit_scale")
    class_vectors: Tensor
    logit_scale: Tensor
    visual: Any  # open_clip's VisionTransformer, whose internals (_embeds, _pool, transformer) are used

    def __init__(
        self, clip_dir: str, class_vectors: str, n_ctx: int = 4, depth: int = 1, projector: Projector = "linear",
        logit_classes: list[int] | None = None, logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.init_args = {"clip_dir": clip_dir, "class_vectors": class_vectors, "n_ctx": n_ctx, "depth": depth,
                          "projector": projector, "logit_classes": logit_classes, "logit_scale": logit_scale}
        clip = open_clip.create_model(f"local-dir:{clip_dir}", weights_only=True)
        self.visual = freeze(clip.visual)
        cfg = self.visual.preprocess_cfg
        self.normalize = ImageNormalize(image_size_of(self.visual), cfg["mean"], cfg["std"])
        stored = load_class_vectors(class_vectors)
        self.classes = stored.classes
        self.register_buffer("class_vectors", stored.vectors.clone())
        self.register_buffer("logit_scale", torch.tensor(stored.logit_scale if logit_scale is None else logit_scale))
        self.logit_classes = logit_classes
        width = self.visual.transformer.width
        self.prompts = VisualPrompts(width, n_ctx, depth)
        out_dim = self.visual.output_dim
        self.projector = make_projector(projector, out_dim, stored.vectors.shape[1])

    def train(self, mode: bool = True) -> PromptedImageStudent:
        super().train(mode)
        self.visual.eval()  # the frozen tower stays in eval mode (no dropout, fixed norms)
        return self

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        """Normalised ``B x 3 x H x W`` (open_clip's ``preprocess`` of the student CLIP) -> ``B x D_teacher``."""
        features = self.projector(self.prompts(self.visual, image))
        return F.normalize(features, dim=-1) if normalize else features

    def embed_images(self, images: Tensor) -> Tensor:
        """Raw uint8 or float ``B x 3 x H x W`` -> L2-normalised ``B x D_teacher``."""
        return self.encode_image(self.normalize(images), normalize=True)

    def classify(self, images: Tensor) -> Tensor:
        """``B x C`` logits against every stored class vector: inference with the student alone."""
        return self.logit_scale * self.embed_images(images) @ self.class_vectors.T

    def forward(self, batch: Batch) -> Outputs:
        emb = self.embed_images(batch["image"])
        vectors = self.class_vectors if self.logit_classes is None else self.class_vectors[self.logit_classes]
        return {"image.emb": emb, "image.logits": self.logit_scale * emb @ vectors.T, "logit_scale": self.logit_scale}

    def trainable_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]



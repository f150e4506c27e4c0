"""A trained LiT model (:class:`~xmodal.students.lit.LiTCLIP`, locked-image tuning, arXiv:2111.07991) served frozen
as a CLIP teacher: ``image.emb``, ``text.emb``, ``logit_scale`` for the CLIP recipes and, with class vectors stored
once by :func:`store_lit_class_vectors` (PromptKD's stage 2), ``image.logits``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from xmodal.classvectors import load_class_vectors, save_class_vectors
from xmodal.contracts import Batch, Outputs, freeze
from xmodal.eval.zeroshot import SIMPLE_TEMPLATES, class_embeddings
from xmodal.students.lit import LiTCLIP
from xmodal.teachers.common import state_dict_sha256


def lit_identity(model: LiTCLIP) -> dict[str, Any]:
    """What names a trained LiT model: its class and the sha256 of its whole state dict."""
    return {"teacher": type(model).__name__, "weights_sha256": state_dict_sha256(model)}


@torch.no_grad()
def store_lit_class_vectors(
    model: LiTCLIP, path: str, classes: Sequence[str], templates: Sequence[str] = SIMPLE_TEMPLATES,
) -> str:
    """Store ``model``'s prompt-ensembled text embeddings of ``classes`` once (PromptKD's class vectors)."""
    vectors = class_embeddings(model, list(classes), list(templates))
    save_class_vectors(path, vectors, classes, {**lit_identity(model), "templates": list(templates)},
                       float(model.log_logit_scale.exp()))
    return path


class LiTTeacher(nn.Module):
    """A trained :class:`LiTCLIP` (an ``ExportStudent`` folder or zoo name), frozen, as a CLIP teacher.

    Outputs ``image.emb``, ``text.emb`` (L2-normalised, ``B x D``), ``logit_scale`` and, with ``class_vectors``,
    ``image.logits`` ``B x C`` (``logit_scale * image.emb @ vectors.T``; the file must come from this model).

    Args:
        checkpoint: the folder or zoo name of the trained model.
        class_vectors: a file :func:`store_lit_class_vectors` wrote from that model.
    """

    class_vectors: Tensor

    def __init__(self, checkpoint: str, class_vectors: str | None = None) -> None:
        super().__init__()
        from xmodal.zoo import create_model

        model = create_model(checkpoint)
        if not isinstance(model, LiTCLIP):
            raise TypeError(f"{checkpoint}: {type(model).__name__} is not a LiTCLIP")
        self.lit, self.checkpoint = model, checkpoint
        self.classes: list[str] | None = None
        self.output_keys: tuple[str, ...] = LiTCLIP.output_keys
        if class_vectors is not None:
            stored = load_class_vectors(class_vectors, teacher=lit_identity(model))
            self.classes = stored.classes
            self.register_buffer("class_vectors", stored.vectors.clone(), persistent=False)
            self.output_keys += ("image.logits",)
        freeze(self)

    def train(self, mode: bool = True) -> LiTTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: Batch) -> Outputs:
        out = self.lit(batch)
        if self.classes is not None and "image.emb" in out:
            out["image.logits"] = out["logit_scale"] * out["image.emb"] @ self.class_vectors.T
        return out

    def embed_images(self, images: Tensor) -> Tensor:
        return self.lit.embed_images(images)

    def embed_texts(self, captions: list[str]) -> Tensor:
        return self.lit.embed_texts(captions)

    def manifest(self) -> dict[str, Any]:
        return {**lit_identity(self.lit), "checkpoint": str(self.checkpoint),
                "preprocess": self.lit.image_tower.preprocess.manifest(), "classes": self.classes,
                "output_keys": list(self.output_keys)}

"""PromptKD's teacher in stage 2: the stage-1 prompt-tuned CLIP, frozen, scoring images against stored class vectors.

Stage 1 trains :class:`xmodal.modalities.prompts.PromptedCLIP` (an IVLP-style deep prompt learner over a frozen
open_clip CLIP) as the Distiller's *student*, with cross-entropy on few-shot labels of the base classes.
:func:`store_class_vectors` then computes its prompted text features for *every* class name once and writes them
with a manifest (:mod:`xmodal.classvectors`; ``xmodal class-vectors`` on the command line).
:class:`PromptedCLIPTeacher` reads those stored vectors (after checking that they come from these very CLIP
weights and prompts) and never runs the text tower.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xmodal.classvectors import load_class_vectors, save_class_vectors
from xmodal.contracts import Batch, Outputs, Teacher, freeze
from xmodal.modalities.prompts import PromptedCLIP

__all__ = ["PromptedCLIPTeacher", "store_class_vectors"]


@torch.no_grad()
def store_class_vectors(model: PromptedCLIP, path: str | Path, classes: Sequence[str] | None = None) -> Path:
    """Compute ``model``'s prompted text features for every class once and save them with a manifest."""
    was_training = model.training
    model.eval()
    try:
        names = model.all_classes if classes is None else list(classes)
        vectors = model.class_embeddings(names)
        return save_class_vectors(path, vectors, names, model.identity(), float(model.model.logit_scale.exp()))
    finally:
        model.train(was_training)


class PromptedCLIPTeacher(nn.Module, Teacher):
    """The stage-1 prompted teacher, frozen, scoring images against its *stored* class vectors.

    Outputs ``image.emb`` (``B x D``), ``image.logits`` (``B x C``: ``logit_scale * image.emb @ vectors.T``) and
    ``logit_scale``. The text tower never runs: the class vectors come from the file, whose manifest must name
    this teacher's CLIP weights and prompts.

    Args:
        checkpoint: the stage-1 checkpoint folder (``ExportStudent`` of a :class:`PromptedCLIP`) or zoo name.
        class_vectors: the file :func:`store_class_vectors` wrote from that checkpoint.
    """

    output_keys = ("image.emb", "image.logits", "logit_scale")
    class_vectors: Tensor

    def __init__(self, checkpoint: str, class_vectors: str) -> None:
        super().__init__()
        from xmodal.zoo import create_model

        model = create_model(checkpoint)
        if not isinstance(model, PromptedCLIP):
            raise TypeError(f"{checkpoint}: {type(model).__name__} is not a PromptedCLIP")
        self.prompted = model
        stored = load_class_vectors(class_vectors, teacher=model.identity())
        self.classes = stored.classes
        self.class_vectors_path = class_vectors
        self.register_buffer("class_vectors", stored.vectors.clone(), persistent=False)
        self.logit_scale = stored.logit_scale
        freeze(self)

    def train(self, mode: bool = True) -> PromptedCLIPTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: Batch) -> Outputs:
        emb = self.prompted.embed_images(batch["image"])
        scale = torch.tensor(self.logit_scale, device=emb.device)
        return {"image.emb": emb, "image.logits": scale * emb @ self.class_vectors.T, "logit_scale": scale}

    def manifest(self) -> dict[str, Any]:
        return {"teacher": type(self).__name__, **self.prompted.identity(),
                "class_vectors_sha256": hashlib.sha256(Path(self.class_vectors_path).read_bytes()).hexdigest(),
                "classes": list(self.classes), "output_keys": list(self.output_keys)}

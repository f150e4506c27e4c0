"""Any open_clip model as a frozen teacher: by name + pretrained tag, a local checkpoint, or ``local-dir:``.

Nothing downloads here unless the user asks for a pretrained tag they have not cached; tests use
``local-dir:`` folders written by :func:`xmodal.students.clip.save_open_clip_dir` or ``pretrained=None``.
"""

from __future__ import annotations

from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from xmodal.contracts import Batch, Outputs, Teacher, freeze
from xmodal.modalities.image import ImageNormalize
from xmodal.modalities.text import tokens_for
from xmodal.teachers.common import state_dict_sha256


class OpenCLIPTeacher(nn.Module, Teacher):
    """Frozen open_clip model; outputs ``image.emb``, ``text.emb`` (L2-normalised) and ``logit_scale``.

    Args:
        model_name: an open_clip model name (``"ViT-B-32"``) or ``"local-dir:<folder>"``.
        pretrained: a pretrained tag the user has cached, or a local checkpoint path (``.safetensors`` or a
            ``torch.load(weights_only=True)``-able file). Ignored for ``local-dir:``.
    """

    output_keys = ("image.emb", "text.emb", "logit_scale")

    def __init__(self, model_name: str, pretrained: str | None = None) -> None:
        super().__init__()
        self.model_name = model_name
        self.pretrained = pretrained
        self.model = open_clip.create_model(model_name, pretrained=pretrained, weights_only=True)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = self.model.visual.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        self.normalize = ImageNormalize(size, cfg["mean"], cfg["std"])
        freeze(self)

    def train(self, mode: bool = True) -> OpenCLIPTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: Batch) -> Outputs:
        device = self.model.logit_scale.device
        out: Outputs = {"logit_scale": self.model.logit_scale.exp()}
        if "image" in batch:
            out["image.emb"] = F.normalize(self.model.encode_image(self.normalize(batch["image"])), dim=-1)
        if "caption" in batch:
            tokens = tokens_for(batch, self.model_name, self.tokenizer, device)
            out["text.emb"] = F.normalize(self.model.encode_text(tokens), dim=-1)
        return out

    def manifest(self) -> dict[str, Any]:
        return {
            "teacher": type(self).__name__,
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "weights_sha256": state_dict_sha256(self.model),
            "preprocess": {"size": self.normalize.size, "mean": self.normalize.mean.flatten().tolist(),
                           "std": self.normalize.std.flatten().tolist()},
            "output_keys": list(self.output_keys),
        }


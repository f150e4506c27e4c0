"""A CLIP-style dual encoder built from an open_clip model config, with its own tokenizer and normalisation.

It is used both as a student and, once trained, as a teacher: :func:`save_open_clip_dir` writes the
``open_clip_config.json`` + ``open_clip_model.safetensors`` folder that
``open_clip.create_model("local-dir:<folder>")`` loads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from xmodal.contracts import Batch, Outputs, check_config_keys
from xmodal.modalities.image import OPENAI_MEAN, OPENAI_STD, ImageNormalize
from xmodal.modalities.text import load_tokenizer, tokens_for, vocab_size
from xmodal.zoo.hub import HubMixin

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


class CLIPStudent(nn.Module, HubMixin):
    """open_clip ``CLIP`` from config dicts; outputs ``image.emb``, ``text.emb`` (L2-normalised) and ``logit_scale``.

    Its methods follow open_clip's: ``encode_image(preprocess(pil).unsqueeze(0))`` and
    ``encode_text(tokenizer(captions))``, with this model's own ``preprocess`` and ``tokenizer`` attributes.
    :meth:`embed_images` and :meth:`embed_texts` take raw ``[0, 1]`` images and strings.

    Args:
        embed_dim: joint embedding size.
        vision_cfg: open_clip ``CLIPVisionCfg`` fields (``image_size``, ``patch_size``, ``width``, ``layers``...).
        text_cfg: open_clip ``CLIPTextCfg`` fields. ``vocab_size`` is filled in from the tokenizer when absent.
        tokenizer: a tokenizer folder or an open_clip model name (see :mod:`xmodal.modalities.text`).
        mean: per-channel normalisation mean. std: per-channel normalisation std.
        init_logit_scale: initial value of ``log(1 / temperature)``.
    """

    output_keys = ("image.emb", "text.emb", "logit_scale")

    def __init__(
        self,
        embed_dim: int,
        vision_cfg: dict[str, Any],
        text_cfg: dict[str, Any],
        tokenizer: str = "ViT-B-32",
        mean: tuple[float, float, float] = OPENAI_MEAN,
        std: tuple[float, float, float] = OPENAI_STD,
        init_logit_scale: float = 2.659260036932778,
    ) -> None:
        super().__init__()
        self.init_args = {"embed_dim": embed_dim, "vision_cfg": dict(vision_cfg), "text_cfg": dict(text_cfg),
                          "tokenizer": tokenizer, "mean": list(mean), "std": list(std),
                          "init_logit_scale": init_logit_scale}
        check_config_keys("vision_cfg", vision_cfg, [f.name for f in dataclasses.fields(open_clip.model.CLIPVisionCfg)])
        check_config_keys("text_cfg", text_cfg, [f.name for f in dataclasses.fields(open_clip.model.CLIPTextCfg)])
        text_cfg = dict(text_cfg)
        text_cfg.setdefault("vocab_size", vocab_size(tokenizer))
        if text_cfg.get("pool_type") == "eos" and not Path(tokenizer).is_dir():
            raise ValueError(
                f"text_cfg pool_type 'eos' needs a tokenizer folder with an end token; {tokenizer!r} is an open_clip "
                "tokenizer, which ends sequences with its highest id: use pool_type 'argmax'"
            )
        self.model_cfg: dict[str, Any] = {"embed_dim": embed_dim, "vision_cfg": dict(vision_cfg), "text_cfg": text_cfg}
        self.tokenizer_name = tokenizer
        self.model = open_clip.CLIP(
            embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, init_logit_scale=init_logit_scale
        )
        self.tokenizer = load_tokenizer(tokenizer, text_cfg.get("context_length", 77))
        self.normalize = ImageNormalize(vision_cfg["image_size"], mean, std)

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        """open_clip's ``encode_image``: ``preprocess``-ed ``B x 3 x H x W`` (normalised) -> ``B x embed_dim``."""
        return self.model.encode_image(image, normalize=normalize)

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """open_clip's ``encode_text``: token ids from ``tokenizer`` (``B x L``) -> ``B x embed_dim``."""
        return self.model.encode_text(text.to(self.model.logit_scale.device, non_blocking=True), normalize=normalize)

    def embed_images(self, images: Tensor) -> Tensor:
        """Raw float ``B x 3 x H x W`` in [0, 1] (or uint8), resized and normalised here -> L2-normalised embeddings."""
        return self.encode_image(self.normalize(images), normalize=True)

    def embed_texts(self, captions: list[str]) -> Tensor:
        """``B`` strings, tokenized here -> L2-normalised ``B x embed_dim``."""
        return self.encode_text(self.tokenizer(captions), normalize=True)

    @property
    def preprocess(self) -> Callable[[Any], Tensor]:
        """open_clip's evaluation transform for this model: a PIL image -> the normalised tensor ``encode_image``
        takes (a resize of the shorter side and a centre crop, where :meth:`embed_images` resizes the whole image)."""
        return open_clip.image_transform(self.normalize.size, is_train=False,
                                         mean=tuple(self.normalize.mean.flatten().tolist()),
                                         std=tuple(self.normalize.std.flatten().tolist()))

    def forward(self, batch: Batch) -> Outputs:
        out: Outputs = {"logit_scale": self.model.logit_scale.exp()}
        if "image" in batch:
            out["image.emb"] = self.embed_images(batch["image"])
        if "caption" in batch:
            tokens = tokens_for(batch, self.tokenizer_name, self.tokenizer, self.model.logit_scale.device)
            out["text.emb"] = self.encode_text(tokens, normalize=True)
        return out

    def _save_folder(self, folder: Path, model_card_kwargs: dict[str, Any] | None) -> None:
        """``save_pretrained``/``push_to_hub``: the zoo folder, which open_clip loads too (``local-dir:<folder>``)."""
        super()._save_folder(folder, model_card_kwargs)
        save_open_clip_dir(self, folder)

    def open_clip_config(self) -> dict[str, Any]:
        """The ``open_clip_config.json`` content: model config plus preprocessing."""
        model_cfg = copy.deepcopy(self.model_cfg)
        if Path(self.tokenizer_name).is_dir():
            model_cfg["text_cfg"]["hf_tokenizer_name"] = "."
            model_cfg["text_cfg"]["tokenizer_kwargs"] = {"clean": "canonicalize"}  # as load_tokenizer does
        preprocess = {
            "mean": self.normalize.mean.flatten().tolist(),
            "std": self.normalize.std.flatten().tolist(),
            "image_size": self.normalize.size,
        }
        return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def save_open_clip_dir(student: CLIPStudent, out_dir: str | Path) -> Path:
    """Write ``student`` as a folder that ``open_clip.create_model("local-dir:...")`` loads, tokenizer included."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(student.open_clip_config(), indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in student.model.state_dict().items()}
    save_file(state, str(out / OPEN_CLIP_WEIGHTS))
    tokenizer_dir = Path(student.tokenizer_name)
    if tokenizer_dir.is_dir():
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                (out / f.name).write_bytes(f.read_bytes())
    return out


def to_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype

"""Students that start from an earlier stage's export (multi-stage recipes such as DC-CLIP).

``StagedCLIPStudent(pretrained="runs/demo/dcclip_stage1")`` rebuilds the :class:`CLIPStudent` that a previous
``fit`` exported with :class:`xmodal.callbacks.ExportStudent` (a zoo checkpoint folder or a registered zoo name;
the weights' sha256 is checked) and continues from its weights. Its ``init_args`` are the plain architecture
(``pretrained`` is not recorded), so this stage's own export rebuilds without the earlier folder.
"""

from __future__ import annotations

from typing import Any

from xmodal.students.clip import CLIPStudent


def load_clip_student(pretrained: str) -> CLIPStudent:
    """The :class:`CLIPStudent` saved in zoo folder / name ``pretrained``, weights loaded and checked."""
    from xmodal.zoo import create_model

    model = create_model(pretrained)
    if not isinstance(model, CLIPStudent):
        raise TypeError(f"{pretrained!r} holds a {type(model).__name__}, not a CLIPStudent")
    return model


class StagedCLIPStudent(CLIPStudent):
    """A :class:`CLIPStudent` initialised from an earlier stage's export, or built from its arguments.

    Args:
        pretrained: zoo checkpoint folder or registered name of a previous stage's ``CLIPStudent``. When set, the
            architecture comes from its card and the weights from its safetensors; architecture arguments given
            here must be left unset.
        **clip_args: :class:`CLIPStudent` arguments (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``tokenizer``...),
            used when ``pretrained`` is ``None`` (that is how this stage's own export is rebuilt).
    """

    def __init__(
        self, pretrained: str | None = None, embed_dim: int | None = None, vision_cfg: dict[str, Any] | None = None,
        text_cfg: dict[str, Any] | None = None, tokenizer: str | None = None,
        mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
        init_logit_scale: float | None = None,
    ) -> None:
        given = {k: v for k, v in {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg,
                                   "tokenizer": tokenizer, "mean": mean, "std": std,
                                   "init_logit_scale": init_logit_scale}.items() if v is not None}
        if pretrained is None:
            missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(given)
            if missing:
                raise ValueError(f"StagedCLIPStudent without pretrained needs {sorted(missing)}")
            super().__init__(**given)
            return
        if given:
            raise ValueError(
                f"StagedCLIPStudent: pretrained={pretrained!r} fixes the architecture; drop {sorted(given)}"
            )
        source = load_clip_student(pretrained)
        super().__init__(**source.init_args)
        self.load_state_dict(source.state_dict())

"""Models for evaluation from a training recipe: the whole Distiller of a config, or its detector.

Zoo names and checkpoint folders go through :func:`xmodal.zoo.create_model`; a recipe (``config``) is rebuilt
from its ``model:`` section, its short class names resolved through :func:`xmodal.plugins.load_plugins`, with the
weights of a Lightning checkpoint. A recipe saved before one of its classes moved still loads
(:mod:`xmodal.zoo.moved`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from xmodal.eval.bev import Detector


def load_distiller(config: str | Path, checkpoint: str | Path | None = None) -> nn.Module:
    """The :class:`~xmodal.distiller.Distiller` of a recipe's ``model:`` section, with a checkpoint's weights."""
    import yaml
    from jsonargparse import ArgumentParser

    from xmodal.distiller import Distiller
    from xmodal.plugins import load_plugins
    from xmodal.zoo.moved import current_class_paths

    load_plugins()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Distiller, "model", fail_untyped=False)
    model = current_class_paths(yaml.safe_load(Path(config).read_text())["model"], config)
    parsed = parser.parse_object({"model": model})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    distiller = instantiate(parsed).model
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        distiller.load_state_dict(state.get("state_dict", state))
    return cast(nn.Module, distiller)


def load_detector(
    model: str | None = None, config: str | Path | None = None, checkpoint: str | Path | None = None,
    part: str = "student",
) -> Detector:
    """A detector with ``predict``: an exported folder or zoo name (``model``), else a recipe's student/teacher.

    A recipe (``config``) rebuilds the whole Distiller through :func:`load_distiller`, with the weights of a
    Lightning ``checkpoint``.
    """
    if model is not None:
        from xmodal.zoo.registry import create_model

        detector: Any = create_model(model)
    elif config is not None:
        detector = getattr(load_distiller(config, checkpoint), part, None)
    else:
        raise ValueError("load_detector needs a model folder or a recipe")
    if not callable(getattr(detector, "predict", None)):
        raise ValueError(f"{model or config}: {type(detector).__name__} has no predict(batch)")
    return cast(Detector, detector)

"""A trained :class:`~xmodal.modalities.bev_detector.BEVDetector` (LiDAR, camera or fusion), frozen, as a
UniDistill teacher.

The weights are read once, in the constructor, from a local path; the teacher then returns the detector's own
outputs (``bev.feat``, ``bev.heatmap``, ``bev.reg``) for every batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xmodal.contracts import Batch, Outputs, freeze
from xmodal.modalities.bev_detector import BEVDetector, FeatLayer
from xmodal.teachers.common import state_dict_sha256


def load_detector(path: str | Path, detector: Mapping[str, Any] | None = None,
                  **overrides: Any) -> BEVDetector:
    """A :class:`BEVDetector` from a local checkpoint.

    Args:
        path: a checkpoint folder written by :class:`~xmodal.callbacks.ExportStudent` (``config.json`` +
            ``model.safetensors``), or a Lightning ``.ckpt`` of a ``Distiller`` whose student it was
            (``student.*`` weights).
        detector: the detector's constructor arguments, needed for a ``.ckpt`` (they are not stored in it).
        **overrides: constructor arguments that do not change the weights, e.g. ``feat_layer``.
    """
    path = Path(path)
    if path.is_dir():
        from xmodal.zoo import create_model

        model = create_model(str(path), **overrides)
        if not isinstance(model, BEVDetector):
            raise TypeError(f"{path} holds a {type(model).__name__}, not a BEVDetector")
        return model
    if detector is None:
        raise ValueError(f"{path}: a Lightning checkpoint does not store the detector's arguments; pass `detector`")
    data = torch.load(path, map_location="cpu", weights_only=True)
    state = data.get("state_dict", data)
    if any(k.startswith("student.") for k in state):
        state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    model = BEVDetector(**{**dict(detector), **overrides})
    model.load_state_dict(state)
    return model


class BEVTeacher(nn.Module):
    """Frozen BEV detector; same output keys as the student.

    Args:
        model: checkpoint folder or Lightning ``.ckpt`` (see :func:`load_detector`).
        detector: constructor arguments for a ``.ckpt``.
        feat_layer: which layer the teacher returns as ``bev.feat`` (``None``: the one it was trained with).
    """

    output_keys = BEVDetector.output_keys

    def __init__(self, model: str, detector: dict[str, Any] | None = None, feat_layer: FeatLayer | None = None) -> None:
        super().__init__()
        self.model_name = model
        overrides = {"feat_layer": feat_layer} if feat_layer is not None else {}
        self.detector = load_detector(model, detector, **overrides)
        freeze(self.detector)

    def train(self, mode: bool = True) -> BEVTeacher:
        """Stays in eval mode whatever ``mode`` is: a teacher is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: Batch) -> Outputs:
        return self.detector(batch)

    def predict(self, batch: Batch, **kwargs: Any) -> list[dict[str, Tensor]]:
        return self.detector.predict(batch, **kwargs)

    def manifest(self) -> dict[str, Any]:
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}", "model": self.model_name,
            "config": self.detector.init_args, "weights_sha256": state_dict_sha256(self.detector),
            "preprocessing": {"inputs": self.detector.inputs, "camera": "float [0, 1], (x - 0.5) / 0.25"},
            "output_keys": list(self.output_keys),
        }

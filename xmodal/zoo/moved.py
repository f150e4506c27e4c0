"""Classes that moved: model cards and saved configs written before a move still load, with a one-line warning.

:data:`MOVED` maps each old ``class_path`` to the new one. The zoo reads a card's ``class_path`` (after checking
the card's digest, which covers the path as written) and a recipe's ``class_path`` entries through
:func:`current_class_path`; the card on disk is left as it is.
"""

from __future__ import annotations

import warnings
from typing import Any

MOVED: dict[str, str] = {
    # shared networks moved from the students and teachers into xmodal.modalities
    "xmodal.students.prompted.PromptedCLIP": "xmodal.modalities.prompts.PromptedCLIP",
    "xmodal.students.prompted.VisualPrompts": "xmodal.modalities.prompts.VisualPrompts",
    "xmodal.students.bev.BEVDetector": "xmodal.modalities.bev_detector.BEVDetector",
    "xmodal.students.bev.FeatLayer": "xmodal.modalities.bev_detector.FeatLayer",
    "xmodal.students.asr.ConformerASR": "xmodal.modalities.speech_nets.ConformerASR",
    "xmodal.teachers.whisper.WhisperFrontend": "xmodal.modalities.whisper_nets.WhisperFrontend",
    "xmodal.students.asr.TokenCrossEntropyLoss": "xmodal.losses.logits.TokenCrossEntropyLoss",
    # callbacks moved from the loss files (and the xmodal.losses exports) into xmodal.callbacks
    "xmodal.losses.augment.AugmentBatch": "xmodal.callbacks.AugmentBatch",
    "xmodal.losses.augment.HARDCallback": "xmodal.callbacks.HARDCallback",
    "xmodal.losses.weighting.TGeoKDMetaCallback": "xmodal.callbacks.TGeoKDMetaCallback",
    "xmodal.losses.mixspeech.MixSpeechSchedule": "xmodal.callbacks.MixSpeechSchedule",
    "xmodal.losses.AugmentBatch": "xmodal.callbacks.AugmentBatch",
    "xmodal.losses.HARDCallback": "xmodal.callbacks.HARDCallback",
    "xmodal.losses.TGeoKDMetaCallback": "xmodal.callbacks.TGeoKDMetaCallback",
    "xmodal.losses.MixSpeechSchedule": "xmodal.callbacks.MixSpeechSchedule",
}


class MovedClassWarning(UserWarning):
    """A card or config names a class by the path it had before it moved."""


def current_class_path(class_path: str, where: object) -> str:
    """``class_path``, or its new home when it moved (warning once per call, naming both and ``where``)."""
    new = MOVED.get(class_path)
    if new is None:
        return class_path
    warnings.warn(f"{where}: {class_path} moved to {new}; loading it from there (re-save to update the file)",
                  MovedClassWarning, stacklevel=3)
    return new


def current_class_paths(config: Any, where: object) -> Any:
    """A copy of a nested config whose ``class_path`` values are :func:`current_class_path`'s."""
    if isinstance(config, dict):
        return {key: current_class_path(value, where) if key == "class_path" and isinstance(value, str)
                else current_class_paths(value, where) for key, value in config.items()}
    if isinstance(config, list):
        return [current_class_paths(value, where) for value in config]
    return config

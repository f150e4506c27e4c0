"""The conventions every xmodal component follows.

Batches
    A batch is a flat ``dict[str, Any]`` keyed by field: ``image`` (uint8 ``B x 3 x H x W`` until the
    device-side transform turns it into float in [0, 1]), ``caption`` (``list[str]``; every model tokenizes
    with its own tokenizer), ``audio`` (``B x S`` waveform, int16 on the wire) with ``audio_lengths``,
    ``video`` (uint8 ``B x T x C x H x W``) with ``video_lengths``, ``lidar`` (``B x N x 4``) with
    ``lidar_counts``, ``camera`` with ``intrinsics``/``extrinsics``, ``boxes``, ``label``, ``transcript``...
    Cached teacher outputs ride along under ``teacher/<output key>`` (float16 on the wire).

Outputs
    Models return flat ``dict[str, Tensor]`` keyed ``<modality>.<kind>``: ``image.emb``, ``text.emb``,
    ``audio.feat``, ``video.feat``, ``bev.heatmap``... Teacher and student use the same keys, so pairing a
    teacher output with a student output is only naming. ``logit_scale`` is the one key without a modality.

Teachers
    Frozen, ``eval()`` forever, run under ``torch.inference_mode`` by the Distiller, and do their own
    preprocessing (tokenizer, normalisation, resolution, sample rate). They are never saved in student checkpoints.

Losses
    A :class:`DistillLoss` reads ``student_key`` from the student's outputs and ``teacher_key`` from the
    teacher's outputs (either may be a list of keys), and is weighted by ``weight`` and logged as ``name``.
"""

from __future__ import annotations

import re
import sys
from abc import ABCMeta, abstractmethod
from collections.abc import Mapping, Sequence
from functools import cache
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Batch = dict[str, Any]
Outputs = dict[str, Tensor]
Keys = str | Sequence[str]

CACHE_PREFIX = "teacher/"
CACHE_ID = CACHE_PREFIX + "cache_id"  # batch key: per sample, the id of the cache that wrote its teacher outputs
MASK_SUFFIX = "_mask"  # cached ``<key>_mask`` (bool ``T``) marks the valid positions of sequence output ``<key>``
TOPV, TOPI = ".topv", ".topi"  # top-k log-probabilities and their indices, for logits cached with ``top_k``


class ConfigKeyError(ValueError):
    """A config names a key that does not exist: an output no model produces, or a field a component lacks."""


def check_config_keys(where: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Raise :class:`ConfigKeyError` naming ``where.key`` for every key of ``given`` not in ``allowed``."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        names = ", ".join(f"{where}.{key}" for key in unknown)
        raise ConfigKeyError(f"unknown key {names} (known: {', '.join(sorted(allowed))})")


@runtime_checkable
class Modality(Protocol):
    """A modality plug-in: how samples of one kind are decoded, batched and prepared on the device.

    ``decode`` runs in data-loader workers on one raw WebDataset sample (``{extension: bytes}``) and returns
    compact tensors; ``collate`` stacks decoded items; ``on_device`` runs after the host-to-device copy and
    does the float conversion and augmentation. Encoders ("towers") and alignment heads that consume the
    modality live in the same module.
    """

    name: str
    fields: tuple[str, ...]

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]: ...

    def collate(self, items: Sequence[Mapping[str, Any]]) -> Batch: ...

    def on_device(self, batch: Batch, train: bool) -> Batch: ...


@runtime_checkable
class Teacher(Protocol):
    """A frozen model that maps a batch to outputs. See the module docstring for the rules."""

    output_keys: tuple[str, ...]

    def __call__(self, batch: Batch) -> Outputs: ...

    def manifest(self) -> dict[str, Any]:
        """Identity of the teacher for cache checks: name, weights hash, preprocessing, output keys."""
        ...


@runtime_checkable
class Student(Protocol):
    """A trainable model that maps a batch to outputs and says which keys it produces."""

    output_keys: tuple[str, ...]

    def __call__(self, batch: Batch) -> Outputs: ...


PLUGIN_PACKAGES = ("xmodal.modalities.", "xmodal.teachers.", "xmodal.students.")


def entry_point_modules() -> tuple[str, ...]:
    """The modules third-party packages register in the ``xmodal.plugins`` entry-point group (looked up again
    whenever ``sys.path`` changes, e.g. after a package is installed into a running process's path)."""
    return _entry_point_modules(tuple(sys.path))


@cache
def _entry_point_modules(search_path: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(point.module for point in entry_points(group="xmodal.plugins"))


def is_plugin_module(cls: type) -> bool:
    """An ``nn.Module`` class defined in xmodal's plug-in packages or in a registered third-party plug-in module."""
    module = getattr(cls, "__module__", "")
    return (isinstance(cls, type) and issubclass(cls, nn.Module) and cls is not PluginModule
            and (module.startswith(PLUGIN_PACKAGES) or module.startswith(entry_point_modules())))


def _all_subclasses(cls: type) -> list[type]:
    found: list[type] = []
    direct: list[type] = type.__subclasses__(cls)
    for sub in direct:
        found += [sub, *_all_subclasses(sub)]
    return found


class _PluginModules(ABCMeta):
    """Membership by origin: a class "is" a :class:`PluginModule` when :func:`is_plugin_module` says so."""

    def __subclasscheck__(cls, subclass: type) -> bool:
        return is_plugin_module(subclass)

    def __instancecheck__(cls, instance: Any) -> bool:
        return is_plugin_module(type(instance))

    def __subclasses__(cls) -> list[type]:  # what jsonargparse lists in --help and resolves short names among
        return list(dict.fromkeys(c for c in _all_subclasses(nn.Module) if is_plugin_module(c)))


class PluginModule(nn.Module, metaclass=_PluginModules):
    """The type of the Distiller's ``student`` and ``teacher``: any ``nn.Module`` of a plug-in (xmodal's
    modalities, teachers and students, and the modules of ``xmodal.plugins`` entry points), found by where its class
    is defined rather than by inheritance. So a config's ``class_path`` resolves among, and ``xmodal fit --help``
    lists, those few dozen classes instead of every ``nn.Module`` that torch, timm and transformers define. What a
    student or teacher must provide is :class:`Student` and :class:`Teacher`; this type only says where to look.
    """

    @abstractmethod  # abstract, so that it is no choice itself
    def forward(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class TaskMetric(Protocol):
    """A recipe's task metric during validation: feeds a torchmetrics ``Metric`` from the student and the batch.

    ``update`` runs on every validation batch with the student (in eval mode) and its outputs; ``compute`` gives
    the epoch's values by name (logged as ``val/<name>``, already reduced over DDP ranks); ``reset`` starts the
    next epoch. Implementations are ``nn.Module``s, so their metric states follow the model's device.
    """

    def update(self, student: nn.Module, outputs: Outputs, batch: Batch) -> None: ...

    def compute(self) -> dict[str, Tensor]: ...

    def reset(self) -> None: ...


class DistillLoss(nn.Module):
    """Base of every loss: picks its inputs by key, and carries its weight and name.

    Subclasses implement ``forward(s, t, batch)`` where ``s``/``t`` are a tensor (one key) or a tuple of
    tensors (a list of keys), and ``t`` is ``None`` when ``teacher_key`` is ``None`` (a student-only term
    such as the student's own contrastive loss).

    Args:
        student_key: output key(s) read from the student.
        teacher_key: output key(s) read from the teacher, or ``None``.
        weight: multiplier in the total loss.
        name: name under which the term is logged; defaults to the class name in snake case.

    Attributes:
        batch_coupled: ``True`` when one sample's term depends on the other samples of the batch (in-batch
            negatives, B x B affinities or Gram matrices, relations, batch-level transport). Such a loss changes
            with the batch composition, so gradient accumulation over micro-batches is *not* equivalent to one
            large batch, and the :class:`~xmodal.distiller.Distiller` warns when it is combined with
            ``accumulate_grad_batches > 1``. Per-sample losses averaged over the batch leave it ``False``.
    """

    batch_coupled: bool = False

    def __init__(
        self, student_key: Keys, teacher_key: Keys | None = None, weight: float = 1.0, name: str | None = None
    ) -> None:
        super().__init__()
        self.student_key = student_key
        self.teacher_key = teacher_key
        self.weight = weight
        self.name = name or _snake(type(self).__name__)

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_key is not None

    def select(self, student_out: Outputs, teacher_out: Outputs | None) -> tuple[Any, Any]:
        s = _pick(student_out, self.student_key, "student", self.name)
        t = None
        if self.teacher_key is not None:
            if teacher_out is None:
                raise ValueError(f"loss {self.name!r} reads teacher key {self.teacher_key!r} but there is no teacher")
            t = _pick(teacher_out, self.teacher_key, "teacher", self.name)
        return s, t

    def forward(self, s: Any, t: Any, batch: Batch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def key_list(keys: Keys | None) -> list[str]:
    if keys is None:
        return []
    return [keys] if isinstance(keys, str) else list(keys)


def _pick(outputs: Outputs, keys: Keys, who: str, loss_name: str) -> Any:
    missing = [k for k in key_list(keys) if k not in outputs]
    if missing:
        raise KeyError(f"loss {loss_name!r}: {who} produced no {missing}; it produces {sorted(outputs)}")
    if isinstance(keys, str):
        return outputs[keys]
    return tuple(outputs[k] for k in keys)


def _snake(name: str) -> str:
    """``FeatureMSELoss`` -> ``feature_mse``: snake case, acronyms kept whole, ``Loss`` suffix dropped."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
    return words.removesuffix("_loss")


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients and put the module in eval mode."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def to_float_image(x: Tensor) -> Tensor:
    """uint8 images in [0, 255] to float in [0, 1]; float input is returned unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x

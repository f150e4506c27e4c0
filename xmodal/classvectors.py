"""Class vectors stored once: a teacher's text embeddings for every class name, in one file with a manifest.

The file is a safetensors file holding ``class_vectors`` (float32 ``C x D``, L2-normalised rows) and
``logit_scale`` (the teacher's ``exp(log_scale)``, shape ``1``). Its metadata ``xmodal_manifest`` is a JSON
object that says where the vectors come from: the teacher's identity (class, weights hash, prompts hash,
prompt template), the class list in label order, and the embedding size. :func:`load_class_vectors` checks it
against what the caller expects, so a student is never trained or evaluated against another teacher's
classifier by accident.

``xmodal class-vectors --teacher DIR --out FILE`` writes the file from a stage-1 prompt-tuned teacher.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT = "xmodal.classvectors/1"
METADATA_KEY = "xmodal_manifest"


class ClassVectorsMismatchError(ValueError):
    """The stored class vectors come from another teacher, other prompts or another class list."""


@dataclass
class ClassVectors:
    """Loaded class vectors.

    Attributes:
        vectors: float32 ``C x D``, L2-normalised rows, in label order.
        logit_scale: the teacher's logit scale (a plain multiplier, not its log).
        classes: the ``C`` class names.
        manifest: the full manifest stored with the vectors.
    """

    vectors: Tensor
    logit_scale: float
    classes: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)


def save_class_vectors(
    path: str | Path, vectors: Tensor, classes: Sequence[str], teacher: Mapping[str, Any], logit_scale: float
) -> Path:
    """Write ``vectors`` (``C x D``) for ``classes`` with a manifest naming ``teacher``.

    Args:
        path: the ``.safetensors`` file to write (parents are created).
        vectors: ``C x D`` class embeddings; stored L2-normalised in float32.
        classes: the ``C`` class names in label order.
        teacher: the teacher's identity (JSON-serialisable: class name, weights hash, prompts hash...).
        logit_scale: the teacher's logit scale (``exp`` of its learnt log scale).

    Returns:
        The file written.
    """
    if vectors.dim() != 2 or vectors.shape[0] != len(classes):
        raise ValueError(f"expected {len(classes)} x D class vectors, got shape {tuple(vectors.shape)}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "teacher": dict(teacher), "classes": list(classes), "dim": int(vectors.shape[1])}
    tensors = {
        "class_vectors": torch.nn.functional.normalize(vectors.detach().float(), dim=-1).cpu().contiguous(),
        "logit_scale": torch.tensor([float(logit_scale)]),
    }
    save_file(tensors, str(out), metadata={METADATA_KEY: json.dumps(manifest, sort_keys=True)})
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest stored in a class vectors file (without reading the tensors)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ClassVectorsMismatchError(f"{path}: not an xmodal class vectors file (no {METADATA_KEY!r} metadata)")
    manifest: dict[str, Any] = json.loads(metadata[METADATA_KEY])
    return manifest


def load_class_vectors(
    path: str | Path, teacher: Mapping[str, Any] | None = None, classes: Sequence[str] | None = None
) -> ClassVectors:
    """Read a class vectors file, checking its manifest.

    Args:
        path: the file :func:`save_class_vectors` wrote.
        teacher: expected teacher identity; every field given must equal the stored one. ``None`` skips it.
        classes: expected class names in label order; ``None`` skips the check.

    Raises:
        ClassVectorsMismatchError: naming every field that differs.
    """
    manifest = read_manifest(path)
    diffs = []
    if manifest.get("format") != FORMAT:
        diffs.append(f"format: stored={manifest.get('format')!r} expected={FORMAT!r}")
    stored_teacher = manifest.get("teacher", {})
    for key, value in (teacher or {}).items():
        if _plain(stored_teacher.get(key)) != _plain(value):
            diffs.append(f"teacher.{key}: stored={stored_teacher.get(key)!r} expected={value!r}")
    if classes is not None and list(classes) != manifest.get("classes"):
        diffs.append(f"classes: stored={manifest.get('classes')!r} expected={list(classes)!r}")
    if diffs:
        raise ClassVectorsMismatchError(f"class vectors {path} do not match:\n  " + "\n  ".join(diffs))
    tensors = load_file(str(path))
    return ClassVectors(tensors["class_vectors"], float(tensors["logit_scale"].item()), list(manifest["classes"]),
                        manifest)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))

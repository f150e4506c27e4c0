"""A teacher that reads its outputs from the batch, where ``xmodal cache`` stored them in the shards.

Shards written by ``xmodal cache`` carry ``teacher.<output key>.npy`` fields (float16) and sit beside a
``manifest.json`` that identifies the teacher (name, weights hash, preprocessing, output keys, dtype). The
data module decodes those fields into ``batch["teacher/<output key>"]``. The manifest also holds per-dimension
statistics of the cached outputs (``stats``), which :attr:`CachedTeacher.stats` serves and a loss's
``normalize: {class_path: TargetNorm, init_args: {mode: standardize, stats: <manifest.json>}}`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.contracts import CACHE_ID, CACHE_PREFIX, TOPI, TOPV, Batch, Outputs, Teacher
from xmodal.data.stats import TargetStats, TeacherStats

MANIFEST = "manifest.json"


def dense_from_top_k(values: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor:
    """Dense log-probabilities over ``size`` entries from the ``k`` largest ones (``... x k``).

    The probability mass outside the top k is spread evenly over the other ``size - k`` entries, so the result is
    a normalised distribution whose top-k entries are exact.
    """
    values = values.float()
    outside = (1 - values.exp().sum(-1, keepdim=True)).clamp_min(1e-12)
    floor = torch.log(outside / max(size - values.shape[-1], 1))
    dense = floor.expand(*values.shape[:-1], size).clone()
    return dense.scatter_(-1, indices.long(), values)


class CacheMismatchError(ValueError):
    """The cache was written by another teacher (or with other preprocessing) than the one configured."""


class CachedTeacher(nn.Module, Teacher):
    """Serve pre-computed teacher outputs, after checking the cache manifest against the configured teacher.

    Args:
        manifest: path to the cache's ``manifest.json`` (or the folder holding it).
        teacher: the teacher the cache must come from. It is used only to compare manifests, then dropped,
            so it never runs during training. ``None`` skips the check (the manifest is still required).
        split_manifests: manifests of caches of other splits (e.g. the val shards, cached by a separate
            ``xmodal cache`` run). Each must describe the same teacher; their samples are then accepted too, so
            the recipe can validate. Constants, top-k sizes and statistics come from ``manifest``.
    """

    def __init__(self, manifest: str, teacher: nn.Module | None = None, split_manifests: Sequence[str] = ()) -> None:
        super().__init__()
        self.manifest_path = manifest_file(manifest)
        self.cache_manifest: dict[str, Any] = json.loads(self.manifest_path.read_text())
        self.cache_ids = {self.cache_manifest.get("cache_id")}
        for other in map(manifest_file, split_manifests):
            other_manifest = json.loads(other.read_text())
            check_manifest(other_manifest["teacher_manifest"], self.cache_manifest["teacher_manifest"], other)
            self.cache_ids.add(other_manifest.get("cache_id"))
        if teacher is not None:
            if not isinstance(teacher, Teacher):
                raise TypeError(f"{type(teacher).__name__} is not a Teacher: it has no manifest() to compare")
            check_manifest(self.cache_manifest["teacher_manifest"], teacher.manifest(), self.manifest_path)
        self.output_keys = tuple(self.cache_manifest["teacher_manifest"]["output_keys"])
        self.constants: dict[str, float] = dict(self.cache_manifest.get("constants", {}))
        self.top_k: dict[str, dict[str, int]] = dict(self.cache_manifest.get("top_k", {}))
        # per-dimension statistics of the cached outputs (caches written before they existed have none)
        self.stats: dict[str, TargetStats] = TeacherStats.from_dict(self.cache_manifest.get("stats", {})).keys

    def forward(self, batch: Batch) -> Outputs:
        self.check_cache_ids(batch.get(CACHE_ID))
        fields = {k: [k + TOPV, k + TOPI] if k in self.top_k else [k] for k in self.output_keys
                  if k not in self.constants}
        missing = [f for names in fields.values() for f in names if CACHE_PREFIX + f not in batch]
        if missing:
            raise KeyError(f"batch has no cached teacher outputs {missing}; train on the shards `xmodal cache` wrote")
        outputs = {}
        for key in fields:
            if key in self.top_k:
                outputs[key] = dense_from_top_k(batch[CACHE_PREFIX + key + TOPV], batch[CACHE_PREFIX + key + TOPI],
                                                self.top_k[key]["size"])
            else:
                value = batch[CACHE_PREFIX + key]
                outputs[key] = value.float() if value.is_floating_point() else value  # masks stay bool, ids int
        device = next(iter(outputs.values())).device if outputs else None
        outputs.update({k: torch.tensor(v, device=device) for k, v in self.constants.items()})
        return outputs

    def check_cache_ids(self, ids: list[str] | None) -> None:
        """Refuse samples cached by another run of ``xmodal cache`` than the one that wrote this manifest."""
        if None in self.cache_ids or ids is None:  # caches written before ids existed carry none
            return
        foreign = sorted(set(ids) - self.cache_ids)
        if foreign:
            expected = ", ".join(sorted(str(i) for i in self.cache_ids))
            raise CacheMismatchError(
                f"the shards hold teacher outputs of cache {foreign[0]}, but {self.manifest_path} describes cache "
                f"{expected}: point model.teacher.init_args.manifest at the manifest written with these shards, or "
                "name another split's manifest in split_manifests")

    def manifest(self) -> dict[str, Any]:
        return dict(self.cache_manifest["teacher_manifest"])


def manifest_file(path: str | Path) -> Path:
    """``path`` itself, or the ``manifest.json`` in it when it is a folder; it must exist."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"teacher cache manifest not found: {file}")
    return file


def check_manifest(cached: dict[str, Any], live: dict[str, Any], where: Path | str) -> None:
    """Raise :class:`CacheMismatchError` naming every identity field that differs."""
    fields = sorted(set(cached) | set(live))  # every field of a manifest is identity: teachers define their own
    diffs = [f"{k}: cache={cached.get(k)!r} configured={live.get(k)!r}" for k in fields
             if _normal(cached.get(k)) != _normal(live.get(k))]
    if diffs:
        listing = "\n  ".join(diffs)
        raise CacheMismatchError(f"teacher cache {where} does not match the configured teacher:\n  {listing}")


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value))

"""Decoding of the fields every recipe shares (labels, arrays, cached teacher outputs) and batch collation.

Modality-specific decoding (images, audio, video, LiDAR) lives in the modality plug-ins; this module turns
a raw WebDataset sample (``{"__key__": str, "<ext>": bytes}``) into one decoded item by asking each
modality, then adds the generic fields.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from xmodal.contracts import CACHE_ID, CACHE_PREFIX, MASK_SUFFIX, TOPI, TOPV, Batch, Modality

log = logging.getLogger(__name__)
CACHE_FIELD_PREFIX = "teacher."
CACHE_ID_FIELD = "teacher.cache_id.txt"  # each cached sample names the cache (manifest) that wrote it


NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class CorruptSample(ValueError):
    """A field's bytes cannot be decoded; the WebDataset pipeline skips and counts such samples."""


def load_npy(data: bytes) -> np.ndarray:
    """``.npy`` bytes to an array, refusing pickles and headers that declare more data than the bytes hold.

    The declared size is checked before anything is allocated, so a corrupt header claiming a giant shape costs
    nothing. Every failure raises :class:`CorruptSample`. The array is a read-only view of ``data``.
    """
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version not in NPY_HEADER_READERS:
            raise ValueError(f".npy format version {version} is not supported")
        shape, fortran, dtype = NPY_HEADER_READERS[version](buf)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        count = math.prod(shape)
        if count * dtype.itemsize != len(data) - buf.tell():
            raise ValueError(f"header declares {shape} {dtype} ({count * dtype.itemsize} bytes) but "
                             f"{len(data) - buf.tell()} bytes follow it")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell())
        return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    except Exception as error:
        raise CorruptSample(f"bad .npy: {type(error).__name__}: {error}") from error


def decode_npy(data: bytes) -> torch.Tensor:
    """``.npy`` bytes to a tensor (no pickles: object arrays are refused)."""
    return torch.from_numpy(load_npy(data).copy())


def decode_json(data: bytes | str) -> Any:
    return json.loads(data)


UNLABELLED = -100  # the label of a sample outside the labelled subset; label losses ignore it


def decode_sample(
    sample: Mapping[str, Any], modalities: Sequence[Modality], labelled_flag: str | None = None,
) -> dict[str, Any]:
    """One raw sample -> decoded item: each modality's fields, ``label`` (from ``json``) and cached teacher outputs.

    Cached outputs are stored as ``teacher.<output key>.npy`` and come back as ``teacher/<output key>``. With
    ``labelled_flag`` (e.g. ``labelled_10pct``), a sample whose ``json`` lacks that flag or has it false keeps its
    label hidden: ``label`` is ``UNLABELLED`` (semi-supervised distillation on a low-label subset).
    """
    item: dict[str, Any] = {"__key__": sample.get("__key__", "")}
    for modality in modalities:
        item.update(modality.decode(sample))
    if "json" in sample:
        meta = decode_json(sample["json"])
        if isinstance(meta, dict) and "label" in meta:
            labelled = labelled_flag is None or bool(meta.get(labelled_flag, False))
            item["label"] = int(meta["label"]) if labelled else UNLABELLED
    if CACHE_ID_FIELD in sample:
        data = sample[CACHE_ID_FIELD]
        item[CACHE_ID] = data.decode() if isinstance(data, bytes) else str(data)
    for field, data in sample.items():
        if field.startswith(CACHE_FIELD_PREFIX) and field.endswith(".npy"):
            key = field[len(CACHE_FIELD_PREFIX):-len(".npy")]
            item[CACHE_PREFIX + key] = decode_npy(data)
    return item


def decode_or_skip(
    sample: Mapping[str, Any], modalities: Sequence[Modality], labelled_flag: str | None = None,
) -> dict[str, Any] | None:
    """:func:`decode_sample`, or ``None`` (with a warning naming the key) when any decoder fails: a corrupt sample
    is skipped, never a crash; the caller counts it."""
    try:
        return decode_sample(sample, modalities, labelled_flag)
    except Exception as error:
        log.warning("skipping corrupt sample %r: %s: %s", sample.get("__key__"), type(error).__name__, error)
        return None


def collate_items(items: Sequence[Mapping[str, Any]], modalities: Sequence[Modality]) -> Batch:
    """Decoded items -> a flat batch: modality fields by their plug-in, then labels, keys and cached outputs."""
    batch: Batch = {}
    for modality in modalities:
        batch.update(modality.collate(items))
    batch["__key__"] = [item["__key__"] for item in items]
    if all("label" in item for item in items):
        batch["label"] = torch.tensor([item["label"] for item in items], dtype=torch.long)
    if all(CACHE_ID in item for item in items):
        batch[CACHE_ID] = [item[CACHE_ID] for item in items]
    for key in items[0]:
        if key.startswith(CACHE_PREFIX) and key != CACHE_ID:
            batch[key] = pad_stack([item[key] for item in items], key, ragged=has_mask(key, items[0]))
    return batch


def has_mask(key: str, item: Mapping[str, Any]) -> bool:
    """Whether cached output ``key`` is a sequence with a ``<base>_mask`` (as ``xmodal cache`` stores trimmed ones)."""
    base = key.removesuffix(MASK_SUFFIX).removesuffix(TOPV).removesuffix(TOPI)
    return base + MASK_SUFFIX in item


def pad_stack(tensors: Sequence[torch.Tensor], name: str = "tensor", ragged: bool = True) -> torch.Tensor:
    """Stack tensors of one rank; with ``ragged``, zero-pad (``False`` for masks) the leading dimension.

    Cached sequence outputs (a teacher's frames or context vectors with their ``*_mask``) are stored trimmed per
    sample, so a batch mixes lengths; padding with zeros keeps every mask false past its sample's length. Any other
    shape mismatch (a cached output of the wrong size, say) is refused, never padded.
    """
    if len({t.dim() for t in tensors}) > 1:
        raise ValueError(f"{name}: cannot batch tensors of ranks {sorted({t.dim() for t in tensors})}")
    fixed = {tuple(t.shape[1:] if ragged else t.shape) for t in tensors}
    if len(fixed) > 1:
        what = "trailing shapes" if ragged else "shapes (not a masked sequence, so it cannot be padded)"
        raise ValueError(f"{name}: samples disagree in {what}: {sorted(fixed)}; the cache does not match this "
                         "teacher or was written by another one")
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors), strict=True)]
    if all(list(t.shape) == shape for t in tensors):
        return torch.stack(list(tensors))
    out = tensors[0].new_zeros(len(tensors), *shape)
    for i, tensor in enumerate(tensors):
        out[i][tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out

"""Run a teacher over shards once and write shards that carry its outputs (``xmodal cache``).

The new shards hold every original field untouched plus ``teacher.<output key>.npy`` (float outputs as float16,
masks as bool, integer outputs as int32), and the output folder gets ``manifest.json`` with the teacher's identity
(its :meth:`manifest`), the source pattern, the dtype, the sample count, the corrupt samples skipped (as training
skips them: any decoder failure) and, under ``stats``, per-dimension statistics of every cached float output over
the cached values (:mod:`xmodal.data.stats`; what ``normalize: standardize`` losses can read). Shards appear only
once all are written, so a failed run leaves the folder as it was, and an output folder holding the source shards
under the same prefix is refused. :class:`~xmodal.teachers.cached.CachedTeacher` refuses a cache whose manifest
does not match the configured teacher. Outputs are computed on the un-augmented samples (the modalities'
evaluation transform), so a cache is only valid for training without teacher-side augmentation.

Variable-length outputs are stored trimmed: an output ``<key>`` with a bool ``<key>_mask`` (``B x T``), such as a
speech teacher's ``audio.frames`` or ``audio.token_states``, keeps each sample's positions up to its last valid one, and
the loader zero-pads them back to the longest in the batch (:func:`~xmodal.data.decoders.pad_stack`; masks pad with
``False``). Other outputs of varying size are zero-padded too, so a padded integer output reads 0 past its end.

Logits over a large vocabulary (Whisper's 51,864 tokens at every decoder position) are mostly storage for
near-zero probabilities: ``top_k={"audio.logits": 64}`` keeps each position's ``k`` largest log-probabilities
(float16, ``.topv``) and their indices (int32, ``.topi``) instead, and :class:`~xmodal.teachers.cached.CachedTeacher`
rebuilds dense log-probabilities with the remaining mass spread evenly over the other entries
(:func:`~xmodal.teachers.cached.dense_from_top_k`). At temperature 1 the top-k probabilities are then exact; at other
temperatures the tail is an approximation.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from xmodal.contracts import MASK_SUFFIX, TOPI, TOPV, Modality, Teacher
from xmodal.data.decoders import CACHE_FIELD_PREFIX, CACHE_ID_FIELD, collate_items, decode_or_skip
from xmodal.data.shards import existing_shards, shard_pattern, write_shards
from xmodal.data.stats import TeacherStats
from xmodal.data.wds import FAILED, REMOTE, expand_shards, move_batch, prepare_on_device, read_shards
from xmodal.teachers.cached import MANIFEST

log = logging.getLogger(__name__)
CACHE_DTYPE = np.float16


class OutputOverlapsInput(ValueError):
    """The cache would overwrite or delete one of its own source shards."""


def _raw_batches(shards: str, batch_size: int, failed: list[str]) -> Iterator[list[dict[str, Any]]]:
    """Raw samples in chunks; a shard that breaks mid-way is recorded in ``failed`` and reading goes on."""
    chunk: list[dict[str, Any]] = []
    for sample in read_shards({"url": url} for url in expand_shards(shards)):
        if FAILED in sample:
            failed.append(str(sample[FAILED]))
            log.warning("shard failed mid-way: %s", sample[FAILED])
            continue
        chunk.append({k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"})
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _to_arrays(outputs: dict[str, torch.Tensor], top_k: dict[str, int], stats: dict[str, Any]) -> dict[str, np.ndarray]:
    arrays = {}
    for key, value in outputs.items():
        if value.dim() == 0:  # batch-independent scalars such as logit_scale go to the manifest
            stats["constants"][key] = float(value)
        elif key in top_k:
            size = value.shape[-1]
            k = min(top_k[key], size)
            values, indices = value.float().log_softmax(-1).topk(k, dim=-1)
            stats["top_k"][key] = {"k": k, "size": size}
            arrays[key + TOPV] = values.cpu().numpy().astype(CACHE_DTYPE)
            arrays[key + TOPI] = indices.to(torch.int32).cpu().numpy()
        elif value.dtype == torch.bool:
            arrays[key] = value.cpu().numpy()
        elif not value.is_floating_point():  # token ids: float16 is exact only up to 2048
            arrays[key] = value.to(torch.int32).cpu().numpy()
        else:
            arrays[key] = value.detach().float().cpu().numpy().astype(CACHE_DTYPE)
    return arrays


def _valid_lengths(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """For each ``<key>_mask`` output (bool ``B x T``): each sample's length up to its last valid position."""
    lengths = {}
    for key, mask in arrays.items():
        if key.endswith(MASK_SUFFIX) and mask.dtype == np.bool_ and mask.ndim == 2:
            if mask.shape[1] == 0:  # e.g. a batch whose hypotheses are all empty
                lengths[key.removesuffix(MASK_SUFFIX)] = np.zeros(mask.shape[0], dtype=np.int64)
                continue
            last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
            lengths[key.removesuffix(MASK_SUFFIX)] = np.where(mask.any(axis=1), last, 0)
    return lengths


def _sample_arrays(arrays: dict[str, np.ndarray], lengths: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Sample ``i``'s outputs, sequences trimmed to its length (their mask says where the batch padded them), so
    that a cached sample does not depend on the batch it was computed in."""
    sample = {}
    for key, array in arrays.items():
        base = key.removesuffix(MASK_SUFFIX).removesuffix(TOPV).removesuffix(TOPI)
        length = lengths.get(base)
        if length is not None and array.ndim >= 2 and array.shape[1] == arrays[base + MASK_SUFFIX].shape[1]:
            sample[key] = array[i, : int(length[i])]
        else:
            sample[key] = array[i]
    return sample


def _with_outputs(
    teacher: torch.nn.Module, modalities: Sequence[Modality], shards: str, batch_size: int, device: str,
    stats: dict[str, Any], top_k: dict[str, int],
) -> Iterator[dict[str, Any]]:
    progress = tqdm(desc="caching teacher outputs", unit="sample")
    for chunk in _raw_batches(shards, batch_size, stats["failed_shards"]):
        raw: list[dict[str, Any]] = []
        items: list[dict[str, Any]] = []
        for sample in chunk:
            item = decode_or_skip(sample, modalities)
            if item is None:
                stats["skipped"].append(sample.get("__key__"))
            else:
                items.append(item)
                raw.append(sample)
        progress.update(len(chunk) - len(raw))
        if not items:
            continue
        batch = collate_items(items, modalities)
        batch = prepare_on_device(move_batch(batch, device), modalities, train=False)
        with torch.inference_mode():
            arrays = _to_arrays(teacher(batch), top_k, stats)
        stats["target_stats"].update(arrays)
        lengths = _valid_lengths(arrays)
        for i, sample in enumerate(raw):
            for key, array in _sample_arrays(arrays, lengths, i).items():
                sample[f"{CACHE_FIELD_PREFIX}{key}.npy"] = array
            sample[CACHE_ID_FIELD] = stats["cache_id"]
            stats["count"] += 1
            yield sample
        progress.update(len(raw))
    progress.close()


def cache_teacher(
    teacher: torch.nn.Module, modalities: Sequence[Modality], shards: str, out: str | Path, *, batch_size: int = 64,
    shard_size: int = 1000, prefix: str | None = None, device: str = "cpu", top_k: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Write ``out/<prefix>-NNNNNN.tar`` with the teacher's outputs and ``out/manifest.json``; return the manifest.

    ``top_k``: output keys holding logits (last dim = vocabulary) to store as their ``k`` largest log-probabilities.
    """
    if not isinstance(teacher, Teacher):
        raise TypeError(f"{type(teacher).__name__} is not a Teacher: it needs output_keys and manifest()")
    top_k = dict(top_k or {})
    if unknown := sorted(set(top_k) - set(teacher.output_keys)):
        raise ValueError(f"top_k names {unknown}, which the teacher does not output "
                         f"(it outputs {sorted(teacher.output_keys)})")
    teacher.to(device).eval()
    out = Path(out)
    sources = expand_shards(shards)
    prefix = prefix or Path(sources[0]).name.rsplit("-", 1)[0]
    inputs = {Path(url).resolve() for url in sources if not REMOTE.match(url)}
    for path in existing_shards(out, prefix):
        if path.resolve() in inputs:
            raise OutputOverlapsInput(f"refusing to cache into {out}: {path} is a source shard and would be "
                                      "overwritten or deleted; choose another --out or --prefix")
    stats: dict[str, Any] = {"count": 0, "skipped": [], "constants": {}, "top_k": {}, "cache_id": uuid.uuid4().hex,
                             "failed_shards": [], "target_stats": TeacherStats()}
    started = time.perf_counter()
    paths = write_shards(_with_outputs(teacher, modalities, shards, batch_size, device, stats, top_k), out, prefix,
                         max_count=shard_size)
    manifest = {
        "teacher_manifest": teacher.manifest(),
        "cache_id": stats["cache_id"],
        "source": shards,
        "shards": shard_pattern(paths),
        "dtype": "float16",
        "count": stats["count"],
        "skipped": len(stats["skipped"]),
        "skipped_keys": stats["skipped"],
        "failed_shards": stats["failed_shards"],
        "constants": stats["constants"],
        "top_k": stats["top_k"],
        "stats": stats["target_stats"].to_dict(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    partial = out / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(out / MANIFEST)
    return manifest

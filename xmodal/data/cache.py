"""``xmodal cache``: run a teacher over shards once and write shards that carry its outputs.

The new shards hold every original field untouched plus ``teacher.<output key>.npy`` (float16), and the
output folder gets ``manifest.json`` with the teacher's identity (its :meth:`manifest`), the source pattern,
the dtype and the sample count. :class:`~xmodal.teachers.cached.CachedTeacher` refuses a cache whose manifest
does not match the configured teacher. Outputs are computed on the un-augmented samples (the modalities'
evaluation transform), so a cache is only valid for training without teacher-side augmentation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from xmodal.contracts import Modality, Teacher
from xmodal.data.decoders import CACHE_FIELD_PREFIX, collate_items, decode_sample
from xmodal.data.shards import shard_pattern, write_shards
from xmodal.data.wds import expand_shards, prepare_on_device
from xmodal.teachers.cached import MANIFEST

CACHE_DTYPE = np.float16


def _raw_batches(shards: str, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    dataset = wds.WebDataset(expand_shards(shards), shardshuffle=False, empty_check=False)
    chunk: list[dict[str, Any]] = []
    for sample in dataset:
        chunk.append({k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"})
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _with_outputs(
    teacher: torch.nn.Module, modalities: Sequence[Modality], shards: str, batch_size: int, device: str,
    stats: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    progress = tqdm(desc="caching teacher outputs", unit="sample")
    for raw in _raw_batches(shards, batch_size):
        batch = collate_items([decode_sample(s, modalities) for s in raw], modalities)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch = prepare_on_device(batch, modalities, train=False)
        with torch.no_grad():
            outputs = teacher(batch)
        arrays = {}
        for key, value in outputs.items():
            if value.dim() == 0:  # batch-independent scalars such as logit_scale go to the manifest
                stats["constants"][key] = float(value)
            else:
                arrays[key] = value.detach().float().cpu().numpy().astype(CACHE_DTYPE)
        for i, sample in enumerate(raw):
            for key, array in arrays.items():
                sample[f"{CACHE_FIELD_PREFIX}{key}.npy"] = array[i]
            stats["count"] += 1
            yield sample
        progress.update(len(raw))
    progress.close()


def cache_teacher(
    teacher: torch.nn.Module, modalities: Sequence[Modality], shards: str, out: str | Path, *, batch_size: int = 64,
    shard_size: int = 1000, prefix: str | None = None, device: str = "cpu",
) -> dict[str, Any]:
    """Write ``out/<prefix>-NNNNNN.tar`` with the teacher's outputs and ``out/manifest.json``; return the manifest."""
    if not isinstance(teacher, Teacher):
        raise TypeError(f"{type(teacher).__name__} is not a Teacher: it needs output_keys and manifest()")
    teacher.to(device).eval()
    out = Path(out)
    prefix = prefix or Path(expand_shards(shards)[0]).name.rsplit("-", 1)[0]
    stats: dict[str, Any] = {"count": 0, "constants": {}}
    started = time.perf_counter()
    paths = write_shards(_with_outputs(teacher, modalities, shards, batch_size, device, stats), out, prefix,
                         max_count=shard_size)
    manifest = {
        "teacher_manifest": teacher.manifest(),
        "source": shards,
        "shards": shard_pattern(paths),
        "dtype": "float16",
        "count": stats["count"],
        "constants": stats["constants"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def cache_main(argv: Sequence[str]) -> None:
    """``xmodal cache --config cache.yaml`` (or flags): ``teacher``, ``modalities``, ``shards``, ``out``..."""
    from jsonargparse import CLI

    import xmodal.cli  # noqa: F401  (registers short class names)

    manifest = CLI(cache_teacher, args=list(argv), as_positional=False)
    print(json.dumps({k: manifest[k] for k in ("shards", "count", "seconds")}, indent=2))

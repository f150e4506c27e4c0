"""Checkpoint files that fail loudly: a clear error for an unreadable checkpoint, and atomic writes.

Lightning already writes local checkpoints through an ``fsspec`` transaction (a temporary file moved into place),
so a run killed while saving never replaces the previous good file with a half-written one. What it does not do
is say what went wrong when a checkpoint *is* damaged (copied half-way, truncated by a full disk, not a
checkpoint at all): ``torch.load`` fails with ``PytorchStreamReader failed reading zip archive``. With
:class:`SafeCheckpointIO` (the ``xmodal`` CLI installs it unless another ``CheckpointIO`` is configured), loading
raises :class:`CorruptCheckpointError` naming the file, the reason, and the other checkpoints in its folder that
can be resumed from instead. The damaged file is left in place for inspection; nothing is deleted.

Two more guards: a checkpoint whose weights hold ``inf`` or ``NaN`` is never written (saving raises
:class:`NonFiniteWeightsError` naming the step and the first bad tensor, so the last good checkpoint stays the
newest), and every saved checkpoint carries ``state_dict_sha256``, a digest of its tensors' names, dtypes, shapes
and bytes, which loading recomputes: a checkpoint whose tensor bytes were altered is refused.

In YAML, for runs outside the xmodal CLI::

    trainer:
      plugins: [{class_path: xmodal.checkpoint.SafeCheckpointIO}]
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read."""


class NonFiniteWeightsError(RuntimeError):
    """The weights to be saved hold ``inf`` or ``NaN``; the checkpoint was not written."""


DIGEST_KEY = "state_dict_sha256"


def state_dict_digest(state_dict: Mapping[str, Any]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in key order (non-tensors are skipped)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def first_non_finite(state_dict: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor holding ``inf`` or ``NaN``, or ``None``."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def other_checkpoints(path: Path) -> list[Path]:
    """Checkpoints beside ``path`` (newest first), the candidates to resume from instead."""
    if not path.parent.is_dir():
        return []
    found = [p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def corrupt_message(path: Path, error: BaseException) -> str:
    others = other_checkpoints(path)
    hint = (f"Checkpoints beside it, newest first: {', '.join(str(p) for p in others)}; resume from one of them "
            "(--ckpt_path)." if others else "No other checkpoint was found beside it.")
    return (f"checkpoint {path} is unreadable ({type(error).__name__}: {error}). It is probably truncated (copied or "
            f"written only in part) or not a Lightning checkpoint; it was left untouched. {hint}")


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose loads turn an unreadable file into a :class:`CorruptCheckpointError`.

    Saving is Lightning's (atomic for local files); after the move, the file is flushed to disk with ``fsync`` so
    that a machine crash right after ``save`` does not leave an empty "latest" checkpoint behind.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        state_dict = checkpoint.get("state_dict", {})
        bad = first_non_finite(state_dict)
        if bad is not None:
            raise NonFiniteWeightsError(
                f"weights went non-finite by step {checkpoint.get('global_step', '?')} ({bad} holds inf or NaN); "
                f"{path} was not written and the last good checkpoint was kept. Lower the learning rate or clip "
                "gradients (trainer.gradient_clip_val).")
        checkpoint = {**checkpoint, DIGEST_KEY: state_dict_digest(state_dict)}
        super().save_checkpoint(checkpoint, path, storage_options)
        if _is_local_file_protocol(path) and os.path.isfile(path):
            with open(path, "rb") as f:
                os.fsync(f.fileno())

    def load_checkpoint(self, path: Any, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as error:  # torch.load reports damage as RuntimeError, EOFError, UnpicklingError...
            raise CorruptCheckpointError(corrupt_message(Path(str(path)), error)) from error
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CorruptCheckpointError(corrupt_message(Path(str(path)), ValueError("no state_dict in the file")))
        expected = checkpoint.get(DIGEST_KEY)
        if expected is not None and expected != state_dict_digest(checkpoint["state_dict"]):
            altered = ValueError(f"its tensors do not match the {DIGEST_KEY} written with them (altered bytes)")
            raise CorruptCheckpointError(corrupt_message(Path(str(path)), altered))
        return checkpoint

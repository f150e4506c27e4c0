"""Checkpoint files that fail loudly: a clear error for an unreadable checkpoint, and atomic writes.

Lightning already writes local checkpoints through an ``fsspec`` transaction (a temporary file moved into place),
so a run killed while saving never replaces the previous good file with a half-written one. What it does not do
is say what went wrong when a checkpoint *is* damaged (copied half-way, truncated by a full disk, not a
checkpoint at all): ``torch.load`` fails with ``PytorchStreamReader failed reading zip archive``. With
:class:`SafeCheckpointIO` (the ``xmodal`` CLI installs it unless another ``CheckpointIO`` is configured), loading
raises :class:`CorruptCheckpointError` naming the file, the reason, and the other checkpoints in its folder that
can be resumed from instead. The damaged file is left in place for inspection; nothing is deleted.

In YAML, for runs outside the xmodal CLI::

    trainer:
      plugins: [{class_path: xmodal.checkpoint.SafeCheckpointIO}]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read."""


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
        return checkpoint

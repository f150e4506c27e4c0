"""Helpers every teacher wrapper shares: weight hashing for manifests."""

from __future__ import annotations

from torch import nn

from xmodal.checkpoint import state_dict_digest


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's state dict: names, dtypes, shapes and raw bytes, in sorted name order
    (:func:`~xmodal.checkpoint.state_dict_digest`).

    Two modules hash equal exactly when their state dicts hold the same tensors; the hash does not depend on
    the device or on parameter registration order.
    """
    return state_dict_digest(module.state_dict())

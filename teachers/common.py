"""Helpers every teacher wrapper shares: weight hashing for manifests."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's state dict: names, dtypes, shapes and raw bytes, in sorted name order.

    Two modules hash equal exactly when their state dicts hold the same tensors; the hash does not depend on
    the device or on parameter registration order.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

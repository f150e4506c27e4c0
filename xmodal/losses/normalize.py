"""Normalisation of teacher targets, the ``normalize`` option of the feature, sequence and relation losses.

Raw teacher features can be far from unit scale and dominated by one constant vector (Whisper tiny.en's encoder
frames: mean square 1.47 per dimension, 27% of it the corpus mean, values up to 11; a lip reader's states: 0.058),
which makes a regression term saturate the student or fight its task loss. The modes:

* ``"none"``: the target as it is.
* ``"standardize"``: ``(t - mean) / std`` per dimension, with stored statistics (``stats``: the JSON of
  ``xmodal stats --out`` or a cache's ``manifest.json``, see :mod:`xmodal.data.stats`) or, without them, running
  statistics of the teacher targets seen in training (cumulative, or an EMA with ``momentum``), kept in buffers
  that checkpoints save. Teacher side only: the student (through its projector) regresses standardised targets,
  as MAE's ``norm_pix_loss`` standardises its pixel targets.
* ``"layernorm"``: parameter-free layer norm of each target vector over its last dimension, teacher side only,
  as data2vec (arXiv 2202.03555) and feature distillation (Wei et al., arXiv 2205.14141) whiten their targets.
* ``"l2"``: unit length along the last dimension on *both* sides, so only directions are compared (as DMAE's
  normalised features, arXiv 2208.12256).

A ``B x C x H x W`` map is normalised over its channels (dimension 1), as :mod:`xmodal.data.stats` reads it.
Masks (bool over the leading dimensions) keep padded positions out of the running statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.contracts import Keys, key_list
from xmodal.data.stats import feature_rows, load_stats

NormMode = Literal["none", "standardize", "layernorm", "l2"]
EPS = 1e-6


class TargetNorm(nn.Module):
    """Normalise teacher targets (and, for ``"l2"``, the student side); see the module docstring.

    Args:
        mode: ``"none"``, ``"standardize"``, ``"layernorm"`` or ``"l2"``.
        stats: for ``"standardize"``: a statistics JSON (``xmodal stats --out``) or a cache's ``manifest.json``;
            ``None`` uses running statistics.
        key: the output key whose stored statistics apply; the loss sets its teacher key when it is ``None``.
        momentum: running statistics only: ``None`` for the cumulative mean and variance of all targets seen, or
            an EMA momentum in ``[0, 1)`` (``stat <- momentum * stat + (1 - momentum) * batch_stat``).
        eps: floor under the standard deviation (``"standardize"``) and the variance (``"layernorm"``).
    """

    mean: Tensor
    std: Tensor
    running_count: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, mode: NormMode = "none", stats: str | None = None, key: str | None = None,
                 momentum: float | None = None, eps: float = EPS) -> None:
        super().__init__()
        if mode not in get_args(NormMode):
            raise ValueError(f"normalize must be one of {', '.join(get_args(NormMode))}, got {mode!r}")
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1) or None, got {momentum}")
        self.mode, self.stats_path, self.key, self.momentum, self.eps = mode, stats, key, momentum, eps
        self.running = mode == "standardize" and stats is None
        if self.running:
            self.register_buffer("running_count", torch.zeros((), dtype=torch.long))
            self.register_buffer("running_mean", torch.zeros(0))
            self.register_buffer("running_var", torch.zeros(0))
        if mode == "standardize" and stats is not None and key is not None:
            self.load(stats, key)

    def bind(self, key: str) -> TargetNorm:
        """Read the stored statistics of ``key`` unless a key was configured; returns ``self``."""
        if self.key is None:
            self.key = key
            if self.mode == "standardize" and self.stats_path is not None:
                self.load(self.stats_path, key)
        return self

    def load(self, path: str, key: str) -> None:
        stats = load_stats(path)
        if key not in stats:
            raise KeyError(f"{path} has no statistics for {key!r} (it has {sorted(stats)})")
        self.register_buffer("mean", stats[key].mean, persistent=False)
        self.register_buffer("std", stats[key].std.clamp_min(self.eps), persistent=False)

    def teacher(self, t: Tensor, mask: Tensor | None = None) -> Tensor:
        """The normalised target; ``mask`` (bool over the leading dimensions) marks the real positions."""
        if self.mode == "none":
            return t
        if self.mode == "l2":
            return F.normalize(t, dim=_feature_dim(t))
        if self.mode == "layernorm":
            return _channels_last(t, lambda x: F.layer_norm(x, x.shape[-1:], eps=self.eps))
        if self.running and self.training:
            self.update(t, mask)
        mean, std = self.statistics() if not self.running or self.running_count > 0 else _moments(t, mask)
        return _channels_last(t, lambda x: (x - mean.to(x)) / std.to(x))

    def student(self, s: Tensor) -> Tensor:
        """The student side: unit length for ``"l2"``, unchanged otherwise."""
        return F.normalize(s, dim=_feature_dim(s)) if self.mode == "l2" else s

    def statistics(self) -> tuple[Tensor, Tensor]:
        """Per-dimension mean and std used by ``"standardize"`` (running ones once a training batch filled them)."""
        if not self.running:
            return self.mean, self.std
        return self.running_mean, self.running_var.sqrt().clamp_min(self.eps)

    @torch.no_grad()
    def update(self, t: Tensor, mask: Tensor | None = None) -> None:
        """Fold a batch of targets into the running mean and variance (summed over processes under DDP)."""
        rows = feature_rows(t.detach(), mask).double()
        moments = torch.cat([rows.new_tensor([len(rows)]), rows.sum(0), rows.square().sum(0)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
        count, dims = int(moments[0]), rows.shape[-1]
        if count == 0:
            return
        mean, meansq = moments[1 : dims + 1] / count, moments[dims + 1 :] / count
        var = (meansq - mean.square()).clamp_min(0)
        if self.running_count == 0:
            new_mean, new_var = mean, var
        else:
            old_mean, old_var = self.running_mean.double(), self.running_var.double()
            share = 1 - self.momentum if self.momentum is not None else count / (int(self.running_count) + count)
            new_mean = old_mean + share * (mean - old_mean)
            # total variance of the mix = mixed variances + the spread of the two means around the mixed mean
            new_var = (1 - share) * old_var + share * var + share * (1 - share) * (mean - old_mean).square()
        self.running_mean = new_mean.float()
        self.running_var = new_var.float()
        self.running_count += count

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        if self.running:  # running buffers are sized by the first batch: take the checkpoint's sizes
            for name in ("running_mean", "running_var"):
                if prefix + name in state_dict:
                    setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}" + (f", stats={self.stats_path!r}" if self.stats_path else "")


NormOption = NormMode | TargetNorm


def target_norm(option: NormOption, teacher_key: Keys | None) -> TargetNorm:
    """A loss's :class:`TargetNorm` from its ``normalize`` option, bound to the loss's (first) teacher key: the
    feature, when a list of keys adds masks or indices."""
    norm = option if isinstance(option, TargetNorm) else TargetNorm(option)
    keys = key_list(teacher_key)
    return norm.bind(keys[0]) if keys else norm


def target_norms(option: NormOption, teacher_keys: list[str]) -> nn.ModuleList:
    """One :class:`TargetNorm` per teacher key (each with its own statistics), for losses over lists of pairs."""
    return nn.ModuleList(target_norm(copy.deepcopy(option), key) for key in teacher_keys)


def _feature_dim(x: Tensor) -> int:
    return 1 if x.dim() == 4 else -1


def _moments(t: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean and std of one batch: what standardisation uses before training has filled the running statistics
    (Lightning's sanity-check validation runs first)."""
    rows = feature_rows(t.detach(), mask).float()
    return rows.mean(0), rows.std(0, correction=0).clamp_min(EPS)


def _channels_last(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    if x.dim() == 4:
        return fn(x.movedim(1, -1)).movedim(-1, 1)
    return fn(x)

"""Per-dimension statistics of teacher outputs, gathered in one pass (``xmodal stats``, ``xmodal cache``).

For each float output key, :class:`TargetStats` accumulates over every vector of the output (a vector is the last
dimension; a ``B x C x H x W`` map is read as ``H W`` vectors of its ``C`` channels, as
:func:`~xmodal.losses.features.to_tokens` does) the count, per-dimension mean, standard deviation (population,
``ddof=0``), largest ``|x|`` and a few quantiles, and two summaries: the mean square per dimension and the share of
the energy held by the mean vector, ``||mean||^2 / mean ||x||^2`` (1 when the output is one constant vector).
Positions where ``<key>_mask`` is ``False`` are left out. ``xmodal cache`` gathers them over the cached (float16)
values and stores them in the manifest under ``stats``; ``xmodal stats`` over a recipe's live teacher.

Moments are exact (float64 sums). Quantiles are exact while at most ``reservoir_elements / dims`` vectors have been
seen; beyond that they are computed from a uniform random sample of that many vectors (reservoir sampling, Vitter's
algorithm R, seeded), so with the default budget of 2^22 numbers a 384-wide output keeps 10,922 vectors: the 1% and
99% quantiles are then within about 0.1 percentile of the true ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xmodal.contracts import MASK_SUFFIX, TOPV

QUANTILES = (0.01, 0.5, 0.99)
RESERVOIR_ELEMENTS = 1 << 22
CHUNK_ELEMENTS = 1 << 24


def feature_rows(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """The vectors of an output as rows ``N x D``: valid positions only, channels of a 4-D map as the features.

    Args:
        x: ``B x D``, ``B x T x D`` (with an optional bool mask ``B x T``), ``B x C x H x W``, or ``B`` (one number
            per sample, read as ``D = 1``).
        mask: bool over the leading dimensions of ``x``; ``True`` keeps a position.
    """
    if x.dim() == 4:
        x = x.movedim(1, -1)
    if mask is not None:
        mask = mask.to(x.device, torch.bool)
        return x[mask] if mask.dim() < x.dim() else x[mask][:, None]
    return x.reshape(-1, 1) if x.dim() == 1 else x.reshape(-1, x.shape[-1])


class FrozenStatsError(RuntimeError):
    """Statistics read back from JSON are a summary: they cannot take more data."""


class TargetStats:
    """Streaming per-dimension statistics of one output; see the module docstring.

    Args:
        quantiles: the probabilities reported, in ``[0, 1]``.
        reservoir_elements: budget (numbers, not vectors) of the sample the quantiles come from.
        seed: seed of the reservoir's draws, so a pass over the same data gives the same quantiles.
    """

    def __init__(self, quantiles: Sequence[float] = QUANTILES, reservoir_elements: int = RESERVOIR_ELEMENTS,
                 seed: int = 0) -> None:
        self.quantile_levels = tuple(float(q) for q in quantiles)
        self.reservoir_elements = reservoir_elements
        self.count = 0
        self._sum: Tensor | None = None  # float64 D
        self._sumsq: Tensor | None = None
        self._max_abs: Tensor | None = None
        self._reservoir: Tensor | None = None  # float32 R x D
        self._generator = torch.Generator().manual_seed(seed)
        self._frozen: dict[str, Any] | None = None

    @property
    def dims(self) -> int:
        if self._frozen is not None:
            return int(self._frozen["dims"])
        return 0 if self._sum is None else self._sum.numel()

    @property
    def capacity(self) -> int:
        """How many vectors the quantile sample holds."""
        return max(1, self.reservoir_elements // max(self.dims, 1))

    def update(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Fold in an output ``x`` (see :func:`feature_rows` for layouts and ``mask``)."""
        if self._frozen is not None:
            raise FrozenStatsError("statistics read from JSON cannot take more data; start a new TargetStats")
        rows = feature_rows(x.detach(), mask)
        if self._sum is None:
            dims = rows.shape[-1]
            self._sum, self._sumsq = torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dtype=torch.float64)
            self._max_abs = torch.zeros(dims, dtype=torch.float64)
        assert self._sumsq is not None and self._max_abs is not None
        if rows.shape[-1] != self._sum.numel():
            raise ValueError(f"output width changed from {self._sum.numel()} to {rows.shape[-1]}")
        for chunk in rows.split(max(1, CHUNK_ELEMENTS // rows.shape[-1])):  # bounds the float64 copy
            wide = chunk.double()
            self._sum += wide.sum(0).cpu()
            self._sumsq += wide.square().sum(0).cpu()
            self._max_abs = torch.maximum(self._max_abs, wide.abs().amax(0).cpu())
            self._sample(chunk)
            self.count += len(chunk)

    def _sample(self, rows: Tensor) -> None:
        """Algorithm R over the stream of rows: row ``g`` (0-based) replaces a random slot with chance ``R/(g+1)``."""
        capacity = self.capacity
        held = 0 if self._reservoir is None else len(self._reservoir)
        fill = min(capacity - held, len(rows))
        if fill > 0:
            head = rows[:fill].to("cpu", torch.float32, copy=True)  # a copy: the sample is written into later
            self._reservoir = head if self._reservoir is None else torch.cat([self._reservoir, head])
        rest = len(rows) - fill
        if rest <= 0:
            return
        assert self._reservoir is not None
        seen = self.count + fill + torch.arange(rest, dtype=torch.float64)  # rows before each remaining one
        slot = (torch.rand(rest, generator=self._generator, dtype=torch.float64) * (seen + 1)).long()
        chosen = (slot < capacity).nonzero().squeeze(1)
        if len(chosen) == 0:
            return
        last = torch.full((capacity,), -1, dtype=torch.long)  # of rows drawing one slot, the latest wins
        last.scatter_reduce_(0, slot[chosen], chosen, "amax")
        slots = (last >= 0).nonzero().squeeze(1)
        self._reservoir[slots] = rows[fill + last[slots].to(rows.device)].float().cpu()

    @property
    def mean(self) -> Tensor:
        """Per-dimension mean (float32 ``D``)."""
        if self._frozen is not None:
            return torch.tensor(self._frozen["mean"], dtype=torch.float32)
        return (self._moments()[0]).float()

    @property
    def std(self) -> Tensor:
        """Per-dimension population standard deviation (float32 ``D``)."""
        if self._frozen is not None:
            return torch.tensor(self._frozen["std"], dtype=torch.float32)
        mean, meansq = self._moments()
        return (meansq - mean.square()).clamp_min(0).sqrt().float()

    def _moments(self) -> tuple[Tensor, Tensor]:
        if self._sum is None or self._sumsq is None or self.count == 0:
            raise ValueError("no data: call update() first")
        return self._sum / self.count, self._sumsq / self.count

    def quantiles(self) -> dict[str, list[float]]:
        """Per-dimension quantiles by level (keys like ``"0.01"``)."""
        if self._frozen is not None:
            return dict(self._frozen["quantiles"])
        if self._reservoir is None:
            raise ValueError("no data: call update() first")
        values = np.quantile(self._reservoir.double().numpy(), self.quantile_levels, axis=0)
        return {_level(q): row.tolist() for q, row in zip(self.quantile_levels, values, strict=True)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (see :meth:`from_dict`)."""
        if self._frozen is not None:
            return dict(self._frozen)
        mean, meansq = self._moments()
        energy = float(meansq.sum())
        assert self._max_abs is not None and self._reservoir is not None
        return {
            "count": self.count,
            "dims": self.dims,
            "mean": mean.tolist(),
            "std": self.std.double().tolist(),
            "max_abs": self._max_abs.tolist(),
            "quantiles": self.quantiles(),
            "quantiles_exact": self.count <= len(self._reservoir),
            "quantile_sample": len(self._reservoir),
            "mean_square": energy / self.dims,
            "energy_in_mean": float(mean.square().sum()) / energy if energy > 0 else 0.0,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetStats:
        """The summary :meth:`to_dict` wrote; it answers every query but takes no more data."""
        stats = cls(quantiles=[float(q) for q in data["quantiles"]])
        stats.count = int(data["count"])
        stats._frozen = dict(data)
        return stats


def _level(q: float) -> str:
    return f"{q:g}"


class TeacherStats:
    """:class:`TargetStats` for every float output of a teacher (masks, integer and scalar outputs are skipped)."""

    def __init__(self, quantiles: Sequence[float] = QUANTILES, reservoir_elements: int = RESERVOIR_ELEMENTS) -> None:
        self.quantile_levels = tuple(quantiles)
        self.reservoir_elements = reservoir_elements
        self.keys: dict[str, TargetStats] = {}

    def update(self, outputs: Mapping[str, Any]) -> None:
        """Fold in one batch's outputs; ``<key>_mask`` entries select the valid positions of ``<key>``."""
        for key, value in outputs.items():
            if not _is_target(key, value):
                continue
            mask = outputs.get(key.removesuffix(TOPV) + MASK_SUFFIX)  # cached top-k values share their logits' mask
            if key not in self.keys:
                self.keys[key] = TargetStats(self.quantile_levels, self.reservoir_elements)
            self.keys[key].update(torch.as_tensor(value), None if mask is None else torch.as_tensor(mask))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {key: stats.to_dict() for key, stats in self.keys.items() if stats.count}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> TeacherStats:
        stats = cls()
        stats.keys = {key: TargetStats.from_dict(value) for key, value in data.items()}
        return stats

    def table(self) -> str:
        """One line per key: dims, mean square, energy share of the mean, std range, largest ``|x|``, count."""
        header = f"{'key':<28} {'dims':>6} {'mean sq':>9} {'in mean':>8} {'std min':>8} {'std max':>8} " \
                 f"{'max |x|':>8} {'vectors':>10}"
        lines = [header, "-" * len(header)]
        for key, stats in sorted(self.to_dict().items()):
            lines.append(f"{key:<28} {stats['dims']:>6} {stats['mean_square']:>9.4g} {stats['energy_in_mean']:>8.1%} "
                         f"{min(stats['std']):>8.3g} {max(stats['std']):>8.3g} {max(stats['max_abs']):>8.3g} "
                         f"{stats['count']:>10}")
        return "\n".join(lines)


def _is_target(key: str, value: Any) -> bool:
    if key.endswith(MASK_SUFFIX):
        return False
    dtype = value.dtype
    floating = dtype.is_floating_point if isinstance(value, Tensor) else np.issubdtype(dtype, np.floating)
    return bool(floating) and value.ndim > 0


def load_stats(path: str | Path) -> dict[str, TargetStats]:
    """Statistics by output key from ``xmodal stats --out`` JSON or a cache's ``manifest.json`` (their ``stats``)."""
    path = Path(path)
    data = json.loads(path.read_text())
    if "stats" not in data:
        raise KeyError(f"{path} holds no teacher statistics (no 'stats' entry); write them with `xmodal stats` "
                       "or a recent `xmodal cache`")
    return TeacherStats.from_dict(data["stats"]).keys

"""Exact mid-epoch resume of WebDataset training streams.

What we chose, and why: a WebDataset pipeline is deterministic given its seed and epoch (the shard order comes
from ``detshuffle(seed + epoch)``, the sample buffer shuffle is re-seeded every epoch, and shards are split by
node and worker). So the position in the stream is fully described by *the epoch* and *how many raw samples
each data-loader worker has handed to training so far* (decoded or skipped as corrupt). We record exactly
that, in the :class:`~xmodal.data.wds.WdsDataModule` entry of the checkpoint, gathered from every rank; on
resume each worker drops that many samples right after the sample shuffle, before any decoding, and the epoch
goes on where it stopped: no sample is seen twice or skipped. The shard shuffle is set to the saved epoch, and
the loader's round robin over workers (a fresh ``DataLoader`` always starts at worker 0) continues with the
worker whose turn it was (:func:`in_turn`), so batches also come in the same order.

Counting happens in :meth:`WdsDataModule.on_before_batch_transfer`, i.e. when a batch actually reaches the
training step, not when the loader yields it: Lightning prefetches one batch ahead, and a prefetched batch that
was never trained on must not count as consumed.

Device-side augmentation (and dropout) draw from torch's global RNG, which Lightning does not checkpoint: the
DataModule saves each rank's torch (and CUDA) RNG state with the position and puts it back just before the first
batch after the resume is augmented, so an augmented run resumes bit for bit too.

Lightning's own stateful-loader path (``DataLoader.state_dict``) is not used, because Lightning restores it only
when it considers the run "restarting" and saves only rank 0's state; the DataModule's ``state_dict`` is always
restored, before ``train_dataloader()`` is called. Limits: resuming needs the same shards, batch size, seed,
world size and ``num_workers``; a different world size or worker count restarts the interrupted epoch (with a
warning) instead of resuming it exactly.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from xmodal.contracts import Batch

log = logging.getLogger(__name__)
WORKER = "__worker__"

# {"epoch", "batches": trained on in the epoch, "consumed": {worker id: raw samples}, "workers": num_workers}
Position = dict[str, Any]


def worker_id() -> int:
    """The current data-loader worker's id, 0 in the main process."""
    info = get_worker_info()
    return info.id if info is not None else 0


def tag_worker(batches: Iterator[Batch]) -> Iterator[Batch]:
    """Pipeline stage: mark every batch with the id of the worker that built it (``__worker__``)."""
    wid = worker_id()
    for batch in batches:
        batch[WORKER] = wid
        yield batch


class SkipConsumed:
    """Pipeline stage placed after the sample shuffle: on a resumed epoch, drop what each worker already delivered.

    ``skip`` maps a worker id to a number of raw samples. A worker pops its entry the first time it runs, so only
    the resumed epoch is shortened; with persistent workers each worker holds its own copy of this stage.
    """

    def __init__(self) -> None:
        self.skip: dict[int, int] = {}

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        count = self.skip.pop(worker_id(), 0)
        if count:
            log.info("resuming: worker %d skips %d samples already trained on", worker_id(), count)
        return itertools.islice(samples, count, None)


def find_stage(pipeline: Any, kind: type) -> Any:
    """The first stage of ``kind`` in a ``wds.DataPipeline``, or ``None``."""
    return next((stage for stage in getattr(pipeline, "pipeline", []) if isinstance(stage, kind)), None)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a WebDataset training pipeline that knows its position in the current epoch.

    The DataModule reports each batch that reaches training through :meth:`mark_consumed`; :meth:`position`
    summarises the epoch and per-worker sample counts, and :meth:`resume_from` (called before the first
    iteration) makes the next epoch start there.
    """

    def __init__(self, dataset: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.epoch = -1
        self.consumed: dict[int, int] = {}
        self.yielded = 0
        self.taken = 0
        self.exhausted = False
        self._resume: Position | None = None

    def resume_from(self, position: Position) -> None:
        """Start the next iteration at ``position`` (from :meth:`position` of an interrupted run)."""
        self._resume = {"epoch": int(position["epoch"]), "batches": int(position.get("batches", 0)),
                        "consumed": {int(k): int(v) for k, v in position["consumed"].items()}}

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        resume, self._resume = self._resume, None
        self.epoch = resume["epoch"] if resume is not None else self.epoch + 1
        if resume is not None:
            self._seek(resume)
        self.consumed, self.yielded, self.taken, self.exhausted = {}, 0, 0, False
        if resume is not None:
            self.consumed, self.taken = dict(resume["consumed"]), resume["batches"]
            self.yielded = self.taken
        iterator: Iterator[Any] = super().__iter__()
        skip = find_stage(self.dataset, SkipConsumed)
        if skip is not None and self.num_workers > 0:
            skip.skip = {}  # the workers hold their copies now; never skip again from here
        if self.num_workers > 1 and self.taken % self.num_workers:
            iterator = in_turn(iterator, self.taken % self.num_workers, self.num_workers)
        return self._count(iterator)

    def _seek(self, resume: Position) -> None:
        shard_shuffle = find_stage(self.dataset, wds.detshuffle)
        if shard_shuffle is not None:
            shard_shuffle.epoch = resume["epoch"] - 1  # detshuffle increments before drawing the order
        skip = find_stage(self.dataset, SkipConsumed)
        if skip is None:
            raise TypeError("this pipeline has no SkipConsumed stage; build it with make_pipeline(train=True)")
        skip.skip = dict(resume["consumed"])

    def _count(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self.yielded += 1
            yield batch
        self.exhausted = True

    def mark_consumed(self, worker: int, raw_samples: int) -> None:
        """Record that a batch built by ``worker`` from ``raw_samples`` stream samples reached training."""
        self.consumed[worker] = self.consumed.get(worker, 0) + raw_samples
        self.taken += 1

    def position(self) -> Position:
        """Where training stands in the stream; a finished epoch points at the start of the next one."""
        if self.exhausted and self.taken >= self.yielded:
            return {"epoch": self.epoch + 1, "batches": 0, "consumed": {}, "workers": self.num_workers}
        return {"epoch": max(self.epoch, 0), "batches": self.taken, "consumed": dict(self.consumed),
                "workers": self.num_workers}


def in_turn(batches: Iterator[Batch], first: int, workers: int) -> Iterator[Batch]:
    """Reorder batches as if the loader's round robin over ``workers`` had started at worker ``first``.

    A fresh ``DataLoader`` always starts its round robin at worker 0; an epoch interrupted after an odd number of
    batches (with two workers) must go on with worker 1. Batches that arrive early wait in a per-worker queue; a
    worker that has run dry is skipped once the source is exhausted, as the ``DataLoader`` itself does.
    """
    queues: dict[int, deque[Batch]] = {w: deque() for w in range(workers)}
    turn = first
    for batch in batches:
        queues[int(batch.get(WORKER, 0))].append(batch)
        while queues[turn]:
            yield queues[turn].popleft()
            turn = (turn + 1) % workers
    while any(queues.values()):
        if queues[turn]:
            yield queues[turn].popleft()
        turn = (turn + 1) % workers


def rng_state() -> dict[str, Any]:
    """The global torch RNG state (and the current CUDA device's, when CUDA is in use)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_positions(position: Position) -> list[Position]:
    """Every rank's position, indexed by global rank (collective under ``torch.distributed``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [position]
    positions: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(positions, position)
    return positions


def position_for_rank(positions: list[Position], rank: int, world_size: int) -> Position | None:
    """This rank's saved position, or ``None`` (with a warning) when the world size changed."""
    if len(positions) != world_size:
        log.warning("checkpoint stream positions are for %d processes, this run has %d: the interrupted epoch "
                    "restarts from its beginning instead of resuming exactly", len(positions), world_size)
        return None
    return positions[rank]

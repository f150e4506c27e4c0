"""WebDataset streaming for training: shards split by node and worker, decode in workers, compact batches.

Workers only decode and collate (uint8 pixels, int16 audio, float16 cached outputs). Batches travel pinned
and non-blocking; :meth:`WdsDataModule.on_after_batch_transfer` then runs each modality's device-side
transform (float conversion, augmentation), so the same code feeds a GPU from few cores and runs on a CPU.
Corrupt samples are skipped and counted; the :class:`~xmodal.distiller.Distiller` logs the count per epoch.
The training stream's position (epoch + samples consumed per worker and rank) is saved in checkpoints, so a run
resumed mid-epoch sees no sample twice and skips none (see :mod:`xmodal.data.resume`).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any, Literal, NamedTuple

import braceexpand
import lightning as L
import torch
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

from xmodal.contracts import Batch, Modality
from xmodal.data.decoders import collate_items, decode_or_skip
from xmodal.data.resume import (
    WORKER,
    ResumableLoader,
    SkipConsumed,
    gather_positions,
    position_for_rank,
    rng_state,
    set_rng_state,
    tag_worker,
)

log = logging.getLogger(__name__)
SKIPPED = "__skipped__"
FAILED = "__failed_shards__"
META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, never sample fields
REMOTE = re.compile(r"^(pipe:|https?://|s3://|gs://)")

Shards = str | Sequence[str]


def expand_shards(shards: Shards) -> list[str]:
    """Brace-expand and glob shard patterns; raise naming the pattern when a local one matches nothing."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if REMOTE.match(url):
                urls.append(url)
                continue
            matches = sorted(glob.glob(url))
            if not matches:
                raise FileNotFoundError(f"shard pattern {pattern!r} matches no file ({url!r} is missing)")
            urls.extend(matches)
    return urls


class SampleBatcher:
    """Pipeline stage run in each worker: decode samples, skip and count failures, emit collated batches.

    Every batch carries ``__skipped__``: how many samples this worker skipped since its previous batch, and
    ``__failed_shards__``: the :class:`FailedShard` records this worker met since its previous batch.
    """

    def __init__(
        self, modalities: Sequence[Modality], batch_size: int, drop_last: bool, labelled_flag: str | None = None,
    ) -> None:
        self.modalities = list(modalities)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.labelled_flag = labelled_flag

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[Batch]:
        items: list[dict[str, Any]] = []
        skipped = 0
        failed: list[FailedShard] = []
        pending: Batch | None = None  # held back one step so skips at the end still reach a batch
        for sample in samples:
            if FAILED in sample:
                failed.append(sample[FAILED])
                continue
            item = decode_or_skip(sample, self.modalities, self.labelled_flag)
            if item is None:
                skipped += 1
            else:
                items.append(item)
            if len(items) == self.batch_size:
                if pending is not None:
                    yield pending
                pending = self._emit(items, skipped, failed)
                items, skipped, failed = [], 0, []
        if items and not self.drop_last:
            if pending is not None:
                yield pending
            pending, skipped, failed = self._emit(items, skipped, failed), 0, []
        if pending is not None:
            pending[SKIPPED] += skipped
            pending[FAILED] += failed
            yield pending
        elif skipped or failed:  # no batch left to carry them: at least say so in this worker
            log.error("this loader worker delivered no batch; %d samples skipped, failed shards: %s", skipped,
                      "; ".join(map(str, failed)) or "none")

    def _emit(self, items: list[dict[str, Any]], skipped: int, failed: list[FailedShard]) -> Batch:
        batch = collate_items(items, self.modalities)
        batch[SKIPPED] = skipped
        batch[FAILED] = list(failed)
        return batch


def count_tar_errors(exn: Exception) -> bool:
    log.warning("skipping unreadable shard member: %s", exn)
    return True


class FailedShard(NamedTuple):
    """A shard whose reading stopped early: the rest of it (from ``offset``) was lost."""

    url: str
    offset: int  # byte offset of the tar header (or member) where reading failed
    samples: int  # samples read from the shard before the failure (the last may be partial, then skipped)
    error: str

    def __str__(self) -> str:
        return f"{self.url} at byte {self.offset} after {self.samples} samples ({self.error})"


class CountingReader:
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data


def tar_members(url: str, failure: list[FailedShard]) -> Iterator[dict[str, Any]]:
    """The regular files of one tar shard as ``{"fname", "data", "__url__"}``; a read failure ends the shard and is
    appended to ``failure`` instead of being raised.

    Truncation inside a header is no error to ``tarfile`` (it ends the archive quietly), so the end-of-archive
    block must be present too.
    """
    offset, keys = 0, set()
    try:
        with gopen(url) as raw:
            stream = CountingReader(raw)
            with tarfile.open(fileobj=stream, mode="r|*") as tar:  # type: ignore[call-overload]
                for info in tar:
                    offset = info.offset
                    if info.isreg() and not META.match(info.name):
                        data = tar.extractfile(info).read()  # type: ignore[union-attr]
                        keys.add(info.name.split(".", 1)[0])
                        yield {"fname": info.name, "data": data, "__url__": url}
                    tar.members = []  # stream mode: keep no member list
                    offset = tar.offset
                size = stream.count + len(stream.read())
                if tar.offset + tarfile.BLOCKSIZE > size:
                    raise tarfile.ReadError(f"truncated: no end-of-archive block ({size} bytes)")
    except Exception as error:
        failed = FailedShard(url, offset, len(keys), f"{type(error).__name__}: {error}")
        log.warning("shard read failed, rest of the shard lost: %s", failed)
        failure.append(failed)


def read_shards(sources: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pipeline stage: shard URLs -> samples; a shard that fails mid-way yields ``{FAILED: FailedShard}`` after the
    samples read before the failure, and reading goes on with the next shard."""
    for source in sources:
        failure: list[FailedShard] = []
        yield from group_by_keys(tar_members(source["url"], failure), handler=count_tar_errors)
        for failed in failure:
            yield {FAILED: failed}


def make_pipeline(
    shards: Shards, modalities: Sequence[Modality], batch_size: int, *, train: bool, shuffle_buffer: int = 1000,
    drop_last: bool = False, seed: int = 0, labelled_flag: str | None = None,
) -> wds.DataPipeline:
    """The WebDataset pipeline: shard list -> node split -> worker split -> tar samples -> (shuffle) -> batches.

    Training pipelines also carry the resume machinery: a :class:`~xmodal.data.resume.SkipConsumed` stage after the
    shuffle and a ``__worker__`` tag on every batch.
    """
    stages: list[Any] = [wds.SimpleShardList(expand_shards(shards))]
    if train:
        stages.append(wds.detshuffle(bufsize=100, initial=10, seed=seed))
    stages += [wds.split_by_node, wds.split_by_worker, read_shards]
    if train and shuffle_buffer > 1:
        # seeded: webdataset's default seeds from pid and clock, which makes runs with the same seed differ
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
    if train:
        stages.append(SkipConsumed())
    stages.append(SampleBatcher(modalities, batch_size, drop_last, labelled_flag))
    if train:
        stages.append(tag_worker)
    return wds.DataPipeline(*stages)


def auto_workers(max_workers: int = 8) -> int:
    """Loader workers for this process: its CPU cores shared among the processes on this node, less one, 1..max.

    Under DDP every local rank runs its own loader, so the cores are divided by ``LOCAL_WORLD_SIZE`` (set by
    torchrun and SLURM launches; Lightning's own launcher spawns the other ranks later, and they read it then).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(max_workers, cores // local_processes - 1))


class WdsDataModule(L.LightningDataModule):
    """Shard URL patterns per split, decoded by the given modality plug-ins.

    Args:
        modalities: the plug-ins that decode, collate and prepare the fields (e.g. image + text).
        train, val, test, predict: shard patterns (brace/glob) or lists of them; ``None`` disables a split.
        batch_size: samples per batch (per process).
        num_workers: data-loader worker processes; shards are split across them and across nodes. ``"auto"``: one
            per CPU core this process may use, less one for the training loop, at most 8 (:func:`auto_workers`).
        shuffle_buffer: sample shuffle buffer in training.
        pin_memory: pin host batches when training on CUDA.
        seed: shard- and sample-order shuffling seed; ``None`` follows Lightning's ``seed_everything``.
        labelled_flag: semi-supervised training on a low-label subset: a training sample keeps its label only when
            its ``json`` has this flag true (e.g. ``labelled_10pct`` of ``xmodal data make fashion-mnist``); the
            others get label ``-100``, which the label losses ignore, while distillation terms use every sample.
            Validation and test keep every label.
    """

    def __init__(
        self,
        modalities: list[Modality],
        train: Shards | None = None,
        val: Shards | None = None,
        test: Shards | None = None,
        predict: Shards | None = None,
        batch_size: int = 64,
        num_workers: int | Literal["auto"] = 0,
        shuffle_buffer: int = 1000,
        pin_memory: bool = True,
        seed: int | None = None,
        labelled_flag: str | None = None,
    ) -> None:
        super().__init__()
        self.modalities = modalities
        self.labelled_flag = labelled_flag
        self.shards = {"train": train, "val": val, "test": test, "predict": predict}
        self.batch_size = batch_size
        self.num_workers = auto_workers() if num_workers == "auto" else int(num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.pin_memory = pin_memory
        self.seed = seed
        self.skipped_samples = 0  # since the last epoch's log (the Distiller resets it)
        self.tally = LossTally()  # the whole run's, printed at the end of fit
        self.train_loader: ResumableLoader | None = None
        self._resume_positions: list[dict[str, Any]] | None = None
        self._resume_rng: dict[str, Any] | None = None
        for pattern in self.shards.values():
            if pattern is not None:
                expand_shards(pattern)  # fail at configuration time, not after the first epoch

    def _loader(self, split: str) -> DataLoader:
        pattern = self.shards[split]
        if pattern is None:
            raise ValueError(f"no shards configured for the {split!r} split (data.init_args.{split})")
        train = split == "train"
        pipeline = make_pipeline(pattern, self.modalities, self.batch_size, train=train,
                                 shuffle_buffer=self.shuffle_buffer, drop_last=train, seed=self.data_seed(),
                                 labelled_flag=self.labelled_flag if train else None)
        loader_type = ResumableLoader if train else DataLoader
        loader = loader_type(
            pipeline, batch_size=None, num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0 and train,
            generator=None if train else self.evaluation_generator(),
        )
        if isinstance(loader, ResumableLoader):
            self.train_loader = loader
            self._apply_resume(loader)
        return loader

    def state_dict(self) -> dict[str, Any]:
        """Every rank's stream position and RNG state (a collective under DDP, where all ranks save checkpoints)."""
        if self.train_loader is None:
            return {}
        position = {**self.train_loader.position(), "rng": rng_state(), **self.data_identity()}
        return {"train_positions": gather_positions(position)}

    def data_identity(self) -> dict[str, Any]:
        """What a stream position is valid for: the data seed and a digest of the training shards' names and sizes."""
        digest = hashlib.sha256()
        for path in sorted(expand_shards(self.shards["train"] or [])):
            size = os.path.getsize(path) if os.path.exists(path) else -1
            digest.update(f"{path}\t{size}\n".encode())
        return {"data_seed": self.data_seed(), "shards_sha256": digest.hexdigest()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_positions = state_dict.get("train_positions")

    def _apply_resume(self, loader: ResumableLoader) -> None:
        positions, self._resume_positions = self._resume_positions, None
        if not positions:
            return
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        position = position_for_rank(positions, rank, world)
        if position is None:
            return
        self._resume_rng = position.get("rng")
        changed = [f"{key} {position[key]!r} -> {value!r}" for key, value in self.data_identity().items()
                   if key in position and position[key] != value]
        if changed:
            log.warning("the training data changed since the checkpoint (%s): the interrupted epoch restarts from its "
                        "beginning", "; ".join(changed))
            position = {"epoch": position["epoch"], "consumed": {}}
        elif position.get("workers", self.num_workers) != self.num_workers:
            log.warning("checkpoint stream position is for num_workers=%s, this run has %d: the interrupted epoch "
                        "restarts from its beginning", position.get("workers"), self.num_workers)
            position = {"epoch": position["epoch"], "consumed": {}}
        loader.resume_from(position)

    def evaluation_generator(self) -> torch.Generator:
        """The RNG of an evaluation loader: every new iterator of a ``DataLoader`` draws its workers' base seed from
        its generator, by default torch's global RNG. Validation passes between training steps would then shift
        everything training draws later (dropout, augmentation, the next epoch's worker seeds); with a generator
        of their own, a run with validation trains exactly as one without."""
        return torch.Generator().manual_seed(self.data_seed())

    def data_seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def setup(self, stage: str) -> None:
        # No val split: fit runs no validation loop, where the empty loader list would have Lightning set one up and
        # warn "Total length of `list` across ranks is zero" on every run.
        if stage == "fit" and self.shards["val"] is None and self.trainer is not None:
            self.trainer.limit_val_batches = 0

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.shards["val"] is None else self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return move_batch(batch, device)

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        skipped = int(batch.pop(SKIPPED, 0))
        failed: list[FailedShard] = batch.pop(FAILED, [])
        worker = batch.pop(WORKER, None)
        training = self.trainer is None or self.trainer.training
        if training:  # evaluation skips are warned about, not counted here
            self.skipped_samples += skipped
            self.tally.add(skipped, failed)
        if training and worker is not None and self.train_loader is not None:
            # each failed-shard record went through SkipConsumed as one stream element
            self.train_loader.mark_consumed(int(worker), len(batch.get("__key__", ())) + skipped + len(failed))
        return batch

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            print_rank_zero(f"training data: {self.tally.summary()}")

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        train = self.trainer is not None and self.trainer.training
        if train and self._resume_rng is not None:  # resumed run: augment as the interrupted run would have
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        return prepare_on_device(batch, self.modalities, train)


@rank_zero_only
def print_rank_zero(text: str) -> None:
    print(text, flush=True)  # printed, not logged: the totals must show with `logger: false` too


class LossTally:
    """Samples skipped as corrupt and shards that failed mid-way, summed over batches."""

    def __init__(self) -> None:
        self.skipped = 0
        self.failed: list[FailedShard] = []

    def add(self, skipped: int, failed: Sequence[FailedShard]) -> None:
        self.skipped += skipped
        self.failed.extend(FailedShard(*f) for f in failed)  # tuples after the worker -> main process trip

    def take(self, batch: Batch) -> Batch:
        """Count and remove a batch's ``__skipped__`` and ``__failed_shards__``."""
        self.add(int(batch.pop(SKIPPED, 0)), batch.pop(FAILED, []))
        return batch

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.skipped, "failed_shards": [f._asdict() for f in self.failed]}

    def summary(self) -> str:
        text = f"{self.skipped} samples skipped as corrupt, {len(self.failed)} shards failed mid-way"
        return text + "".join(f"\n  failed shard: {f}" for f in self.failed)


class CountedBatches:
    """The batches of an evaluation loader with their skip counts taken off into ``tally`` (the last pass's).

    Raises ``ValueError`` naming the pattern when the shards yield no sample, before any metric is computed on
    nothing.
    """

    def __init__(self, loader: Iterable[Batch], pattern: Shards) -> None:
        self.loader = loader
        self.pattern = pattern
        self.tally = LossTally()

    def __iter__(self) -> Iterator[Batch]:
        self.tally, samples = LossTally(), 0  # a fresh count per pass
        for batch in self.loader:
            batch = self.tally.take(batch)
            samples += len(batch["__key__"])
            yield batch
        if samples == 0:
            raise ValueError(f"shards {self.pattern!r} yielded no sample ({self.tally.skipped} skipped as corrupt, "
                             f"{len(self.tally.failed)} shards unreadable; see the warnings above)")


def move_batch(batch: Batch, device: torch.device | str) -> Batch:
    """Move a flat batch's tensors to ``device``; strings and lists stay as they are.

    Lightning's generic transfer walks every element of the key and caption lists at every step (a few ms per
    step, measured); a flat dict needs one pass over its values.
    """
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def prepare_on_device(batch: Batch, modalities: Sequence[Modality], train: bool) -> Batch:
    """Run each modality's device-side transform (after the host-to-device copy)."""
    for modality in modalities:
        batch = modality.on_device(batch, train)
    return batch

"""Scaling through Lightning: DDP on CPU (gloo), gradient accumulation, exact mid-epoch resume, bf16.

The DDP test forks two CPU processes (``strategy="ddp_fork"``: the same ``DDPStrategy`` and gloo backend as
``strategy: ddp`` under ``torchrun``, launched by forking this already-initialised interpreter, which keeps the
test fast). Each rank writes what it saw to a JSON file that the parent checks.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from tests.conftest import tiny_clip_args
from xmodal.callbacks import ExportStudent
from xmodal.data.resume import WORKER
from xmodal.data.shards import shard_pattern, write_shards
from xmodal.data.wds import WdsDataModule, expand_shards
from xmodal.distiller import Distiller
from xmodal.losses import CLIPContrastiveLoss
from xmodal.modalities.image import ImageModality
from xmodal.modalities.text import TextModality
from xmodal.students.clip import CLIPStudent

N_SHARDS, PER_SHARD = 4, 6


def png_bytes(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def key_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four shards of six image/caption samples; key ``s<shard>_<index>`` tells where a sample came from."""
    samples = ({"__key__": f"s{i // PER_SHARD}_{i % PER_SHARD}", "png": png_bytes(i), "txt": f"a red circle {i}"}
               for i in range(N_SHARDS * PER_SHARD))
    return shard_pattern(write_shards(samples, tmp_path_factory.mktemp("keyed"), "train", PER_SHARD))


def all_keys() -> set[str]:
    return {f"s{i // PER_SHARD}_{i % PER_SHARD}" for i in range(N_SHARDS * PER_SHARD)}


class KeyedData(WdsDataModule):
    """Records, before the stream bookkeeping pops it, which worker built each training batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, list[str]]] = []

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if self.trainer is not None and self.trainer.training:
            self.seen.append((int(batch.get(WORKER, -1)), list(batch["__key__"])))
        return super().on_before_batch_transfer(batch, dataloader_idx)


def keyed_data(pattern: str | list[str], augment: bool = False, **kwargs: Any) -> KeyedData:
    kwargs = {"batch_size": 3, "shuffle_buffer": 4, "seed": 0, **kwargs}
    image = ImageModality(16, crop_scale=0.5, flip=True) if augment else ImageModality(16)
    return KeyedData([image, TextModality()], train=pattern, **kwargs)


def tiny_clip(shapes_dir: Path) -> Distiller:
    torch.manual_seed(0)
    return Distiller(CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer")), [CLIPContrastiveLoss()],
                     scheduler="constant")


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def log_write(log: Path, what: str) -> None:
    with log.open("a") as f:
        f.write(f"{what} {rank()}\n")


class RankReport(L.Callback):
    """Per rank: local and all-reduced loss of every step, data seen, and a checksum of the final weights."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.local: list[float] = []
        self.reduced: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"].detach()
        self.local.append(float(loss))
        self.reduced.append(float(trainer.strategy.reduce(loss.clone(), reduce_op="mean")))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        assert isinstance(datamodule, KeyedData)
        checksum = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
        report = {"rank": trainer.global_rank, "world": trainer.world_size, "local": self.local,
                  "reduced": self.reduced, "seen": datamodule.seen, "checksum": checksum}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def test_ddp_two_cpu_processes(shapes_dir: Path, key_shards: str, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    import xmodal.zoo

    writes = tmp_path / "writes.log"
    save_pretrained, save_checkpoint = xmodal.zoo.save_pretrained, TorchCheckpointIO.save_checkpoint

    def zoo_write(*args: Any, **kwargs: Any) -> Any:
        log_write(writes, "zoo")
        return save_pretrained(*args, **kwargs)

    def ckpt_write(self: TorchCheckpointIO, *args: Any, **kwargs: Any) -> None:
        log_write(writes, "ckpt")
        save_checkpoint(self, *args, **kwargs)

    monkeypatch.setattr(xmodal.zoo, "save_pretrained", zoo_write)
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", ckpt_write)
    data = keyed_data(key_shards, num_workers=2)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[checkpoints, ExportStudent(str(tmp_path / "zoo")), RankReport(tmp_path)],
    )
    trainer.fit(tiny_clip(shapes_dir), datamodule=data)

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in reports] == [2, 2]
    # split by node and by worker: every shard goes to exactly one (rank, worker), and each sample is seen once
    owners: dict[str, set[tuple[int, int]]] = {}
    keys = [[key for _, batch in r["seen"] for key in batch] for r in reports]
    for r in reports:
        for worker, batch in r["seen"]:
            for key in batch:
                owners.setdefault(key.split("_")[0], set()).add((r["rank"], worker))
    assert all(len(owner) == 1 for owner in owners.values()) and len(owners) == N_SHARDS
    assert {owner for owner_set in owners.values() for owner in owner_set} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(all_keys())
    # the loss agrees across ranks after all-reduce, and is the mean of the two local losses
    assert len(reports[0]["local"]) == len(reports[1]["local"]) == 4
    np.testing.assert_allclose(reports[0]["reduced"], reports[1]["reduced"], rtol=1e-6)
    local_mean = (np.array(reports[0]["local"]) + np.array(reports[1]["local"])) / 2
    np.testing.assert_allclose(reports[0]["reduced"], local_mean, rtol=1e-5)
    assert not np.allclose(reports[0]["local"], reports[1]["local"])  # different data, different local losses
    assert reports[0]["checksum"] == pytest.approx(reports[1]["checksum"], rel=1e-6)  # gradients were all-reduced
    # only rank 0 writes checkpoints and zoo entries
    lines = [line.split() for line in writes.read_text().splitlines()]
    assert {rank for _, rank in lines} == {"0"}
    assert [what for what, _ in lines].count("zoo") == 1 and [what for what, _ in lines].count("ckpt") >= 2
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    assert any((tmp_path / "zoo").iterdir())
    # the checkpoint holds every rank's position in its shard stream, for an exact resume
    positions = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)["KeyedData"]
    for position in positions["train_positions"]:
        assert position.pop("rng")["torch"].dtype == torch.uint8
        assert position.pop("data_seed") == 0 and len(position.pop("shards_sha256")) == 64  # what the data was
    assert positions["train_positions"] == [{"epoch": 0, "batches": 2, "consumed": {0: 3, 1: 3}, "workers": 2}] * 2


# ---------------------------------------------------------------- gradient accumulation


class TinyNet(nn.Module):
    """A two-layer model on ``batch["x"]`` (``B x 8``) with feature and logit outputs."""

    output_keys = ("x.feat", "x.logits")

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body, self.head = nn.Linear(8, 6), nn.Linear(6, 5)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        feat = torch.tanh(self.body(batch["x"]))
        return {"x.feat": feat, "x.logits": self.head(feat)}


class TinyTeacher(TinyNet):
    def manifest(self) -> dict[str, Any]:
        return {"name": "tiny"}


class GradCapture(L.Callback):
    def __init__(self) -> None:
        self.grads: dict[str, Tensor] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def one_step_grads(losses: list[Any], batches: list[dict[str, Tensor]], accumulate: int) -> dict[str, Tensor]:
    capture = GradCapture()
    model = Distiller(TinyNet(0), losses, teacher=TinyTeacher(1))
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[capture])
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return capture.grads


def per_sample_losses() -> list[Any]:
    from xmodal.losses import FeatureMSELoss, KLDivLoss

    return [FeatureMSELoss("x.feat", "x.feat"), KLDivLoss("x.logits", "x.logits", temperature=2.0, weight=0.5)]


def test_accumulating_two_micro_batches_equals_one_double_batch() -> None:
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    big = one_step_grads(per_sample_losses(), [{"x": x}], accumulate=1)
    accumulated = one_step_grads(per_sample_losses(), [{"x": x[:4]}, {"x": x[4:]}], accumulate=2)
    assert big.keys() == accumulated.keys() and len(big) == 4
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-7)


def test_batch_coupled_loss_warns_and_differs_under_accumulation() -> None:
    from xmodal.losses import RKDLoss

    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    big = one_step_grads([RKDLoss("x.feat", "x.feat")], [{"x": x}], accumulate=1)
    with pytest.warns(UserWarning, match=r"batch-coupled loss\(es\) \['rkd'\]"):
        accumulated = one_step_grads([RKDLoss("x.feat", "x.feat")], [{"x": x[:4]}, {"x": x[4:]}], accumulate=2)
    assert not torch.allclose(accumulated["student.body.weight"], big["student.body.weight"], rtol=1e-3)


def test_batch_coupled_losses_are_the_documented_ones() -> None:
    import xmodal.losses as losses
    from xmodal.contracts import DistillLoss

    classes = [c for c in vars(losses).values() if isinstance(c, type) and issubclass(c, DistillLoss)]
    coupled = {c.__name__ for c in classes if c.batch_coupled}
    assert coupled == {"CLIPContrastiveLoss", "AffinityMimicLoss", "DCDLoss", "CKALoss", "RKDLoss", "TRGLoss",
                       "SinkhornLoss"}
    assert not losses.SinkhornLoss("a", "b", mode="sample").batch_coupled  # one transport problem per row
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in coupled)


# ---------------------------------------------------------------- bf16


def test_student_trains_in_bf16_mixed_on_cpu() -> None:
    dtypes: list[torch.dtype] = []
    student = TinyNet(0)
    student.register_forward_hook(lambda module, args, out: dtypes.append(out["x.logits"].dtype))
    model = Distiller(student, per_sample_losses(), teacher=TinyTeacher(1))
    trainer = L.Trainer(max_steps=2, precision="bf16-mixed", accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    before = student.body.weight.detach().clone()
    trainer.fit(model, train_dataloaders=DataLoader([{"x": torch.randn(4, 8)} for _ in range(2)], batch_size=None))
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # the forward ran under bf16 autocast
    assert student.body.weight.dtype == torch.float32  # master weights stay float32
    assert not torch.equal(before, student.body.weight) and torch.isfinite(student.body.weight).all()
    assert torch.isfinite(trainer.logged_metrics["train/loss"])


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_teacher_in_bf16_halves_its_memory_and_stays_close(shapes_dir: Path, tmp_path: Path) -> None:
    from xmodal.data.wds import make_pipeline, prepare_on_device
    from xmodal.losses import FeatureMSELoss
    from xmodal.students.clip import save_open_clip_dir
    from xmodal.teachers.open_clip import OpenCLIPTeacher

    torch.manual_seed(1)
    folder = save_open_clip_dir(CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer")), tmp_path / "teacher")
    modalities = [ImageModality(16), TextModality()]
    batch = next(iter(make_pipeline(str(shapes_dir / "val-*.tar"), modalities, 8, train=False)))
    batch = prepare_on_device(batch, modalities, train=False)
    student = CLIPStudent(**tiny_clip_args(shapes_dir / "tokenizer"))
    losses = [FeatureMSELoss("image.emb", "image.emb")]
    full = Distiller(student, losses, teacher=OpenCLIPTeacher(f"local-dir:{folder}"))
    half = Distiller(student, losses, teacher=OpenCLIPTeacher(f"local-dir:{folder}"), teacher_dtype="bfloat16")
    full.on_fit_start()  # moves the teacher (and casts it)
    half.on_fit_start()
    assert isinstance(half.teacher, nn.Module) and isinstance(full.teacher, nn.Module)
    assert weight_bytes(half.teacher) * 2 == weight_bytes(full.teacher)
    assert {p.dtype for p in half.teacher.parameters()} == {torch.bfloat16}
    reference, low = full.teacher_outputs(batch), half.teacher_outputs(batch)
    assert reference is not None and low is not None and reference.keys() == low.keys()
    for key in ("image.emb", "text.emb"):
        assert low[key].dtype == torch.float32
        torch.testing.assert_close(low[key], reference[key], rtol=0.05, atol=0.03)
        assert torch.nn.functional.cosine_similarity(low[key], reference[key]).min() > 0.99
    total, _ = half.compute_losses(batch)
    total.backward()
    assert torch.isfinite(total) and student.model.visual.conv1.weight.grad is not None


# ---------------------------------------------------------------- exact resume


class Crash(RuntimeError):
    """Stands for the process being killed."""


class CrashAt(L.Callback):
    """Dies at the start of training step ``step + 1``: the checkpoint of step ``step`` is on disk, and the batch
    already fetched for the next step is lost with the process."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


def fit_keyed(shapes_dir: Path, pattern: str, root: Path, *, callbacks: list[L.Callback],
              ckpt_path: str | None = None, epochs: int = 2) -> tuple[Distiller, KeyedData]:
    model, data = tiny_clip(shapes_dir), keyed_data(pattern, augment=True, num_workers=2)  # random crops and flips
    checkpointing = any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, enable_checkpointing=checkpointing,
                        default_root_dir=root)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, data


def batches_of(data: KeyedData) -> list[list[str]]:
    return [keys for _, keys in data.seen]


@pytest.mark.parametrize("crash_step", [5, 12], ids=["odd-batch-in-epoch-0", "mid-epoch-1"])
def test_resume_mid_epoch_matches_an_uninterrupted_run(shapes_dir: Path, key_shards: str, tmp_path: Path,
                                                       crash_step: int) -> None:
    reference, reference_data = fit_keyed(shapes_dir, key_shards, tmp_path, callbacks=[])
    steps_per_epoch = N_SHARDS * PER_SHARD // 3
    assert len(reference_data.seen) == 2 * steps_per_epoch

    every = crash_step - 2  # the last checkpoint is 2 steps before the crash
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=every, save_top_k=-1)
    with pytest.raises(Crash):
        fit_keyed(shapes_dir, key_shards, tmp_path, callbacks=[checkpoints, CrashAt(crash_step)])
    last = tmp_path / f"epoch={every // steps_per_epoch}-step={every}.ckpt"
    assert last.exists(), sorted(p.name for p in tmp_path.iterdir())

    resumed, resumed_data = fit_keyed(shapes_dir, key_shards, tmp_path, callbacks=[], ckpt_path=str(last))
    # the position in the shard stream: the resumed run trains on exactly the batches the crashed run had not
    # finished, in the same order, so no sample of the interrupted epoch is seen twice or skipped
    assert batches_of(resumed_data) == batches_of(reference_data)[every:]
    epoch = every // steps_per_epoch
    seen_in_epoch = [k for b in batches_of(reference_data)[epoch * steps_per_epoch:every] + batches_of(resumed_data)
                     for k in b][: steps_per_epoch * 3]
    assert sorted(seen_in_epoch) == sorted(all_keys())
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name} differs after resuming")


# ---------------------------------------------------------------- damaged checkpoints


def fit_tiny(tmp_path: Path, max_steps: int, ckpt_path: str | None = None) -> L.Trainer:
    from xmodal.checkpoint import SafeCheckpointIO

    checkpoints = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1)  # keeps the newest
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoints], plugins=[SafeCheckpointIO()])
    batches = DataLoader([{"x": torch.randn(4, 8, generator=torch.Generator().manual_seed(i))} for i in range(4)],
                         batch_size=None)
    trainer.fit(Distiller(TinyNet(0), per_sample_losses(), teacher=TinyTeacher(1)), batches, ckpt_path=ckpt_path)
    return trainer


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fit_tiny(tmp_path, max_steps=2)
    good = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [good.name]

    def disk_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fit_tiny(tmp_path, max_steps=4, ckpt_path=str(good))
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [good.name]  # kept, and no partial file beside it
    assert torch.load(good, weights_only=False)["global_step"] == 2


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path: Path) -> None:
    from xmodal.checkpoint import CorruptCheckpointError

    fit_tiny(tmp_path, max_steps=2)
    good = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    broken = tmp_path / "ckpt" / "last.ckpt"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # copied half-way
    with pytest.raises(CorruptCheckpointError, match=r"(?s)last\.ckpt is unreadable.*truncated.*epoch=0-step=2\.ckpt"):
        fit_tiny(tmp_path, max_steps=4, ckpt_path=str(broken))
    assert broken.exists() and good.exists()  # nothing deleted
    not_a_checkpoint = tmp_path / "notes.ckpt"
    torch.save({"weights": torch.zeros(2)}, not_a_checkpoint)
    with pytest.raises(CorruptCheckpointError, match="no state_dict"):
        fit_tiny(tmp_path, max_steps=4, ckpt_path=str(not_a_checkpoint))


class BreakWeightsAt(L.Callback):
    """Sends one weight to inf after a given step, as an optimizer step with a huge learning rate would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.student.parameters()).fill_(float("inf"))


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path) -> None:
    from xmodal.checkpoint import NonFiniteWeightsError, SafeCheckpointIO

    checkpoints = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[BreakWeightsAt(3), checkpoints],
                        plugins=[SafeCheckpointIO()])
    batches = DataLoader([{"x": torch.randn(4, 8)} for _ in range(4)], batch_size=None)
    with pytest.raises(NonFiniteWeightsError, match=r"by step 3 \(student\..* holds inf or NaN\)"):
        trainer.fit(Distiller(TinyNet(0), per_sample_losses(), teacher=TinyTeacher(1)), batches)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["epoch=0-step=2.ckpt"]  # the last good one stays
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_altered_checkpoint_bytes_are_refused(tmp_path: Path) -> None:
    from xmodal.checkpoint import DIGEST_KEY, CorruptCheckpointError

    fit_tiny(tmp_path, max_steps=2)
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)
    assert len(checkpoint[DIGEST_KEY]) == 64
    name = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][name].view(-1)[0] += 1e-3  # one value altered, the digest left as it was
    altered = tmp_path / "altered.ckpt"
    torch.save(checkpoint, altered)
    with pytest.raises(CorruptCheckpointError, match=r"altered\.ckpt is unreadable.*altered bytes"):
        fit_tiny(tmp_path / "resume", max_steps=4, ckpt_path=str(altered))


def test_cli_installs_the_checked_checkpoint_io(shapes_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_distiller import write_config
    from xmodal.checkpoint import CorruptCheckpointError
    from xmodal.commands.main import main

    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not really")
    config = str(write_config(tmp_path / "ok.yaml", shapes_dir))
    with pytest.raises(CorruptCheckpointError, match="broken.ckpt is unreadable"):  # LightningCLI's own read
        main(["fit", "--config", config, "--ckpt_path", str(broken)])
    torch.save({"weights": torch.zeros(2)}, broken)
    with pytest.raises(CorruptCheckpointError, match="no state_dict"):  # the trainer's read, by SafeCheckpointIO
        main(["fit", "--config", config, "--ckpt_path", str(broken)])
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": {}, "payload": PicklePayload(str(marker))}, broken)
    with pytest.raises(CorruptCheckpointError, match="broken.ckpt is unreadable.*Unpickling"):
        main(["fit", "--config", config, "--ckpt_path", str(broken)])
    assert not marker.exists()


class PicklePayload:
    """Unpickling this runs a command: what a hostile checkpoint would carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------- the real launcher (opt-in: ~1 min)


@pytest.mark.skipif(os.environ.get("XMODAL_TORCHRUN") != "1", reason="set XMODAL_TORCHRUN=1 (starts 4 processes)")
def test_torchrun_yaml_under_ddp_resumes_exactly(shapes_dir: Path, tmp_path: Path) -> None:
    """``torchrun`` + ``xmodal fit`` + ``strategy: ddp`` (the README's command), killed-and-resumed == uninterrupted."""
    import subprocess
    import sys

    from tests.test_distiller import write_config

    config = write_config(tmp_path / "tiny.yaml", shapes_dir)

    def fit(root: str, *extra: str) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                   "xmodal.commands", "fit", "--config", str(config), "--trainer.strategy", "ddp", "--trainer.devices",
                   "2", "--trainer.max_steps", "6", "--trainer.enable_checkpointing", "true",
                   "--trainer.default_root_dir", root, "--data.num_workers", "1", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    fit("ref", "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={tmp_path / 'ref' / 'steps'}",
        "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.save_top_k=-1")
    fit("resumed", "--ckpt_path", str(tmp_path / "ref" / "steps" / "epoch=1-step=3.ckpt"))
    reference = torch.load(next((tmp_path / "ref" / "steps").glob("*step=6.ckpt")), weights_only=False)
    resumed = torch.load(next((tmp_path / "resumed").rglob("*step=6.ckpt")), weights_only=False)
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=1e-5, atol=1e-6)
    assert len(resumed["WdsDataModule"]["train_positions"]) == 2


def test_resume_with_another_worker_count_or_world_size_restarts_the_epoch(
        key_shards: str, caplog: pytest.LogCaptureFixture) -> None:
    saved = {"epoch": 1, "batches": 3, "consumed": {0: 6, 1: 3}, "workers": 2}
    data = keyed_data(key_shards, num_workers=0)
    data.load_state_dict({"train_positions": [saved]})
    with caplog.at_level("WARNING"):
        loader = data.train_dataloader()
    assert "num_workers=2, this run has 0" in caplog.text
    batches = list(loader)
    assert loader.epoch == 1 and len(batches) == N_SHARDS * PER_SHARD // 3  # the whole epoch 1, nothing skipped
    data.load_state_dict({"train_positions": [saved, saved]})  # two ranks saved, one resumes
    with caplog.at_level("WARNING"):
        data.train_dataloader()
    assert "for 2 processes, this run has 1" in caplog.text


def test_resume_after_a_data_change_warns_and_restarts_the_epoch(
        key_shards: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = keyed_data(key_shards, num_workers=0)
    identity = data.data_identity()
    saved = {"epoch": 1, "batches": 3, "consumed": {0: 9}, "workers": 0, **identity}
    data.load_state_dict({"train_positions": [saved]})
    assert len(list(data.train_dataloader())) < N_SHARDS * PER_SHARD // 3  # same data: the epoch goes on
    for changed in ({"data_seed": identity["data_seed"] + 1}, {"shards_sha256": "0" * 64}):
        data.load_state_dict({"train_positions": [{**saved, **changed}]})
        with caplog.at_level("WARNING"):
            batches = list(data.train_dataloader())
        assert f"training data changed since the checkpoint ({next(iter(changed))}" in caplog.text
        assert len(batches) == N_SHARDS * PER_SHARD // 3  # the whole epoch again, nothing seen twice or skipped
        caplog.clear()
    extra = tmp_path / "extra-000000.tar"
    extra.write_bytes(Path(sorted(expand_shards(key_shards))[0]).read_bytes())
    grown = keyed_data([key_shards, str(extra)], num_workers=0)
    assert grown.data_identity()["shards_sha256"] != identity["shards_sha256"]


def test_in_turn_continues_the_round_robin() -> None:
    from xmodal.data.resume import in_turn

    def batch(worker: int, index: int) -> dict[str, Any]:
        return {WORKER: worker, "i": index}

    # a fresh two-worker loader starts with worker 0; the interrupted epoch had to go on with worker 1,
    # and worker 0 runs dry first
    arrivals = [batch(0, 0), batch(1, 0), batch(0, 1), batch(1, 1), batch(1, 2)]
    order = [(b[WORKER], b["i"]) for b in in_turn(iter(arrivals), first=1, workers=2)]
    assert order == [(1, 0), (0, 0), (1, 1), (0, 1), (1, 2)]

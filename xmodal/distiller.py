"""The one LightningModule: a student, an optional frozen teacher, and a weighted list of losses.

``training_step`` runs the student, runs the teacher (or reads its cached outputs), sums
``weight * loss`` over the configured :class:`~xmodal.contracts.DistillLoss` terms and logs every term.
With no teacher and only student-side losses it trains a model from scratch (the baselines and the
demo's CLIP teacher are trained this way). The teacher is deliberately *not* a registered submodule: it is
never trained, never put in train mode by Lightning, and never written into checkpoints.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, cast

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable as SchedulerFactory
from lightning.pytorch.cli import OptimizerCallable as OptimizerFactory
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from xmodal.contracts import (
    Batch,
    ConfigKeyError,
    DistillLoss,
    Outputs,
    PluginModule,
    TaskMetric,
    Teacher,
    key_list,
)


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up over ``warmup_steps`` optimizer steps, then cosine decay to 0 at ``total_steps``.

    The multiplier of each group's base learning rate at step ``n`` is ``(n + 1) / warmup_steps`` during the
    warm-up, then ``0.5 * (1 + cos(pi * (n - warmup_steps) / (total_steps - warmup_steps)))``, held at 0 past
    ``total_steps``. ``decay=False`` (or no ``total_steps``) holds it at 1 after the warm-up. Left unset in a
    config, ``total_steps`` is the trainer's ``max_steps`` (the :class:`Distiller` fills it in), so a run whose
    budget is changed on the command line keeps its schedule's shape::

        model:
          scheduler:
            class_path: xmodal.distiller.WarmupCosineLR
            init_args: {warmup_steps: 100}
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                 decay: bool = True) -> None:
        self.warmup_steps, self.total_steps, self.decay = warmup_steps, total_steps, decay
        super().__init__(optimizer, lr_lambda("cosine" if decay else "constant", warmup_steps, total_steps))


def default_scheduler(optimizer: torch.optim.Optimizer, total_steps: int | None = None) -> WarmupCosineLR:
    return WarmupCosineLR(optimizer, total_steps=total_steps)


def build_scheduler(factory: Callable[..., Any], optimizer: torch.optim.Optimizer, total_steps: int | None) -> Any:
    """``factory(optimizer)``, passing the run's ``total_steps`` when the factory takes that keyword unset (like
    :class:`WarmupCosineLR` and torch's ``OneCycleLR``)."""
    # A config's class_path arrives as a functools.partial over jsonargparse's instantiator, its signature hidden
    # but every init_arg, defaults included, among its keywords.
    given = getattr(factory, "keywords", {})
    takes_total = "total_steps" in given or "total_steps" in inspect.signature(factory).parameters
    if total_steps and takes_total and given.get("total_steps") is None:
        return factory(optimizer, total_steps=total_steps)
    return factory(optimizer)


class LegacySchedulerWarning(FutureWarning):
    """A config names the schedule the old way (``scheduler: cosine`` and ``warmup_steps`` on the model)."""


def legacy_scheduler(kind: str, warmup_steps: int) -> Callable[..., WarmupCosineLR]:
    """The :class:`WarmupCosineLR` factory that an old ``scheduler: cosine|constant`` + ``warmup_steps`` means."""
    if kind not in ("cosine", "constant"):
        raise ValueError(f"unknown scheduler {kind!r}; use 'cosine' or 'constant', or a class_path")
    warnings.warn(
        f"model.scheduler: {kind!r} with model.warmup_steps is the old form; write scheduler: {{class_path: "
        f"xmodal.distiller.WarmupCosineLR, init_args: {{warmup_steps: {warmup_steps}"
        f"{', decay: false' if kind == 'constant' else ''}}}}} (the same schedule)", LegacySchedulerWarning,
        stacklevel=3)

    def factory(optimizer: torch.optim.Optimizer, total_steps: int | None = None) -> WarmupCosineLR:
        return WarmupCosineLR(optimizer, warmup_steps, total_steps, decay=kind == "cosine")

    return factory


class LossShapeError(ConfigKeyError):
    """A loss failed on student and teacher outputs whose shapes differ: a config mistake, named as such."""


def shapes_of(value: Any) -> list[tuple[int, ...]]:
    values = value if isinstance(value, list | tuple) else [value]
    return [tuple(v.shape) for v in values if isinstance(v, Tensor)]


def call_loss(loss: DistillLoss, student: Any, teacher: Any, batch: Batch) -> Tensor:
    """``loss(student, teacher, batch)``; a failure on outputs of different shapes names the loss and the shapes."""
    try:
        return loss(student, teacher, batch)
    except (RuntimeError, ValueError) as error:
        if teacher is None or shapes_of(student) == shapes_of(teacher):
            raise
        raise LossShapeError(
            f"loss {loss.name!r} ({type(loss).__name__}, student_key {loss.student_key!r}, teacher_key "
            f"{loss.teacher_key!r}) got student outputs of shape {shapes_of(student)} and teacher outputs of shape "
            f"{shapes_of(teacher)}: {str(error).splitlines()[0]}") from error


class EmptyEpochError(RuntimeError):
    """A training epoch produced no batch (empty shards, or every sample failed to decode)."""


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf."""


class Distiller(L.LightningModule):
    """Compose a student, a teacher and losses.

    Args:
        student: the model being trained; ``forward(batch) -> Outputs`` and an ``output_keys`` tuple
            (:class:`~xmodal.contracts.Student`). Typed :class:`~xmodal.contracts.PluginModule` so that a config's
            ``class_path`` resolves among the plug-ins only; from Python any ``nn.Module`` does.
        losses: the loss terms, each with its keys, weight and name.
        teacher: a frozen teacher (live or :class:`~xmodal.teachers.cached.CachedTeacher`), or ``None``.
        optimizer: a factory ``params -> Optimizer`` (``class_path``/``init_args`` in YAML).
        scheduler: a factory ``optimizer -> LRScheduler`` (``class_path``/``init_args`` in YAML, as for
            Lightning's ``--lr_scheduler``), stepped every optimizer step; a scheduler class with a ``total_steps``
            parameter left unset gets ``trainer.max_steps``. The default is :class:`WarmupCosineLR` without warm-up.
            The old strings ``"cosine"``/``"constant"`` (with ``warmup_steps``) still load, with a warning.
        warmup_steps: only for the old string form of ``scheduler``: its linear warm-up length.
        log_every_step: log the training terms at every step. By default they are logged only at the steps the
            trainer writes logs (``log_every_n_steps``), and at the first and the last step: each ``self.log``
            call costs Lightning tens of microseconds, which was ~15% of a small CLIP pair's step on an H100.
        check_finite: stop with :class:`NonFiniteLossError` naming the step and term on NaN/inf (on a GPU, one step
            later, so that the check never waits for the device).
        param_lr: learning rates for parameters whose qualified name contains a key, e.g.
            ``{log_alpha: 0.05, lambda: 0.05}`` for pruning gates and Lagrange multipliers, which must move much
            faster than the weights; the warm-up/cosine schedule scales every group alike.
        teacher_dtype: cast a live teacher's weights to this dtype (``"bfloat16"`` halves its memory) and run it
            under autocast in that dtype; its floating outputs come back as float32. ``None`` keeps its dtype. The
            student's precision is the trainer's (``trainer.precision: bf16-mixed`` works on CPU too).
        val_metrics: the recipe's task metrics (:class:`~xmodal.contracts.TaskMetric` modules, see
            :mod:`xmodal.eval.tasks`), updated on every validation (and test) batch and logged per epoch as
            ``val/<name>`` (``test/<name>``), e.g. ``val/zeroshot_top1``, ``val/cer``, ``val/mAP``, ``val/hm``.
    """

    teacher: Teacher | None

    def __init__(
        self,
        student: PluginModule,
        losses: Sequence[DistillLoss],
        teacher: PluginModule | None = None,
        optimizer: OptimizerFactory = default_optimizer,
        scheduler: SchedulerFactory | Literal["cosine", "constant"] = default_scheduler,
        warmup_steps: int | None = None,
        check_finite: bool = True,
        param_lr: dict[str, float] | None = None,
        teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        log_every_step: bool = False,
        val_metrics: Sequence[TaskMetric] | None = None,
    ) -> None:
        super().__init__()
        if teacher is not None and not isinstance(teacher, Teacher):
            raise TypeError(f"{type(teacher).__name__} is not a Teacher: it needs output_keys and manifest()")
        self.student = student
        self.losses = nn.ModuleList(losses)
        self.val_metrics = nn.ModuleList(task_modules(val_metrics or []))
        self._metric_batches = 0
        object.__setattr__(self, "teacher", teacher)  # unregistered on purpose, see the module docstring
        self.optimizer_factory = optimizer
        if isinstance(scheduler, str):
            scheduler = legacy_scheduler(scheduler, warmup_steps or 0)
        elif warmup_steps:
            raise ConfigKeyError("model.warmup_steps goes with the old scheduler: cosine|constant; with a scheduler "
                                 "class_path, give its warm-up in the scheduler's init_args")
        self.scheduler_factory: Callable[..., Any] = scheduler
        self.check_finite = check_finite
        self.log_every_step = log_every_step
        self._epoch_batches = 0
        self._pending_check: tuple[int, Tensor, dict[str, Tensor]] | None = None
        self.param_lr = dict(param_lr or {})
        self.teacher_dtype = getattr(torch, teacher_dtype) if teacher_dtype else None
        validate_keys(student, teacher, self.terms)

    @property
    def terms(self) -> list[DistillLoss]:
        """The loss modules, typed."""
        return cast(list[DistillLoss], list(self.losses))

    def forward(self, batch: Batch) -> Outputs:
        return self.student(batch)

    def teacher_outputs(self, batch: Batch) -> Outputs | None:
        if self.teacher is None or not any(loss.needs_teacher for loss in self.terms):
            return None
        low_precision = self.teacher_dtype is not None and self.teacher_dtype != torch.float32
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.teacher_dtype,
                                                    enabled=low_precision):
            outputs = self.teacher(batch)
        # Inference tensors cannot be saved for the student's backward pass: one copy out of inference mode (the
        # teacher's activations are still never kept).
        return {k: _out_of_inference(v, low_precision) for k, v in outputs.items()}

    @property
    def tasks(self) -> list[TaskMetric]:
        """The validation task metrics, typed."""
        return cast(list[TaskMetric], list(self.val_metrics))

    def compute_losses(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return self.losses_of(self.student(batch), batch)

    def losses_of(self, student_out: Outputs, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total and every term, given the student's outputs on ``batch``."""
        teacher_out = self.teacher_outputs(batch)
        terms: dict[str, Tensor] = {}
        for loss in self.terms:
            s, t = loss.select(student_out, teacher_out)
            terms[loss.name] = call_loss(loss, s, t, batch)
        total = sum(loss.weight * terms[loss.name] for loss in self.terms)
        assert isinstance(total, Tensor)
        return total, terms

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        self._epoch_batches += 1
        total, terms = self.compute_losses(batch)
        if self.check_finite:
            self._check_finite(total, terms)
        if self.log_every_step or self._trainer_logs_this_step():
            batch_size = batch_size_of(batch)
            for name, value in terms.items():
                self.log(f"train/{name}", value.detach(), batch_size=batch_size)
            self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
            self._log_loss_metrics("train", batch_size)
        return total

    def _trainer_logs_this_step(self) -> bool:
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)  # Lightning's own rule for when logs are written
        if trainer is None or connector is None or getattr(trainer, "fast_dev_run", False) or self.global_step == 0:
            return True
        last = trainer.max_steps > 0 and self.global_step + 1 >= trainer.max_steps
        return last or bool(connector.should_update_logs)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> Outputs:
        return self.student(batch)

    def _eval_step(self, batch: Batch, stage: str) -> None:
        student_out = self.student(batch)
        total, terms = self.losses_of(student_out, batch)
        for task in self.tasks:
            task.update(self.student, student_out, batch)
        self._metric_batches += 1
        batch_size = batch_size_of(batch)
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, batch_size=batch_size, sync_dist=True)
        self.log(f"{stage}/loss", total, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self._log_loss_metrics(stage, batch_size)

    def on_validation_epoch_start(self) -> None:
        self._reset_tasks()

    def on_test_epoch_start(self) -> None:
        self._reset_tasks()

    def on_validation_epoch_end(self) -> None:
        self._log_tasks("val")

    def on_test_epoch_end(self) -> None:
        self._log_tasks("test")

    def _reset_tasks(self) -> None:
        self._metric_batches = 0
        for task in self.tasks:
            task.reset()

    def _log_tasks(self, stage: str) -> None:
        """Log each task metric's epoch values (``compute`` has already reduced them over DDP ranks)."""
        if not self.tasks:
            return
        # Every rank decides alike (compute is a collective): skip only when no rank saw a batch.
        batches = self.trainer.strategy.reduce(torch.tensor(float(self._metric_batches), device=self.device),
                                               reduce_op="sum")
        if float(batches) == 0:
            return
        for task in self.tasks:
            for name, value in task.compute().items():
                self.log(f"{stage}/{name}", value.float(), prog_bar=False)
        self._reset_tasks()

    def _log_loss_metrics(self, stage: str, batch_size: int) -> None:
        """Log the extra values a loss left in its ``last_metrics`` dict (e.g. LIBS's kept fraction)."""
        for loss in self.terms:
            for key, value in getattr(loss, "last_metrics", {}).items():
                self.log(f"{stage}/{loss.name}/{key}", value, batch_size=batch_size, sync_dist=stage != "train")

    def _check_finite(self, total: Tensor, terms: dict[str, Tensor]) -> None:
        if total.device.type != "cpu":
            # Reading a GPU value waits for the device: check the previous step's loss instead, which has been
            # computed by now, so the host keeps queueing work ahead of the GPU.
            pending, self._pending_check = self._pending_check, (self.global_step, total.detach(),
                                                                  {k: v.detach() for k, v in terms.items()})
            if pending is not None:
                self._raise_if_not_finite(*pending)
            return
        self._raise_if_not_finite(self.global_step, total, terms)

    def on_train_end(self) -> None:
        pending, self._pending_check = self._pending_check, None
        if pending is not None:
            self._raise_if_not_finite(*pending)

    @staticmethod
    def _raise_if_not_finite(step: int, total: Tensor, terms: dict[str, Tensor]) -> None:
        if torch.isfinite(total):
            return
        bad = [f"{name}={value.item()}" for name, value in terms.items() if not torch.isfinite(value)]
        raise NonFiniteLossError(f"non-finite loss at step {step}: {', '.join(bad) or total.item()}")

    def on_train_epoch_start(self) -> None:
        self._epoch_batches = 0

    def on_train_epoch_end(self) -> None:
        if self._epoch_batches == 0:  # an empty stream would otherwise start epoch after empty epoch, forever
            raise EmptyEpochError(
                "a training epoch gave no batch: the shards are empty, or no sample decoded (check the patterns and "
                "that the samples hold the fields the modalities read; undecodable samples are skipped)")
        datamodule = getattr(self.trainer, "datamodule", None)
        skipped = getattr(datamodule, "skipped_samples", None)
        if datamodule is not None and skipped is not None:
            self.log("data/skipped_samples", float(skipped), reduce_fx="sum", sync_dist=True)
            datamodule.skipped_samples = 0

    def _move_teacher(self) -> None:
        if isinstance(self.teacher, nn.Module):
            self.teacher.to(self.device, dtype=self.teacher_dtype)
            self.teacher.eval()

    def on_fit_start(self) -> None:
        self._move_teacher()
        self._warn_batch_coupled()

    def _warn_batch_coupled(self) -> None:
        """Gradient accumulation equals one large batch only for per-sample losses; say so when it does not."""
        accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        coupled = [loss.name for loss in self.terms if loss.batch_coupled]
        if accumulate > 1 and coupled:
            rank_zero_warn(
                f"accumulate_grad_batches={accumulate} with batch-coupled loss(es) {coupled}: these compare the "
                f"samples of one micro-batch with each other, so accumulating is not the same as a batch "
                f"{accumulate}x larger (fewer in-batch negatives/relations). Use a larger per-device batch or more "
                "devices to grow the batch for them."
            )

    def on_validation_start(self) -> None:
        self._move_teacher()

    def on_test_start(self) -> None:
        self._move_teacher()

    def on_predict_start(self) -> None:
        self._move_teacher()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(param_groups(self, self.param_lr))
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        scheduler = build_scheduler(self.scheduler_factory, optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def param_groups(module: nn.Module, param_lr: dict[str, float] | None) -> list[dict[str, Any]]:
    """Trainable parameters as optimizer groups: one group per ``param_lr`` key, then the rest.

    A parameter goes to the first key contained in its qualified name (``student.gates.mlp.log_alpha``,
    ``losses.2.lambda1``) and gets that learning rate; the others use the optimizer's own ``lr``. Empty groups are
    dropped; a key that matches nothing is an error, so a typo cannot silently train everything at one rate.
    """
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = []
    taken: set[str] = set()
    for key, lr in (param_lr or {}).items():
        params = [p for name, p in named if key in name and name not in taken]
        if not params:
            raise ValueError(f"param_lr key {key!r} matches no trainable parameter")
        taken.update(name for name, _ in named if key in name)
        groups.append({"params": params, "lr": lr})
    rest = [p for name, p in named if name not in taken]
    return ([{"params": rest}] if rest else []) + groups


def lr_lambda(kind: str, warmup: int, total: int | None) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step ``step``."""

    def schedule(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant" or not total:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    if kind not in ("cosine", "constant"):
        raise ValueError(f"unknown scheduler {kind!r}; use 'cosine' or 'constant'")
    return schedule


def validate_keys(student: nn.Module, teacher: nn.Module | None, losses: Iterable[DistillLoss]) -> None:
    """Fail before training when a loss reads a key that the student or teacher does not produce."""
    student_keys = set(getattr(student, "output_keys", ()))
    teacher_keys = set(getattr(teacher, "output_keys", ())) if teacher is not None else set()
    for loss in losses:
        for key in key_list(loss.student_key):
            if student_keys and key not in student_keys:
                raise ConfigKeyError(
                    f"loss {loss.name!r}: student_key {key!r} is not produced by the student "
                    f"({type(student).__name__} produces {sorted(student_keys)})"
                )
        for key in key_list(loss.teacher_key):
            if teacher is None:
                raise ConfigKeyError(f"loss {loss.name!r}: teacher_key {key!r} is set but no teacher is configured")
            if key not in teacher_keys:
                raise ConfigKeyError(
                    f"loss {loss.name!r}: teacher_key {key!r} is not produced by the teacher "
                    f"({type(teacher).__name__} produces {sorted(teacher_keys)})"
                )


def task_modules(tasks: Sequence[TaskMetric]) -> list[nn.Module]:
    """The task metrics as modules (so their metric states follow the model's device), each checked."""
    for task in tasks:
        if not isinstance(task, nn.Module) or not isinstance(task, TaskMetric):
            raise TypeError(f"val_metrics: {type(task).__name__} is not a TaskMetric nn.Module (update(student, "
                            "outputs, batch), compute(), reset())")
    return [cast(nn.Module, task) for task in tasks]


def batch_size_of(batch: Batch) -> int:
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, list):
            return len(value)
    return 1


def _out_of_inference(value: Any, to_float: bool) -> Any:
    if not isinstance(value, Tensor):
        return value
    if to_float and torch.is_floating_point(value):
        return value.to(torch.float32, copy=True)
    return value.clone()

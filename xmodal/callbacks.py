"""Every Lightning callback of xmodal: exporting the student, probing it, and the training-time parts of losses.

* :class:`ExportStudent`, :class:`ZeroShotProbe`: belong to every recipe;
* :class:`AugmentBatch`, :class:`HARDCallback`: mixup/CutMix and HARD's adversarial warps on the training batch
  (the transforms and the augmenter are in :mod:`xmodal.losses.augment`);
* :class:`TGeoKDMetaCallback`: TGeo-KD's outer (meta) step (:func:`xmodal.losses.weighting.tgeo_meta_step`);
* :class:`MixSpeechSchedule`: MixSpeech's audio-share curriculum (:func:`xmodal.losses.mixspeech.mix_ratio`).
* :class:`GradientDiagnostics`: each loss term's gradient on the student, against the task loss's
  (:mod:`xmodal.diagnostics`; ``xmodal fit --diagnose``), and an optional one-time rescaling of the weights.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn

from xmodal.contracts import Batch, to_float_image
from xmodal.diagnostics import Diagnostics, auto_weights, diagnose
from xmodal.distiller import Distiller
from xmodal.losses.augment import CutMixKD, HARDAugmenter, MixupKD, hard_update
from xmodal.losses.mixspeech import mix_ratio
from xmodal.losses.weighting import LogitsFn, TGeoKDLoss, tgeo_meta_step


class ExportStudent(L.Callback):
    """At the end of ``fit``, write the student as a zoo checkpoint folder (safetensors + config + cards).

    This is the clear way to get the student out of a run: ``xmodal.create_model("<out_dir>")`` (or the student
    class's ``from_pretrained``) loads it, ``xmodal.register_model("<out_dir>", name=...)`` makes it loadable by
    name, and the student's ``push_to_hub`` shares it. The student must expose ``init_args`` (its constructor
    arguments). The card and ``README.md`` record what the run knows of itself (:func:`run_facts`): the recipe
    file(s), the teacher, the data, the budget and the trainer's last logged metrics, with ``license``.

    Args:
        out_dir: checkpoint folder to write.
        name: model name written into the card (defaults to the folder name).
        teacher: what the student was distilled from, for the card (a path is written absolute); by default the
            run's teacher module describes itself (its ``manifest()``).
        open_clip: also write ``open_clip_config.json`` + ``open_clip_model.safetensors`` (and the tokenizer's
            files), so ``open_clip.create_model_and_transforms("local-dir:<out_dir>")`` loads it too. ``None``
            (default): whenever the student can (it has ``open_clip_config``, as CLIP students do).
        license: the licence the weights are released under (a Hugging Face licence id such as ``apache-2.0``);
            it depends on the teacher's and the data's terms, so the card says "not recorded" unless it is given.
    """

    def __init__(self, out_dir: str, name: str | None = None, teacher: str | None = None,
                 open_clip: bool | None = None, license: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.name = name or self.out_dir.name
        self.teacher = teacher
        self.open_clip = open_clip
        self.license = license

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from xmodal.zoo import save_pretrained

        student: torch.nn.Module = pl_module.student  # type: ignore[assignment]
        init_args = getattr(student, "init_args", None)
        if init_args is None:
            raise TypeError(f"{type(student).__name__} has no init_args; ExportStudent cannot rebuild it")
        open_clip = self.open_clip if self.open_clip is not None else hasattr(student, "open_clip_config")
        if open_clip and not hasattr(student, "open_clip_config"):
            raise TypeError(f"{type(student).__name__} has no open_clip_config; it cannot be exported for open_clip")
        metrics: dict[str, float | int] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        metrics["global_step"] = trainer.global_step
        save_pretrained(student, init_args, self.out_dir, name=self.name, metrics=metrics, license=self.license,
                        **run_facts(trainer, pl_module, self.teacher))
        if open_clip:
            from xmodal.students.clip import save_open_clip_dir

            save_open_clip_dir(student, self.out_dir)
        rank_zero_info(f"student exported to {self.out_dir}")


def run_facts(trainer: L.Trainer, pl_module: L.LightningModule, teacher: str | None = None) -> dict[str, Any]:
    """What a finished run knows of itself, for a model card: recipe, teacher, data and budget.

    ``recipe``: the ``--config`` files of ``xmodal fit`` (as given; ``None`` outside the CLI). ``teacher``: the
    given reference, else the teacher's ``manifest()`` ``model_name``/``checkpoint``/``teacher`` entry;
    ``teacher_sha256``: the manifest's ``weights_sha256``. ``data``: the data module's non-empty shard patterns.
    ``budget``: optimizer steps done, the step/epoch limits that were set, batch size (per process), gradient
    accumulation and the number of processes.
    """
    from lightning.pytorch.cli import SaveConfigCallback

    saved = next((c for c in trainer.callbacks if isinstance(c, SaveConfigCallback)), None)  # type: ignore[attr-defined]
    files = saved.config.get("config") if saved is not None else None
    describe_teacher = getattr(getattr(pl_module, "teacher", None), "manifest", None)
    manifest: dict[str, Any] = describe_teacher() if callable(describe_teacher) else {}
    described = next((manifest[key] for key in ("model_name", "checkpoint", "teacher") if manifest.get(key)), None)
    datamodule = getattr(trainer, "datamodule", None)
    shards = getattr(datamodule, "shards", None) or {}
    budget: dict[str, Any] = {"steps": trainer.global_step}
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        budget["max_steps"] = trainer.max_steps
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        budget["max_epochs"] = trainer.max_epochs
    budget.update(batch_size=getattr(datamodule, "batch_size", None),
                  accumulate_grad_batches=trainer.accumulate_grad_batches, processes=trainer.world_size)
    return {
        "recipe": [str(f) for f in files] if files else None,
        "teacher": teacher or (str(described) if described is not None else None),
        "teacher_sha256": manifest.get("weights_sha256"),
        "data": {split: pattern for split, pattern in shards.items() if pattern} or None,
        "budget": {key: value for key, value in budget.items() if value is not None},
    }


class ZeroShotProbe(L.Callback):
    """Every ``every_n_steps`` optimizer steps, measure the student's zero-shot top-1 on held-out shards.

    The learning curve this gives answers "how many steps until the student reaches accuracy X" (TinyCLIP's
    training-speed claim). Each point is logged as ``probe/zeroshot_top1`` and kept in :attr:`history`; with
    ``out_json`` the history is also written as ``[{"step": ..., "zeroshot_top1": ...}, ...]`` after every probe.
    The student must have ``embed_images`` and ``embed_texts`` (CLIP students, masked students).

    Args:
        shards: WebDataset pattern of the probe set (``png``/``jpg`` + json ``label``).
        classes: ``classes.json`` with ``classes`` and ``templates``.
        image_size: the student's input resolution.
        every_n_steps: probe interval; a final probe always runs at the end of training.
        batch_size: evaluation batch size.
        out_json: optional path for the history.
    """

    def __init__(self, shards: str, classes: str, image_size: int, every_n_steps: int = 50, batch_size: int = 256,
                 out_json: str | None = None) -> None:
        import json

        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        spec = json.loads(Path(classes).read_text())
        self.classnames, self.templates = spec["classes"], spec["templates"]
        self.shards, self.image_size = shards, image_size
        self.every_n_steps, self.batch_size = every_n_steps, batch_size
        self.out_json = Path(out_json) if out_json else None
        self.history: list[dict[str, float]] = []

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool = True) -> None:
        import json

        from xmodal.data.wds import make_pipeline
        from xmodal.eval.loops import evaluate_zeroshot
        from xmodal.eval.zeroshot import DualEncoder
        from xmodal.modalities.image import ImageModality

        step = trainer.global_step
        if self.history and self.history[-1]["step"] == step:
            return
        loader = make_pipeline(self.shards, [ImageModality(self.image_size)], self.batch_size, train=False)
        student = cast(DualEncoder, pl_module.student)
        result = evaluate_zeroshot(student, loader, self.classnames, self.templates, device=pl_module.device)
        self.history.append({"step": step, "zeroshot_top1": float(result["top1"])})
        if log:
            pl_module.log("probe/zeroshot_top1", float(result["top1"]))
        if self.out_json is not None and trainer.is_global_zero:
            self.out_json.parent.mkdir(parents=True, exist_ok=True)
            self.out_json.write_text(json.dumps(self.history, indent=1))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.probe(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probe(trainer, pl_module, log=False)  # Lightning does not allow self.log here


class AugmentBatch(L.Callback):
    """Runs batch transforms on the device batch at the start of each training step (validation is untouched).

    Args:
        transforms: callables ``batch -> batch`` such as :class:`MixupKD` and :class:`CutMixKD`.
        mode: ``"all"`` applies every transform in order; ``"one"`` applies one picked uniformly per batch
            (timm-style switching between mixup and CutMix).
        seed: seed of the ``"one"`` choice.
    """

    def __init__(self, transforms: Sequence[MixupKD | CutMixKD], mode: Literal["all", "one"] = "all",
                 seed: int | None = None) -> None:
        self.transforms = list(transforms)
        self.mode = mode
        self.rng = random.Random(seed)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        chosen = self.transforms if self.mode == "all" else [self.rng.choice(self.transforms)]
        for transform in chosen:
            batch.update(transform(batch))


class HARDCallback(L.Callback):
    """HARD during ``fit``: each step, update the augmenter once, then warp part of the batch's images.

    The augmenter ascends the teacher-student disagreement (:func:`hard_update`) on the incoming batch; then the
    first ``round(fraction * B)`` images of ``batch[image_key]`` are replaced by fresh warps, which the student
    and the teacher both see in the training step, so the student's KD loss descends the disagreement the
    augmenter found. Needs a live teacher (cached outputs do not follow the warp). The augmenter's weights are
    saved in the callback's checkpoint state.

    Args:
        augmenter: the :class:`HARDAugmenter`.
        student_key, teacher_key: logits keys compared by the disagreement.
        image_key: batch key of the float ``B x C x H x W`` images.
        lr: Adam learning rate of the augmenter.
        fraction: share of each batch that is warped.
        every_n_steps: update the augmenter every this many steps (warping happens every step).
        temperature, teacher_consistency, identity_weight: see :func:`hard_augmenter_loss`.
    """

    def __init__(
        self, augmenter: HARDAugmenter, student_key: str, teacher_key: str, image_key: str = "image",
        lr: float = 1e-3, fraction: float = 0.5, every_n_steps: int = 1, temperature: float = 1.0,
        teacher_consistency: float = 0.0, identity_weight: float = 0.0,
    ) -> None:
        self.augmenter = augmenter
        self.student_key, self.teacher_key, self.image_key = student_key, teacher_key, image_key
        self.lr, self.fraction, self.every_n_steps = lr, fraction, every_n_steps
        self.loss_kwargs = {"temperature": temperature, "teacher_consistency": teacher_consistency,
                            "identity_weight": identity_weight}
        self.optimizer: torch.optim.Optimizer | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from xmodal.teachers.cached import CachedTeacher

        teacher = getattr(pl_module, "teacher", None)
        if teacher is None or isinstance(teacher, CachedTeacher):
            raise ValueError("HARDCallback needs a live teacher: cached teacher outputs do not follow the warps")
        self.augmenter.to(pl_module.device)
        self.optimizer = torch.optim.Adam(self.augmenter.parameters(), lr=self.lr)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        images = to_float_image(batch[self.image_key])
        module: Any = pl_module  # a Distiller: .student and .teacher
        teacher, student = module.teacher, module.student

        def student_fn(x: Tensor) -> Tensor:
            return student({**batch, self.image_key: x})[self.student_key]

        def teacher_fn(x: Tensor) -> Tensor:
            return teacher({**batch, self.image_key: x})[self.teacher_key]

        if self.optimizer is not None and trainer.global_step % self.every_n_steps == 0:
            value = hard_update(self.augmenter, self.optimizer, images, teacher_fn, student_fn, **self.loss_kwargs)
            pl_module.log("train/hard_objective", value, batch_size=len(images))
        k = round(self.fraction * len(images))
        with torch.no_grad():
            batch[self.image_key] = torch.cat([self.augmenter(images[:k]), images[k:]]) if k else images

    def state_dict(self) -> dict[str, Any]:
        return {"augmenter": self.augmenter.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.augmenter.load_state_dict(state_dict["augmenter"])


class TGeoKDMetaCallback(L.Callback):
    """Trains every :class:`TGeoKDLoss`'s ratio network with :func:`tgeo_meta_step` during ``fit``.

    At each training step (every ``every_n_steps``), before the student trains on the incoming batch, the
    *previous* batch plays the inner (training) set and the incoming batch, not yet trained on, the held-out
    meta set. The student runs in eval mode during the meta step (deterministic finite differences; no
    BatchNorm statistics updates). The ratio networks have their own Adam optimizer (``lr``); its state is not
    checkpointed (the networks' weights are, inside the loss modules).

    Args:
        lr: learning rate of the ratio networks (absorbs the inner step size ``eta``).
        eps: finite-difference step of :func:`tgeo_meta_step`.
        every_n_steps: run the meta step every this many training steps.
    """

    def __init__(self, lr: float = 1e-3, eps: float = 1e-2, every_n_steps: int = 1) -> None:
        self.lr = lr
        self.eps = eps
        self.every_n_steps = every_n_steps
        self._previous: Batch | None = None
        self._optimizers: dict[str, torch.optim.Optimizer] = {}

    @staticmethod
    def tgeo_losses(pl_module: L.LightningModule) -> list[TGeoKDLoss]:
        return [m for m in getattr(pl_module, "losses", []) if isinstance(m, TGeoKDLoss)]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        losses = self.tgeo_losses(pl_module)
        if not losses:
            raise ValueError("TGeoKDMetaCallback: the model has no TGeoKDLoss among its losses")
        self._optimizers = {m.name: torch.optim.Adam(m.ratio_net.parameters(), lr=self.lr) for m in losses}
        self._previous = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        previous, self._previous = self._previous, {k: v.detach() if isinstance(v, Tensor) else v
                                                    for k, v in batch.items()}
        if previous is None or trainer.global_step % self.every_n_steps:
            return
        module: Any = pl_module  # a Distiller: .student, .teacher_outputs
        student: nn.Module = module.student
        params = [p for p in student.parameters() if p.requires_grad]
        was_training = student.training
        student.eval()
        try:
            for loss in self.tgeo_losses(pl_module):
                stats = tgeo_meta_step(
                    loss, output_reader(student, str(loss.student_key)),
                    output_reader(module.teacher_outputs, str(loss.teacher_key)),
                    params, previous, batch, self._optimizers[loss.name], self.eps,
                )
                pl_module.log(f"train/{loss.name}_ratio", stats["ratio"], batch_size=len(batch["label"]))
        finally:
            student.train(was_training)


def output_reader(model: Callable[[Batch], Any], key: str) -> LogitsFn:
    """``batch -> model(batch)[key]``."""

    def read(batch: Batch) -> Tensor:
        return model(batch)[key]

    return read


class MixSpeechSchedule(L.Callback):
    """Set ``pl_module.student.mix_lambda`` from :func:`mix_ratio` before each training batch and log it.

    Args: as :func:`mix_ratio` (``steps``: length of the ramp in optimizer steps).
    """

    def __init__(
        self, steps: int, start: float = 1.0, end: float = 0.0, shape: Literal["linear", "cosine"] = "linear",
        hold: int = 0,
    ) -> None:
        mix_ratio(0, steps, start, end, shape, hold)  # validate now, not at the first batch
        self.steps, self.start, self.end, self.shape, self.hold = steps, start, end, shape, hold

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        lam = mix_ratio(trainer.global_step, self.steps, self.start, self.end, self.shape, self.hold)
        student = getattr(pl_module, "student", pl_module)
        if not hasattr(student, "mix_lambda"):
            raise AttributeError(f"{type(student).__name__} has no mix_lambda: use a LipReader with audio_frontend")
        student.mix_lambda = lam
        pl_module.log("train/mix_lambda", lam, on_step=True, on_epoch=False, batch_size=1)


DEFAULT_DIAGNOSE_EVERY = 100  # the interval of ``xmodal fit --diagnose``


class GradientDiagnostics(L.Callback):
    """Measure every loss term's gradient on the student (:func:`xmodal.diagnostics.diagnose`) during ``fit``.

    At the first training batch of a fit (step 0) and then every ``every_n_steps`` optimizer steps, on the training
    batch as the step receives it, before the step runs: each term's value, the norm of its weighted gradient per
    part of the student, its ratio to the task loss's and the cosine with the task loss's gradient are logged as
    ``diag/<term>/value``, ``diag/<term>/grad_<part>`` (``grad_all``: the whole student), ``diag/<term>/ratio``,
    ``diag/<term>/cos_task`` and ``diag/<term>/cos_task_<part>``. The first measurement is also printed as a table
    (rank zero) with the distillation terms that dominate, vanish or fight the task flagged. The measurement does
    not touch the training step: no ``.grad`` is written, and RNGs and buffers are restored.

    ``auto_weight`` is a *one-time rescaling at step 0*, not a dynamic scheme: on the first measurement each
    distillation term named by it gets the weight that puts its gradient norm, on the student parameters it shares
    with the task loss, at the stated multiple of the task loss's (:func:`xmodal.diagnostics.auto_weights`); the
    weights then stay fixed. The new weights are printed, logged as ``diag/<term>/weight``, and kept in the
    callback's checkpoint state, so that a resumed run trains with them.

    Args:
        every_n_steps: measurement interval in optimizer steps.
        parts: ``{part: [student parameter name prefixes]}``; default: by the first component(s) of the names.
        task_terms: names of the loss terms that make the task loss; default: the student-only terms.
        auto_weight: ``{"ratio": r}`` (every distillation term) and/or ``{term name: r}``; ``None``: weights untouched.
    """

    def __init__(self, every_n_steps: int = DEFAULT_DIAGNOSE_EVERY, parts: dict[str, list[str]] | None = None,
                 task_terms: list[str] | None = None, auto_weight: dict[str, float] | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.parts, self.task_terms = every_n_steps, parts, task_terms
        self.auto_weight = dict(auto_weight) if auto_weight else None
        self.weights: dict[str, float] = {}  # chosen by auto_weight; checkpointed
        self.history: list[tuple[int, Diagnostics]] = []
        self._last_step: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, Distiller):
            raise TypeError(f"GradientDiagnostics measures a Distiller's loss terms, not a {type(pl_module).__name__}")
        self._last_step = None
        set_weights(pl_module, self.weights)  # a resumed run's rescaled weights

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step, first = trainer.global_step, self._last_step is None
        if step == self._last_step or not (first or step % self.every_n_steps == 0):
            return  # measured already (accumulated micro-batches share a step), or not due
        self._last_step = step
        distiller = cast(Distiller, pl_module)
        with trainer.precision_plugin.train_step_context():
            result = diagnose(distiller, batch, self.parts, self.task_terms)
        self.history.append((step, result))
        pl_module.log_dict(result.metrics(), on_step=True, on_epoch=False, batch_size=1)
        if first and trainer.is_global_zero:
            print(f"xmodal gradient diagnostics at step {step}:\n{result.table()}", flush=True)
        if self.auto_weight and not self.weights:
            # rank zero's batch decides, so that every DDP rank trains with the same weights
            self.weights = trainer.strategy.broadcast(auto_weights(result, self.auto_weight), src=0)
            set_weights(distiller, self.weights)
            pl_module.log_dict({f"diag/{name}/weight": w for name, w in self.weights.items()}, on_step=True,
                               on_epoch=False, batch_size=1)
            if trainer.is_global_zero:
                print("xmodal auto_weight (one-time, step 0): "
                      + ", ".join(f"{name} = {w:.4g}" for name, w in self.weights.items()), flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.weights = dict(state_dict.get("weights", {}))


def set_weights(distiller: Distiller, weights: dict[str, float]) -> None:
    """Set the weight of each named loss term."""
    for loss in distiller.terms:
        if loss.name in weights:
            loss.weight = weights[loss.name]

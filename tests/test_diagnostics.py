"""Per-term gradient diagnostics against a hand computation; the callback leaves training as it was; auto_weight."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import lightning as L
import pytest
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader

from xmodal.callbacks import GradientDiagnostics
from xmodal.commands.main import main
from xmodal.contracts import Batch, DistillLoss, Outputs
from xmodal.diagnostics import (
    ALL,
    Diagnostics,
    TermDiagnostics,
    auto_weights,
    default_parts,
    diagnose,
    group_parameters,
)
from xmodal.distiller import Distiller


class LinearStudent(nn.Module):
    """``feat = x A^T`` (the front end), ``pred = feat b^T`` (the head); optionally BatchNorm and dropout between."""

    output_keys = ("feat", "pred")

    def __init__(self, noisy: bool = False) -> None:
        super().__init__()
        self.front = nn.Linear(3, 2, bias=False)
        self.mid = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout(0.5)) if noisy else nn.Identity()
        self.head = nn.Linear(2, 1, bias=False)

    def forward(self, batch: Batch) -> Outputs:
        feat = self.front(batch["x"])
        return {"feat": feat, "pred": self.head(self.mid(feat))}


class FeatureTeacher(nn.Module):
    output_keys = ("feat",)

    def forward(self, batch: Batch) -> Outputs:
        return {"feat": batch["teacher_feat"]}

    def manifest(self) -> dict[str, Any]:
        return {"name": "fixed", "output_keys": list(self.output_keys)}


class HalfSquaredError(DistillLoss):
    """``0.5 * ||s - target||^2``: the target is the teacher's output, or ``batch["y"]`` for a student-only term."""

    def forward(self, s: Tensor, t: Tensor | None, batch: Batch) -> Tensor:
        target = batch["y"] if t is None else t
        return 0.5 * (s - target).pow(2).sum()


def linear_distiller(task_weight: float = 1.0, distill_weight: float = 2.0, noisy: bool = False) -> Distiller:
    losses = [HalfSquaredError("pred", weight=task_weight, name="task"),
              HalfSquaredError("feat", "feat", weight=distill_weight, name="distill")]
    return Distiller(LinearStudent(noisy), losses, teacher=FeatureTeacher())


def linear_batch(seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(5, 3, generator=generator), "y": torch.randn(5, 1, generator=generator),
            "teacher_feat": torch.randn(5, 2, generator=generator)}


def cosine(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_norms_ratios_and_cosines_equal_the_hand_computation() -> None:
    torch.manual_seed(0)
    model = linear_distiller(task_weight=1.5, distill_weight=2.0)
    batch = linear_batch()
    student = cast(LinearStudent, model.student)
    a, b = student.front.weight.detach(), student.head.weight.detach()
    x, y, t = batch["x"], batch["y"], batch["teacher_feat"]
    feat = x @ a.T
    residual = feat @ b.T - y  # N x 1
    task_a, task_b = 1.5 * (b.T @ residual.T @ x), 1.5 * (residual.T @ feat)  # d task / dA, d task / db
    distill_a = 2.0 * ((feat - t).T @ x)  # the distillation term does not reach the head
    task_all, distill_all = torch.cat([task_a.flatten(), task_b.flatten()]), torch.cat([distill_a.flatten(),
                                                                                        torch.zeros(2)])

    result = diagnose(model, batch)

    assert result.parts == ["front", "head"] and result.task_terms == ["task"]
    task, distill = result.term("task"), result.term("distill")
    assert task.value == pytest.approx(float(0.5 * residual.pow(2).sum()), rel=1e-5)
    assert distill.value == pytest.approx(float(0.5 * (feat - t).pow(2).sum()), rel=1e-5)
    assert distill.grad_norm == pytest.approx({"front": float(distill_a.norm()), "head": 0.0,
                                               ALL: float(distill_a.norm())}, rel=1e-5)
    assert task.grad_norm == pytest.approx({"front": float(task_a.norm()), "head": float(task_b.norm()),
                                            ALL: float(task_all.norm())}, rel=1e-5)
    assert result.task_grad_norm == pytest.approx(task.grad_norm, rel=1e-6)
    assert distill.ratio[ALL] == pytest.approx(float(distill_all.norm() / task_all.norm()), rel=1e-5)
    assert distill.cos_task["front"] == pytest.approx(cosine(distill_a, task_a), abs=1e-5)
    assert distill.cos_task[ALL] == pytest.approx(cosine(distill_all, task_all), abs=1e-5)
    assert math.isnan(distill.cos_task["head"])  # no gradient there: undefined, not 0
    assert task.cos_task[ALL] == pytest.approx(1.0, abs=1e-6)
    assert distill.shared_norm == pytest.approx(float(distill_a.norm()), rel=1e-5)  # the front end only
    assert distill.task_shared_norm == pytest.approx(float(task_a.norm()), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_parts_by_name_prefix() -> None:
    names = ["visual.stem.weight", "visual.trunk.0.weight", "encoder.rnn.weight", "ctc_head.weight", "encoder2.w"]
    assert default_parts(names) == {p: [p] for p in ["visual", "encoder", "ctc_head", "encoder2"]}
    assert default_parts(["model.a.weight", "model.b.weight"]) == {"model.a": ["model.a"], "model.b": ["model.b"]}
    explicit = group_parameters(names, {"front": ["visual"], "head": ["ctc_head", "encoder."]})
    assert explicit == {"front": [0, 1], "head": [2, 3], "other": [4]}  # whole components: encoder2 is not encoder


def test_explicit_parts_and_task_terms() -> None:
    torch.manual_seed(0)
    model = linear_distiller()
    result = diagnose(model, linear_batch(), parts={"whole": ["front", "head"]}, task_terms=["distill"])
    assert result.parts == ["whole"] and result.task_terms == ["distill"]
    assert result.term("distill").task and result.term("distill").ratio["whole"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not loss terms"):
        diagnose(model, linear_batch(), task_terms=["nope"])


def term(name: str, ratio: float, cos: float, task: bool = False) -> TermDiagnostics:
    return TermDiagnostics(name, 1.0, 0.5, task, {"p": ratio, ALL: ratio}, {"p": ratio, ALL: ratio},
                           {"p": cos, ALL: cos}, ratio, 1.0)


def test_table_flags_dominating_vanishing_and_fighting_terms() -> None:
    result = Diagnostics(["p"], ["ce"], {"p": 1.0, ALL: 1.0}, [
        term("ce", 1.0, 1.0, task=True), term("big", 30.0, 0.5), term("tiny", 0.001, 0.2), term("against", 1.0, -0.4),
        term("fine", 0.5, float("nan"))])
    rows = {line.split()[0]: line for line in result.table().splitlines()[1:-2]}
    assert rows["big"].endswith("dominates") and rows["tiny"].endswith("vanishes")
    assert rows["against"].endswith("fights") and rows["fine"].rstrip().endswith("-")
    assert "(task)" in rows["ce"]
    metrics = result.metrics()
    assert metrics["diag/against/cos_task"] == -0.4 and metrics["diag/big/grad_p"] == 30.0
    assert "diag/fine/cos_task" not in metrics  # NaN: left out


def test_measuring_changes_no_state() -> None:
    torch.manual_seed(0)
    model = linear_distiller(noisy=True)
    model.train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    diagnose(model, linear_batch())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())


def fit(model: Distiller, steps: int, *callbacks: L.Callback) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=list(callbacks))
    trainer.fit(model, DataLoader(cast(Any, [linear_batch(seed) for seed in range(steps)]), batch_size=None))
    return trainer


def test_callback_leaves_training_identical(capsys: pytest.CaptureFixture[str]) -> None:
    runs = []
    callback = GradientDiagnostics(every_n_steps=2)
    for callbacks in ([], [callback]):
        L.seed_everything(0)
        model = linear_distiller(noisy=True)  # dropout and BatchNorm: RNG and buffers would show any leak
        trainer = fit(model, 5, *callbacks)
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert [step for step, _ in callback.history] == [0, 2, 4]
    assert {"diag/distill/grad_front", "diag/distill/cos_task", "diag/distill/ratio"} <= set(trainer.logged_metrics)
    assert capsys.readouterr().out.count("xmodal gradient diagnostics at step 0") == 1


def test_auto_weight_gives_the_stated_ratio() -> None:
    torch.manual_seed(0)
    model = linear_distiller()
    weights = auto_weights(diagnose(model, linear_batch()), {"ratio": 0.25})
    model.terms[1].weight = weights["distill"]
    distill = diagnose(model, linear_batch()).term("distill")
    assert distill.shared_norm / distill.task_shared_norm == pytest.approx(0.25, rel=1e-5)
    with pytest.raises(ValueError, match="not distillation terms"):
        auto_weights(diagnose(model, linear_batch()), {"task": 1.0})


def test_callback_auto_weight_rescales_once_at_step_0(capsys: pytest.CaptureFixture[str]) -> None:
    L.seed_everything(0)
    model = linear_distiller()
    callback = GradientDiagnostics(every_n_steps=1, auto_weight={"distill": 3.0})
    trainer = fit(model, 3, callback)
    (_, first), *later = callback.history
    distill = first.term("distill")
    assert callback.weights["distill"] == pytest.approx(2.0 * 3.0 * distill.task_shared_norm / distill.shared_norm)
    assert model.terms[1].weight == callback.weights["distill"] and model.terms[0].weight == 1.0
    assert all(d.term("distill").weight == callback.weights["distill"] for _, d in later)  # not re-scaled
    assert trainer.logged_metrics["diag/distill/weight"] == pytest.approx(callback.weights["distill"])
    assert "xmodal auto_weight (one-time, step 0): distill = " in capsys.readouterr().out
    assert callback.state_dict() == {"weights": callback.weights}


def test_fit_diagnose_prints_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from xmodal.data.corpora import make_corpus

    monkeypatch.chdir(tmp_path)
    make_corpus("avsync", "runs/data/avsync-tiny", n_train=8, n_val=4, n_test=4, shard_size=4, progress=False)
    trainers: list[L.Trainer] = []
    original_fit = L.Trainer.fit

    def recording_fit(self: L.Trainer, *args: Any, **kwargs: Any) -> Any:
        trainers.append(self)
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", recording_fit)
    config = Path(__file__).resolve().parent.parent / "configs/tiny/lipreading.yaml"
    main(["fit", "--config", str(config), "--diagnose", "--trainer.fast_dev_run=true"])
    out = capsys.readouterr().out
    assert "xmodal gradient diagnostics at step 0" in out
    table = out.split("xmodal gradient diagnostics at step 0:\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["term", "weight", "value"] and "|g| encoder" in table[0]
    assert {"char_ce", "libs_frame"} <= {row.split()[0] for row in table[1:6]}
    [trainer] = trainers
    [callback] = [c for c in cast(Any, trainer).callbacks if isinstance(c, GradientDiagnostics)]
    assert callback.every_n_steps == 100
    assert "diag/libs_frame/cos_task" in trainer.logged_metrics


def test_resumed_callback_keeps_its_rescaled_weights() -> None:
    L.seed_everything(0)
    model = linear_distiller()
    callback = GradientDiagnostics(auto_weight={"ratio": 1.0})
    callback.load_state_dict({"weights": {"distill": 7.0}})  # as from a checkpoint
    fit(model, 1, callback)
    assert model.terms[1].weight == 7.0 and callback.history[0][1].term("distill").weight == 7.0


def test_diagnose_interval_is_a_config_value(capsys: pytest.CaptureFixture[str]) -> None:
    config = Path(__file__).resolve().parent.parent / "configs/tiny/lipreading.yaml"
    for flag, every in [("--diagnose=5", 5), ("--diagnose", 100)]:
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(config), flag, "--print_config"])
        assert yaml.safe_load(capsys.readouterr().out)["diagnose"] == every

"""The logits family (KL, reverse KL, JS, DKD, hard labels, TAID, SinKD) against values worked out by hand."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser

from xmodal.contracts import DistillLoss
from xmodal.losses.logits import (
    DKDLoss,
    HardLabelLoss,
    JSDivLoss,
    KLDivLoss,
    ReverseKLLoss,
    dkd_parts,
)
from xmodal.losses.sinkhorn import SinkhornLoss
from xmodal.losses.taid import TAIDLoss

LOG3 = math.log(3.0)
S = torch.tensor([[0.0, LOG3]])  # softmax = [1/4, 3/4]
T = torch.tensor([[0.0, 0.0]])  # softmax = [1/2, 1/2]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


# ---- reverse KL and JS ----------------------------------------------------------------------------------------------


def test_reverse_kl_by_hand_with_temperature() -> None:
    assert ReverseKLLoss("k", "k")(S, T, {}).item() == pytest.approx(kl([0.25, 0.75], [0.5, 0.5]), abs=1e-6)
    hot = ReverseKLLoss("k", "k", temperature=2.0)(2 * S, 2 * T, {})  # same distributions at T = 2, times T^2
    assert hot.item() == pytest.approx(4 * kl([0.25, 0.75], [0.5, 0.5]), abs=1e-6)


def test_js_by_hand_symmetric_and_bounded() -> None:
    m = [0.375, 0.625]
    expected = 0.5 * kl([0.5, 0.5], m) + 0.5 * kl([0.25, 0.75], m)
    js = JSDivLoss("k", "k")
    assert js(S, T, {}).item() == pytest.approx(expected, abs=1e-6)
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    assert js(a, b, {}).item() == pytest.approx(js(b, a, {}).item(), abs=1e-6)
    disjoint = js(torch.tensor([[60.0, 0.0]]), torch.tensor([[0.0, 60.0]]), {})
    assert disjoint.item() == pytest.approx(math.log(2.0), abs=1e-5)
    assert JSDivLoss("k", "k", temperature=3.0)(3 * S, 3 * T, {}).item() == pytest.approx(9 * expected, abs=1e-5)


@pytest.mark.parametrize("cls", [KLDivLoss, ReverseKLLoss, JSDivLoss])
def test_divergences_vanish_for_identical_logits_and_flatten_sequences(cls: type[DistillLoss]) -> None:
    z = torch.randn(2, 3, 6)
    loss = cls("k", "k", temperature=2.0)  # type: ignore[call-arg]
    assert loss(z, z.clone(), {}).item() == pytest.approx(0.0, abs=1e-6)
    a, b = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    assert loss(a, b, {}).item() == pytest.approx(loss(a.view(6, 6), b.view(6, 6), {}).item(), abs=1e-6)


# ---- DKD ------------------------------------------------------------------------------------------------------------


def test_dkd_by_hand() -> None:
    s = torch.tensor([[math.log(4.0), 0.0, LOG3]])  # p_s = [1/2, 1/8, 3/8]
    t = torch.zeros(1, 3)  # p_t = [1/3, 1/3, 1/3]
    tckd = kl([1 / 3, 2 / 3], [0.5, 0.5])  # binary [p_g, 1 - p_g], label 0
    nckd = kl([0.5, 0.5], [0.25, 0.75])  # non-target classes renormalised
    batch = {"label": torch.tensor([0])}
    loss = DKDLoss("k", "k", alpha=1.0, beta=8.0, temperature=1.0)(s, t, batch)
    assert loss.item() == pytest.approx(tckd + 8 * nckd, abs=1e-6)
    hot = DKDLoss("k", "k", alpha=2.0, beta=3.0, temperature=2.0, label_key="y")(2 * s, 2 * t, {"y": torch.tensor([0])})
    assert hot.item() == pytest.approx(4 * (2 * tckd + 3 * nckd), abs=1e-5)


def test_dkd_parts_recompose_classic_kd() -> None:
    """The paper's identity KL(p_t || p_s) = TCKD + (1 - p_t[g]) * NCKD, row by row."""
    torch.manual_seed(0)
    s, t, labels = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    tckd, nckd = dkd_parts(log_ps, log_pt, labels)
    p_gt = log_pt.exp().gather(1, labels[:, None]).squeeze(1)
    full = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    torch.testing.assert_close(tckd + (1 - p_gt) * nckd, full, atol=1e-6, rtol=1e-5)
    assert DKDLoss("k", "k")(s, s.clone(), {"label": labels}).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_ignores_unlabelled_rows_and_warms_up_in_training_only() -> None:
    s, t = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    labels = torch.randint(0, 5, (2, 4))
    masked = labels.clone()
    masked[1] = -100
    full = DKDLoss("k", "k")(s[:1], t[:1], {"label": labels[:1]})
    assert DKDLoss("k", "k")(s, t, {"label": masked}).item() == pytest.approx(full.item(), rel=1e-5)
    loss = DKDLoss("k", "k", warmup_steps=4)
    first, second = (loss(s, t, {"label": labels}).item() for _ in range(2))
    assert second == pytest.approx(2 * first, rel=1e-5)  # factors 1/4 then 2/4
    loss.eval()
    assert loss(s, t, {"label": labels}).item() == pytest.approx(3 * first, rel=1e-5)
    assert int(loss.step) == 2
    with pytest.raises(KeyError, match="label"):
        loss(s, t, {})


# ---- hard labels ----------------------------------------------------------------------------------------------------


def test_hard_label_by_hand_smoothing_weights_and_ignore() -> None:
    logits = torch.tensor([[0.0, LOG3], [0.0, LOG3]])  # p = [1/4, 3/4]
    labels = torch.tensor([1, 0])
    ce1, ce0 = -math.log(0.75), -math.log(0.25)
    assert HardLabelLoss("k")(logits, None, {"label": labels}).item() == pytest.approx((ce1 + ce0) / 2, abs=1e-6)
    smooth = HardLabelLoss("k", label_smoothing=0.1)(logits[:1], None, {"label": labels[:1]})
    assert smooth.item() == pytest.approx(0.9 * ce1 + 0.1 * (ce0 + ce1) / 2, abs=1e-6)
    weighted = HardLabelLoss("k", sample_weight_key="w")(logits, None, {"label": labels, "w": torch.tensor([2.0, 0.5])})
    assert weighted.item() == pytest.approx((2 * ce1 + 0.5 * ce0) / 2, abs=1e-6)
    ignored = HardLabelLoss("k")(logits, None, {"label": torch.tensor([1, -100])})
    assert ignored.item() == pytest.approx(ce1, abs=1e-6)
    assert HardLabelLoss("k").teacher_key is None and HardLabelLoss("k").name == "hard_label"


# ---- TAID -----------------------------------------------------------------------------------------------------------


def test_taid_by_hand_and_limits() -> None:
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, 2 * LOG3]])
    loss = TAIDLoss("k", "k", lambda_start=0.5).eval()  # target logits 0.5*s + 0.5*t = [0, log 3] -> [1/4, 3/4]
    assert loss(s, t, {}).item() == pytest.approx(kl([0.25, 0.75], [0.5, 0.5]), abs=1e-6)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    assert loss(a, a.clone(), {}).item() == pytest.approx(0.0, abs=1e-6)
    assert TAIDLoss("k", "k", lambda_start=0.0).eval()(a, b, {}).item() == pytest.approx(0.0, abs=1e-6)
    loss.lam.fill_(1.0)  # at lambda = 1 TAID is Hinton KD
    kd = KLDivLoss("k", "k", temperature=2.0)(a, b, {})
    hot = TAIDLoss("k", "k", temperature=2.0).eval()
    hot.lam.fill_(1.0)
    assert hot(a, b, {}).item() == pytest.approx(kd.item(), abs=1e-6)


def reference_schedule(
    objectives: list[float], start: float, alpha: float, beta: float, total: int | None
) -> list[float]:
    """The update rule written out in plain Python, one value of lambda after each step."""
    lam, prev, momentum, out = start, math.inf, 0.0, []
    for n, value in enumerate(objectives):
        if math.isinf(prev):
            prev = value
            out.append(lam)
            continue
        momentum = beta * momentum + (1 - beta) * (prev - value) / (prev + 1e-12)
        floor = start + (1 - start) * min(1.0, n / total) if total else start
        lam = min(1.0, max(floor, lam + alpha * (1 / (1 + math.exp(-momentum))) * (1 - lam)))
        prev = value
        out.append(lam)
    return out


@pytest.mark.parametrize("total", [None, 5])
def test_taid_schedule_follows_the_update_rule(total: int | None) -> None:
    objectives = [2.0, 1.0, 0.5, 0.6, 0.55, 0.5, 0.4]
    loss = TAIDLoss("k", "k", lambda_start=0.2, alpha=0.1, beta=0.5, total_steps=total)
    got = []
    for value in objectives:
        loss.update(torch.tensor(value))
        got.append(loss.current_lambda)
    assert got == pytest.approx(reference_schedule(objectives, 0.2, 0.1, 0.5, total), abs=1e-6)
    assert all(b >= a for a, b in zip(got, got[1:], strict=False))
    if total:
        assert got[-1] == pytest.approx(1.0)


def test_taid_linear_only_schedule() -> None:
    loss = TAIDLoss("k", "k", lambda_start=0.2, total_steps=4, adaptive=False)
    got = []
    for value in [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]:
        loss.update(torch.tensor(value))
        got.append(loss.current_lambda)
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_taid_updates_in_training_only_once_per_optimizer_step() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    loss = TAIDLoss("k", "k", lambda_start=0.3, alpha=0.5, accumulate_grad_batches=2)
    loss(s, t, {})
    assert int(loss.step) == 0 and math.isinf(float(loss.prev_objective))  # half an optimizer step: no update
    loss(s, t, {})
    target = F.softmax(0.7 * s + 0.3 * t, -1)
    cross_entropy = -(target * F.log_softmax(s, -1)).sum(-1).mean()
    assert int(loss.step) == 1 and float(loss.prev_objective) == pytest.approx(cross_entropy.item(), rel=1e-5)
    loss(0.5 * s, t, {}), loss(0.5 * s, t, {})
    assert int(loss.step) == 2 and loss.current_lambda > 0.3
    frozen = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.eval()
    for _ in range(3):
        loss(torch.randn(3, 5), t, {})
    assert all(torch.equal(frozen[k], v) for k, v in loss.state_dict().items())


def test_taid_state_survives_a_state_dict_round_trip() -> None:
    loss = TAIDLoss("k", "k", lambda_start=0.2, alpha=0.2, total_steps=10)
    for value in [3.0, 2.0, 1.5]:
        loss.update(torch.tensor(value))
    state = loss.state_dict()
    assert set(state) == {"lam", "prev_objective", "momentum", "step"}
    restored = TAIDLoss("k", "k", lambda_start=0.2, alpha=0.2, total_steps=10)
    restored.load_state_dict(state)
    assert restored.current_lambda == pytest.approx(loss.current_lambda)
    restored.update(torch.tensor(1.0)), loss.update(torch.tensor(1.0))
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in loss.state_dict().items())


# ---- SinKD ----------------------------------------------------------------------------------------------------------


def test_sinkhorn_batch_by_hand() -> None:
    """Two points p_1 = [3/4, 1/4], p_2 = [1/4, 3/4]: cost [[0, 1], [1, 0]], kernel [[1, k], [k, 1]], k = e^(-1/eps);
    the plan is the kernel over 2 (1 + k), so <P, C> = k / (1 + k), whatever the number of iterations."""
    z = torch.tensor([[LOG3, 0.0], [0.0, LOG3]])
    k = math.exp(-1 / 0.5)
    for iterations in (1, 5):
        loss = SinkhornLoss("k", "k", epsilon=0.5, iterations=iterations, temperature=1.0)(z, z.clone(), {})
        assert loss.item() == pytest.approx(k / (1 + k), abs=1e-6)
    sharp = SinkhornLoss("k", "k", epsilon=0.02, iterations=5, temperature=1.0)(z, z.clone(), {})
    assert 0 < sharp.item() < 1e-10  # not zero at s == t, but vanishes as epsilon -> 0


def numpy_sinkhorn_batch(p_s: np.ndarray, p_t: np.ndarray, eps: float, iterations: int) -> float:
    cost = np.abs(p_s[:, None, :] - p_t[None, :, :]).sum(-1)
    plan = np.exp(-cost / eps)
    n = len(p_s)
    for _ in range(iterations):
        plan = plan / plan.sum(1, keepdims=True) / n
        plan = plan / plan.sum(0, keepdims=True) / n
    return float((plan * cost).sum())


def numpy_sinkhorn_sample(a: np.ndarray, b: np.ndarray, eps: float, iterations: int) -> float:
    cost = 1.0 - np.eye(len(a))
    kernel = np.exp(-cost / eps)
    v = np.ones_like(b)
    for _ in range(iterations):
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
    return float((u[:, None] * kernel * v[None, :] * cost).sum())


def test_sinkhorn_matches_dense_numpy_in_both_modes() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    p_s = F.softmax(s.double() / 2, -1).numpy()
    p_t = F.softmax(t.double() / 2, -1).numpy()
    batch = SinkhornLoss("k", "k", epsilon=0.1, iterations=20, temperature=2.0)(s, t, {})
    assert batch.item() == pytest.approx(numpy_sinkhorn_batch(p_s, p_t, 0.1, 20), rel=1e-4)
    sample = SinkhornLoss("k", "k", epsilon=0.3, iterations=30, temperature=2.0, mode="sample")(s, t, {})
    expected = np.mean([numpy_sinkhorn_sample(p_t[i], p_s[i], 0.3, 30) for i in range(5)])
    assert sample.item() == pytest.approx(expected, rel=1e-4)


def test_sinkhorn_sample_tends_to_total_variation() -> None:
    loss = SinkhornLoss("k", "k", epsilon=0.02, iterations=200, temperature=1.0, mode="sample")
    assert loss(S, T, {}).item() == pytest.approx(0.25, abs=1e-3)  # TV([1/4, 3/4], [1/2, 1/2])


# ---- every loss: gradients reach the student only; YAML construction -------------------------------------------------

LOSSES: list[tuple[str, dict[str, Any]]] = [
    ("xmodal.losses.logits.KLDivLoss", {"temperature": 2.0}),
    ("xmodal.losses.logits.ReverseKLLoss", {"temperature": 2.0}),
    ("xmodal.losses.logits.JSDivLoss", {"temperature": 2.0}),
    ("xmodal.losses.logits.DKDLoss", {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_steps": 10}),
    ("xmodal.losses.logits.HardLabelLoss", {"label_smoothing": 0.1, "sample_weight_key": None}),
    ("xmodal.losses.taid.TAIDLoss", {"lambda_start": 0.2, "total_steps": 100, "temperature": 1.0}),
    ("xmodal.losses.sinkhorn.SinkhornLoss", {"epsilon": 0.1, "iterations": 20, "mode": "batch"}),
    ("xmodal.losses.sinkhorn.SinkhornLoss", {"epsilon": 0.1, "iterations": 20, "mode": "sample"}),
]


def from_config(class_path: str, init_args: dict[str, Any]) -> DistillLoss:
    parser = ArgumentParser()
    parser.add_argument("--loss", type=DistillLoss)
    keys = {"student_key": "audio.logits"}
    if not class_path.endswith("HardLabelLoss"):
        keys["teacher_key"] = "audio.logits"
    cfg = parser.parse_object({"loss": {"class_path": class_path, "init_args": {**keys, **init_args}}})
    loss = parser.instantiate_classes(cfg).loss
    assert isinstance(loss, DistillLoss)
    return loss


@pytest.mark.parametrize(("class_path", "init_args"), LOSSES)
def test_built_from_yaml_and_gradients_reach_only_the_student(class_path: str, init_args: dict[str, Any]) -> None:
    loss = from_config(class_path, init_args)
    for key, value in init_args.items():
        assert getattr(loss, key) == value
    torch.manual_seed(0)
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    value = loss(s, t if loss.needs_teacher else None, {"label": torch.tensor([0, 1, 2, 3])})
    value.backward()
    assert torch.isfinite(value) and s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kl_per_sample_temperature_from_the_batch() -> None:
    from xmodal.losses import KLDivLoss

    s, t = torch.randn(3, 5), torch.randn(3, 5)
    loss = KLDivLoss("a", "a", temperature=4.0, temperature_key="kd_temperature")
    temps = torch.tensor([1.0, 2.0, 4.0])
    rows = [KLDivLoss("a", "a", temperature=float(T))(s[i : i + 1], t[i : i + 1], {}) for i, T in enumerate(temps)]
    expected = torch.stack(rows).mean()
    assert loss(s, t, {"kd_temperature": temps}).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss(s, t, {}).item() == pytest.approx(KLDivLoss("a", "a", temperature=4.0)(s, t, {}).item(), rel=1e-6)

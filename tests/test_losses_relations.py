"""Relational, ranking, weighting and data-side KD tools against hand values and loop-based formulations."""

from __future__ import annotations

import itertools
import math
from typing import Any, cast

import jsonargparse
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.callbacks import AugmentBatch, HARDCallback, TGeoKDMetaCallback
from xmodal.contracts import DistillLoss
from xmodal.distiller import Distiller
from xmodal.losses.augment import (
    CutMixKD,
    HARDAugmenter,
    MixupKD,
    disagreement,
    hard_update,
    mixed_cross_entropy,
)
from xmodal.losses.ranking import DSELoss, MarginMSELoss
from xmodal.losses.relations import RKDLoss, TRGLoss
from xmodal.losses.weighting import TGeoKDLoss, tgeo_meta_step

# ----------------------------------------------------------------------------------------------- helpers


def huber(x: float, delta: float = 1.0) -> float:
    return 0.5 * x * x if abs(x) < delta else delta * (abs(x) - 0.5 * delta)


def rkd_by_loops(s: Tensor, t: Tensor, wd: float, wa: float) -> float:
    """RKD written with Python loops over pairs and triples (independent of the vectorised code)."""
    n = len(s)

    def dist(x: Tensor, i: int, j: int) -> float:
        return float((x[i] - x[j]).norm())

    def psi_d(x: Tensor) -> dict[tuple[int, int], float]:
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        mu = sum(dist(x, i, j) for i, j in pairs) / len(pairs)
        return {(i, j): dist(x, i, j) / mu for i, j in pairs}

    def psi_a(x: Tensor) -> dict[tuple[int, int, int], float]:
        out = {}
        for i, j, k in itertools.permutations(range(n), 3):
            e1 = (x[i] - x[j]) / (x[i] - x[j]).norm()
            e2 = (x[k] - x[j]) / (x[k] - x[j]).norm()
            out[(i, j, k)] = float(e1 @ e2)
        return out

    ds, dt = psi_d(s), psi_d(t)
    as_, at = psi_a(s), psi_a(t)
    ld = sum(huber(ds[p] - dt[p]) for p in ds) / len(ds)
    la = sum(huber(as_[p] - at[p]) for p in as_) / len(as_)
    return wd * ld + wa * la


def assert_teacher_untouched(loss: DistillLoss, s: Any, t: Any, batch: dict[str, Any] | None = None) -> None:
    """Backward reaches the student inputs and the loss's own parameters, never the teacher tensors."""
    out = loss(s, t, batch or {})
    out.backward()
    for x in s if isinstance(s, tuple) else (s,):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for x in t if isinstance(t, tuple) else (t,):
        assert x.grad is None


def build(config: dict[str, Any]) -> DistillLoss:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=DistillLoss)
    return parser.instantiate_classes(parser.parse_object({"loss": config})).loss


# ----------------------------------------------------------------------------------------------- RKD


def test_rkd_by_hand_on_collinear_points() -> None:
    s = torch.tensor([[0.0], [1.0], [3.0]])  # distances 1, 3, 2 -> mean 2 -> psi 0.5, 1.5, 1
    t = torch.tensor([[0.0], [1.0], [2.0]])  # distances 1, 2, 1 -> mean 4/3 -> psi 0.75, 1.5, 0.75
    # differences -0.25, 0, 0.25 on both orderings of each pair -> Huber 0.03125, 0, 0.03125 over 6 pairs
    expected_distance = 4 * 0.5 * 0.25**2 / 6
    # collinear points: every angle cosine is +-1 on both sides, identically ordered -> angle term 0
    assert RKDLoss("e", "e")(s, t, {}).item() == pytest.approx(expected_distance, abs=1e-6)


def test_rkd_matches_loop_formulation() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 7, generator=g) * 4
    loss = RKDLoss("e", "e", distance_weight=25.0, angle_weight=50.0)
    assert loss(s, t, {}).item() == pytest.approx(rkd_by_loops(s, t, 25.0, 50.0), rel=1e-4)


def test_rkd_invariances_and_gradients() -> None:
    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 4, generator=g)
    loss = RKDLoss("e", "e")
    assert loss(t.clone(), t, {}).item() == pytest.approx(0.0, abs=1e-6)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    assert loss(3.7 * t @ rotation + 1.0, t, {}).item() == pytest.approx(0.0, abs=1e-5)
    s = torch.randn(6, 3, generator=g)
    distance_only = RKDLoss("e", "e", angle_weight=0.0)
    assert distance_only(5.0 * s, t, {}).item() == pytest.approx(distance_only(s, t, {}).item(), rel=1e-5)
    assert loss(5.0 * s, t, {}).item() == pytest.approx(loss(s, t, {}).item(), rel=1e-5)
    assert_teacher_untouched(loss, s.requires_grad_(), t.requires_grad_())


# ----------------------------------------------------------------------------------------------- TRG


def trg_by_loops(s: Tensor, t: Tensor, tau: float) -> tuple[float, float, float]:
    """Node InfoNCE, edge KL and contextual MSE with explicit loops over tokens."""
    zs, zt = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    b, n, _ = zs.shape
    ns, nt = zs.reshape(b * n, -1), zt.reshape(b * n, -1)
    m = len(ns)
    node = 0.0
    for i in range(m):
        denom = sum(math.exp(float(ns[i] @ nt[j]) / tau) for j in range(m))
        node += -(float(ns[i] @ nt[i]) / tau - math.log(denom))
    edge = 0.0
    for i in range(m):
        others = [j for j in range(m) if j != i]
        es = [math.exp(float(ns[i] @ ns[j]) / tau) for j in others]
        et = [math.exp(float(nt[i] @ nt[j]) / tau) for j in others]
        ps, pt = [e / sum(es) for e in es], [e / sum(et) for e in et]
        edge += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    ctx = 0.0
    for k in range(b):
        for i in range(n):
            for j in range(n):
                ctx += (float(zs[k, i] @ zs[k, j]) - float(zt[k, i] @ zt[k, j])) ** 2
    return node / m, edge / m, ctx / (b * n * n)


def test_trg_matches_loop_formulation() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    node, edge, ctx = trg_by_loops(s, t, tau=0.5)
    loss = TRGLoss("tok", "tok", temperature=0.5, num_nodes=None, node_weight=1.0, edge_weight=2.0, context_weight=3.0)
    assert loss(s, t, {}).item() == pytest.approx(node + 2 * edge + 3 * ctx, rel=1e-4)


def test_trg_edges_and_context_vanish_for_identical_tokens() -> None:
    t = torch.randn(2, 5, 8)
    loss = TRGLoss("tok", "tok", node_weight=0.0)
    assert loss(t.clone(), t, {}).item() == pytest.approx(0.0, abs=1e-6)
    # the node term alone equals its InfoNCE floor, computed independently
    node_only = TRGLoss("tok", "tok", temperature=0.1, num_nodes=None, edge_weight=0.0, context_weight=0.0)
    z = F.normalize(t.flatten(0, 1), dim=-1)
    floor = F.cross_entropy(z @ z.t() / 0.1, torch.arange(10))
    assert node_only(t.clone(), t, {}).item() == pytest.approx(floor.item(), rel=1e-5)


def test_trg_projects_maps_and_keeps_teacher_out_of_the_graph() -> None:
    loss = TRGLoss("feat", "feat", student_dim=4, teacher_dim=6, num_nodes=8)
    s = torch.randn(2, 4, 4, 4, requires_grad=True)  # B x C x H x W, finer grid than the teacher's
    t = torch.randn(2, 6, 2, 2, requires_grad=True)
    assert_teacher_untouched(loss, s, t)
    assert loss.projector.weight.grad is not None
    with pytest.raises(ValueError, match="student_dim and teacher_dim"):
        TRGLoss("f", "f")(torch.randn(2, 3, 4), torch.randn(2, 3, 5), {})


# ----------------------------------------------------------------------------------------------- Margin-MSE, DSE


def test_margin_mse_by_hand_in_every_input_form() -> None:
    s = (torch.tensor([3.0, 1.0]), torch.tensor([1.0, 2.0]))  # margins 2, -1
    t = (torch.tensor([10.0, 0.0]), torch.tensor([9.0, 0.5]))  # margins 1, -0.5
    loss = MarginMSELoss(["pos", "neg"], ["pos", "neg"])
    assert loss(s, t, {}).item() == pytest.approx((1.0**2 + 0.5**2) / 2)
    assert loss(torch.stack(s, 1), torch.stack(t, 1), {}).item() == pytest.approx(0.625)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[3.0, 5.0], [7.0, 1.0]])  # dot scores 3, 1
    n = torch.tensor([[1.0, 9.0], [4.0, 2.0]])  # dot scores 1, 2
    assert loss((q, p, n), t, {}).item() == pytest.approx(0.625)


def test_margin_mse_zero_for_equal_margins_and_gradients() -> None:
    q, p, n = (torch.randn(4, 8, requires_grad=True) for _ in range(3))
    shift = torch.randn(4)
    s_pos, s_neg = (q * p).sum(-1), (q * n).sum(-1)
    t = ((s_pos + shift).detach(), (s_neg + shift).detach())  # other scale offset, same margins
    loss = MarginMSELoss(["q", "p", "n"], ["pos", "neg"])
    assert loss((q, p, n), t, {}).item() == pytest.approx(0.0, abs=1e-10)
    # several negatives per query: B x K x D negatives, B x K teacher scores
    negs = torch.randn(4, 3, 8)
    teacher = (torch.randn(4).requires_grad_(), torch.randn(4, 3).requires_grad_())
    assert_teacher_untouched(loss, (q, p, negs.requires_grad_()), teacher)


def test_dse_dot_head_by_hand_and_symmetry() -> None:
    u = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    v = torch.tensor([[3.0, 1.0], [2.0, -1.0]])  # dot products 5, -1
    t = torch.tensor([4.0, 1.0])  # squared errors 1, 4
    loss = DSELoss(["a", "b"], "pair", head="dot")
    assert loss((u, v), t, {}).item() == pytest.approx(2.5)
    assert loss((v, u), t, {}).item() == pytest.approx(2.5)
    cosine = DSELoss(["a", "b"], "pair", head="cosine")
    cos = [5 / math.sqrt(5 * 10), -1 / math.sqrt(1 * 5)]
    assert cosine((u, v), t, {}).item() == pytest.approx(((cos[0] - 4) ** 2 + (cos[1] - 1) ** 2) / 2, rel=1e-6)


def test_dse_concat_head_mixed_with_labels_by_hand() -> None:
    loss = DSELoss(["a", "b"], "pair", embed_dim=1, num_outputs=2, distill_coeff=0.25)
    head = cast(nn.Linear, cast(nn.Sequential, loss.head)[0])
    with torch.no_grad():  # z = W [u, v, uv, |u-v|]: row 0 reads u, row 1 reads |u - v|
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        head.bias.zero_()
    u, v = torch.tensor([[2.0]]), torch.tensor([[-1.0]])  # z^s = [2, 3]
    t = torch.tensor([[1.0, 1.0]])  # squared error sum 1 + 4 = 5
    ce = -(3 - math.log(math.exp(2) + math.exp(3)))  # label 1
    expected = 0.25 * 5 + 0.75 * ce
    assert loss((u, v), t, {"label": torch.tensor([1])}).item() == pytest.approx(expected, rel=1e-6)


def test_dse_gradients_reach_student_and_head_only() -> None:
    loss = DSELoss(["a", "b"], "pair", embed_dim=4, num_outputs=3, hidden_dims=[8])
    u, v = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    assert_teacher_untouched(loss, (u, v), torch.randn(5, 3, requires_grad=True))
    assert all(p.grad is not None for p in loss.head.parameters())


# ----------------------------------------------------------------------------------------------- TGeo-KD


def kd_by_hand(s: list[float], t: list[float]) -> float:
    ps = [math.exp(x) / sum(math.exp(y) for y in s) for x in s]
    pt = [math.exp(x) / sum(math.exp(y) for y in t) for x in t]
    return sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))


def test_tgeo_kd_fixed_ratio_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    ce = [-(1.0 - math.log(math.e + 1 + math.exp(-1))), -(2.0 - math.log(2 * math.exp(0.5) + math.exp(2)))]
    kd = [kd_by_hand(s[i].tolist(), t[i].tolist()) for i in range(2)]
    for ratio in (0.5, 0.2):
        loss = TGeoKDLoss("l", "l", num_classes=3, init_ratio=ratio)
        expected = sum(ratio * kd[i] + (1 - ratio) * ce[i] for i in range(2)) / 2
        assert loss(s, t, {"label": labels}).item() == pytest.approx(expected, rel=1e-6)


def test_tgeo_kd_features_class_means_and_gradient_routing() -> None:
    loss = TGeoKDLoss("l", "l", num_classes=2, momentum=0.5)
    s = torch.zeros(2, 2, requires_grad=True)  # S = [0.5, 0.5]
    t = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]], requires_grad=True)  # T = [.25,.75],[.75,.25]
    labels = torch.tensor([1, 1])
    out = loss(s, t, {"label": labels})
    assert torch.allclose(loss.class_mean[1], torch.tensor([0.5, 0.5]))  # first batch: the plain class mean
    features = loss.features(s, t, labels)[0].view(6, 2)
    expected = torch.tensor([[0.25, -0.25], [0.25, -0.25], [-0.5, 0.5], [0, 0], [0.25, -0.25], [0.5, -0.5]])
    assert torch.allclose(features, expected)  # S-T, T-G, G-S, Tbar-S, Tbar-T, Tbar-G
    out.backward()
    assert s.grad is not None and t.grad is None
    assert all(p.grad is None for p in loss.ratio_net.parameters())  # trained by the meta step only
    loss(s, t.detach(), {"label": torch.tensor([1, 0])})
    assert torch.allclose(loss.class_mean[1], torch.tensor([0.5, 0.5]) * 0.5 + torch.tensor([0.25, 0.75]) * 0.5)


def test_tgeo_meta_gradient_matches_unrolled_bilevel_derivative() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, generator=g, requires_grad=True)  # student: logits = x @ w
    train = {"x": torch.randn(6, 4, generator=g), "label": torch.randint(0, 3, (6,), generator=g)}
    meta = {"x": torch.randn(5, 4, generator=g), "label": torch.randint(0, 3, (5,), generator=g)}
    t_w = torch.randn(4, 3, generator=g)
    loss = TGeoKDLoss("l", "l", num_classes=3, temperature=2.0)
    eta = 1e-3
    # exact: d L_meta(w - eta grad_w L_in(alpha)) / d alpha_i, by autograd through the inner step
    alpha = torch.full((6,), 0.5, requires_grad=True)
    kd, ce = loss.terms(train["x"] @ w, train["x"] @ t_w, train["label"])
    inner = (alpha * kd + (1 - alpha) * ce).mean()
    (grad_w,) = torch.autograd.grad(inner, w, create_graph=True)
    outer = F.cross_entropy(meta["x"] @ (w - eta * grad_w), meta["label"])
    (exact,) = torch.autograd.grad(outer, alpha)
    # ours: surrogate -mean(alpha h) -> d/d alpha_i = -h_i / B, and d L / d alpha_i ~= -(eta / B) h_i
    captured: dict[str, Tensor] = {}
    loss.ratio = lambda f: captured.setdefault("alpha", torch.full((len(f),), 0.5, requires_grad=True))  # type: ignore
    optimizer = torch.optim.SGD(loss.ratio_net.parameters(), lr=0.0)
    before = w.detach().clone()
    tgeo_meta_step(loss, lambda b: b["x"] @ w, lambda b: b["x"] @ t_w, [w], train, meta, optimizer, eps=1e-2)
    grad = captured["alpha"].grad
    assert grad is not None
    ours = eta * grad
    assert torch.allclose(ours, exact, rtol=2e-2, atol=1e-7)
    assert torch.equal(w.detach(), before) and w.grad is None


def test_tgeo_meta_steps_trust_the_teacher_where_the_training_labels_are_wrong() -> None:
    torch.manual_seed(0)
    centers = torch.randn(3, 6) * 3

    def sample(n: int, noisy: bool) -> dict[str, Tensor]:  # noisy: class-0 samples are labelled 1
        truth = torch.arange(n) % 3
        label = torch.where(truth == 0, 1, truth) if noisy else truth
        return {"x": centers[truth] + torch.randn(n, 6), "label": label, "truth": truth}

    def teacher(b: dict[str, Tensor]) -> Tensor:  # a confident teacher that knows the true class
        return 6 * F.one_hot(b["truth"], 3).float()

    student = nn.Linear(6, 3)
    loss = TGeoKDLoss("l", "l", num_classes=3, hidden_dim=16)
    optimizer = torch.optim.Adam(loss.ratio_net.parameters(), lr=0.05)
    for _ in range(10):  # inner set: noisy training labels; meta set: clean held-out labels
        tgeo_meta_step(loss, lambda b: student(b["x"]), teacher, list(student.parameters()), sample(30, True),
                       sample(30, False), optimizer)
    probe = sample(30, True)
    alpha = loss.ratio(loss.features(student(probe["x"]), teacher(probe), probe["label"]))
    wrong = probe["truth"] != probe["label"]
    assert alpha[wrong].mean() > 0.9 and alpha[wrong].mean() > alpha[~wrong].mean() + 0.2


# ----------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("config", [
    {"class_path": "xmodal.losses.relations.RKDLoss", "init_args": {"student_key": "image.emb",
                                                                     "teacher_key": "image.emb", "angle_weight": 0}},
    {"class_path": "xmodal.losses.relations.TRGLoss",
     "init_args": {"student_key": "image.tokens", "teacher_key": "image.tokens", "student_dim": 8, "teacher_dim": 16}},
    {"class_path": "xmodal.losses.ranking.MarginMSELoss",
     "init_args": {"student_key": ["q.emb", "pos.emb", "neg.emb"], "teacher_key": ["pos.score", "neg.score"]}},
    {"class_path": "xmodal.losses.ranking.DSELoss",
     "init_args": {"student_key": ["a.emb", "b.emb"], "teacher_key": "pair.logits", "embed_dim": 8,
                   "num_outputs": 3, "hidden_dims": [16]}},
    {"class_path": "xmodal.losses.weighting.TGeoKDLoss",
     "init_args": {"student_key": "image.logits", "teacher_key": "image.logits", "num_classes": 10}},
])
def test_losses_build_from_config(config: dict[str, Any]) -> None:
    loss = build(config)
    assert type(loss).__name__ == config["class_path"].rsplit(".", 1)[-1]
    assert loss.student_key == config["init_args"]["student_key"]


def test_callbacks_build_from_config() -> None:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[L.Callback])
    mixup = {"class_path": "xmodal.losses.augment.MixupKD", "init_args": {"alpha": 0.2, "temperature": 4.0}}
    hard = {"class_path": "xmodal.losses.augment.HARDAugmenter", "init_args": {"strength": 0.3}}
    callbacks = parser.instantiate_classes(parser.parse_object({"callbacks": [
        {"class_path": "xmodal.callbacks.AugmentBatch", "init_args": {"transforms": [mixup], "mode": "one"}},
        {"class_path": "xmodal.callbacks.HARDCallback",
         "init_args": {"augmenter": hard, "student_key": "image.logits", "teacher_key": "image.logits"}},
        {"class_path": "xmodal.callbacks.TGeoKDMetaCallback", "init_args": {"lr": 1e-3}},
    ]})).callbacks
    assert [type(c).__name__ for c in callbacks] == ["AugmentBatch", "HARDCallback", "TGeoKDMetaCallback"]
    assert isinstance(callbacks[0].transforms[0], MixupKD) and callbacks[1].augmenter.strength == 0.3


# ----------------------------------------------------------------------------------------------- mixup / CutMix


def labelled_batch(n: int = 8) -> dict[str, Tensor]:
    """Image ``i`` is constant with value ``i``: mixed pixel values reveal the partner and ``lambda``."""
    labels = torch.arange(n)
    return {"image": labels.float()[:, None, None, None].expand(n, 3, 6, 6).clone(), "label": labels}


def test_mixup_mixes_images_and_labels_consistently() -> None:
    batch = MixupKD(alpha=0.4, num_classes=8, temperature=4.0, mixed_temperature=2.0, seed=0)(labelled_batch())
    lam, y, yb = batch["mix_lambda"], batch["label"].float(), batch["label_b"].float()
    assert batch["image"].shape == (8, 3, 6, 6) and lam.shape == (8,)
    assert ((lam > 0) & (lam <= 1)).all() and len(lam.unique()) == 1
    assert torch.allclose(batch["image"][:, 0, 0, 0], lam * y + (1 - lam) * yb, atol=1e-6)
    assert torch.allclose(batch["label_soft"].sum(1), torch.ones(8))
    assert torch.allclose(batch["label_soft"][torch.arange(8), batch["label_b"]].sum() +
                          batch["label_soft"][torch.arange(8), batch["label"]].sum(), torch.tensor(8.0) +
                          (batch["label"] == batch["label_b"]).float().sum())
    assert torch.equal(batch["kd_temperature"], torch.full((8,), 2.0))


def test_partial_mixup_alpha_zero_and_seeding() -> None:
    batch = MixupKD(alpha=1.0, fraction=0.5, temperature=4.0, mixed_temperature=2.0, seed=1)(labelled_batch())
    mixed = batch["kd_temperature"] == 2.0
    assert int(mixed.sum()) == 4 and (batch["mix_lambda"][~mixed] == 1).all()
    assert torch.equal(batch["image"][~mixed], labelled_batch()["image"][~mixed])
    still = MixupKD(alpha=0.0, seed=0)(labelled_batch())
    assert torch.equal(still["image"], labelled_batch()["image"]) and (still["mix_lambda"] == 1).all()
    again = [MixupKD(seed=5)(labelled_batch())["image"] for _ in range(2)]
    assert torch.equal(again[0], again[1])


def test_cutmix_lambda_is_the_kept_area() -> None:
    for seed in range(5):
        batch = CutMixKD(alpha=1.0, seed=seed)(labelled_batch())
        lam, y, yb = batch["mix_lambda"], batch["label"].float(), batch["label_b"].float()
        assert batch["image"].shape == (8, 3, 6, 6) and ((lam > 0) & (lam <= 1)).all()
        assert torch.allclose(batch["image"].mean((1, 2, 3)), lam * y + (1 - lam) * yb, atol=1e-5)
        pixels = batch["image"][:, 0]
        assert ((pixels == y[:, None, None]) | (pixels == yb[:, None, None])).all()
    logits = torch.randn(8, 8)
    expected = (lam * F.cross_entropy(logits, batch["label"], reduction="none") +
                (1 - lam) * F.cross_entropy(logits, batch["label_b"], reduction="none")).mean()
    assert mixed_cross_entropy(logits, batch).item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------- HARD


def _hard_disagreement_gain(seed: int) -> float:
    """Disagreement on the trained augmenter's warps over the clean disagreement, for one seeded problem."""
    torch.manual_seed(seed)
    images = torch.rand(16, 3, 16, 16)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(8, 5))
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5))
    teacher.requires_grad_(False)
    augmenter = HARDAugmenter(in_channels=3, strength=0.8)
    assert torch.allclose(augmenter(images), images, atol=1e-5)
    # A small step size: at lr 0.05 the first Adam step saturates the tanh and the augmenter stops learning.
    optimizer = torch.optim.Adam(augmenter.parameters(), lr=0.01)
    for _ in range(40):
        hard_update(augmenter, optimizer, images, teacher, student)
    assert all(p.grad is None for p in [*student.parameters(), *teacher.parameters()])
    with torch.no_grad():
        clean = disagreement(teacher(images), student(images))
        warped = torch.stack([disagreement(teacher(x), student(x)) for x in (augmenter(images) for _ in range(8))])
    return float(warped.mean() / clean)


def test_hard_augmenter_starts_as_identity_and_learns_to_make_models_disagree() -> None:
    # Measured on x86: gains 1.89, 1.02, 1.71, 1.80 for seeds 0-3. The bounds sit far from those values, so
    # platform numerics cannot flip them; a single seed can stall near 1.0, hence the mean over four.
    gains = [_hard_disagreement_gain(seed) for seed in range(4)]
    assert min(gains) > 0.9
    assert sum(gains) / len(gains) > 1.25


# ----------------------------------------------------------------------------------------------- callbacks in fit


class TinyNet(nn.Module):
    output_keys = ("image.logits",)

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(4 * width, 3))

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"image.logits": self.net(batch["image"])}

    def manifest(self) -> dict[str, Any]:
        return {"name": "tiny"}


def test_callbacks_run_inside_fit() -> None:
    torch.manual_seed(0)
    teacher = TinyNet(8).eval().requires_grad_(False)
    loss = TGeoKDLoss("image.logits", "image.logits", num_classes=3, hidden_dim=8)
    model = Distiller(TinyNet(4), [loss], teacher=teacher)
    batches = [{"image": torch.rand(6, 3, 8, 8), "label": torch.randint(0, 3, (6,))} for _ in range(4)]
    ratio_before = [p.clone() for p in loss.ratio_net.parameters()]
    augmenter = HARDAugmenter(in_channels=3, pool_size=4)
    callbacks = [AugmentBatch([MixupKD(seed=0), CutMixKD(seed=0)], mode="one", seed=0), TGeoKDMetaCallback(lr=0.1),
                 HARDCallback(augmenter, "image.logits", "image.logits", lr=0.1)]
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(cast(Any, batches), batch_size=None))
    assert any(not torch.equal(a, b) for a, b in zip(ratio_before, loss.ratio_net.parameters(), strict=True))
    assert not torch.equal(augmenter.head.weight, torch.zeros_like(augmenter.head.weight))
    assert {"train/tgeo_kd", "train/tgeo_kd_ratio", "train/hard_objective"} <= set(trainer.logged_metrics)

"""The features family (MSE, cosine, ND, OFA, CKA, masked/DMAE) against hand values and independent formulations."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonargparse
import numpy as np
import pytest
import torch
from torch import nn

from xmodal.contracts import DistillLoss
from xmodal.losses.cka import CKALoss, as_matrix, linear_cka
from xmodal.losses.features import FeatureCosineLoss, FeatureMSELoss, gather_tokens, pool_features, to_tokens
from xmodal.losses.masked import (
    MaskedFeatureLoss,
    partial_forward,
    patchify,
    random_patch_mask,
    reconstruction_loss,
    visible_mask,
)
from xmodal.losses.nd import NormDirectionLoss, class_means_from, load_class_means
from xmodal.losses.ofa import OFABranch, OFALoss, ofa_loss


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def grads_reach_student_only(loss: DistillLoss, s: Any, t: Any, batch: dict[str, Any]) -> None:
    """Backward through ``loss`` and check: student inputs and the loss's own parameters get gradients, the teacher's
    tensors none."""
    studs = [x for x in (s if isinstance(s, tuple) else (s,)) if x.is_floating_point()]
    teachers = list(t) if isinstance(t, tuple) else [t]
    for x in studs + teachers:
        x.requires_grad_(True)
    loss(s, t, batch).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in studs)
    assert all(x.grad is None for x in teachers)
    assert all(p.grad is not None for p in loss.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------- helpers


def test_feature_layout_helpers() -> None:
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    tokens = to_tokens(x)
    assert tokens.shape == (2, 4, 3)
    assert tokens[1, 2].tolist() == x[1, :, 1, 0].tolist()  # token 2 = row 1, column 0
    assert to_tokens(torch.zeros(2, 5)).shape == (2, 1, 5)
    assert torch.allclose(pool_features(x), x.mean(dim=(2, 3)))
    picked = gather_tokens(tokens, torch.tensor([[3, 0], [1, 1]]))
    assert picked[0, 0].tolist() == tokens[0, 3].tolist() and picked[1, 1].tolist() == tokens[1, 1].tolist()


def test_mse_and_cosine_are_zero_for_identical_features_and_grad_student_only() -> None:
    f = torch.randn(3, 4, 5)
    assert FeatureMSELoss("f", "f")(f, f.clone(), {}).item() == pytest.approx(0.0, abs=1e-7)
    assert FeatureCosineLoss("f", "f")(f, 2 * f, {}).item() == pytest.approx(0.0, abs=1e-6)
    mse = FeatureMSELoss("f", "f", student_dim=5, teacher_dim=6)
    grads_reach_student_only(mse, torch.randn(3, 5), torch.randn(3, 6), {})
    grads_reach_student_only(FeatureCosineLoss("f", "f"), torch.randn(3, 5), torch.randn(3, 5), {})


# ---------------------------------------------------------------------------------------------------- CKA


def hsic_cka_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from its definition: HSIC with linear kernels and the centering matrix H = I - 11^T / n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h)) / (n - 1) ** 2

    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


@pytest.mark.parametrize("widths", [(3, 2), (40, 50)])  # the feature form (p*q <= n^2) and the Gram form
def test_linear_cka_matches_hsic_definition(widths: tuple[int, int]) -> None:
    x, y = np.random.default_rng(0).normal(size=(6, widths[0])), np.random.default_rng(1).normal(size=(6, widths[1]))
    y[:, :2] += x[:, :2]  # some shared structure so the value is not near 0
    got = linear_cka(torch.from_numpy(x), torch.from_numpy(y)).item()
    assert got == pytest.approx(hsic_cka_numpy(x, y), abs=1e-10)


def test_linear_cka_by_hand() -> None:
    x = torch.tensor([[1.0], [-1.0], [0.0]])  # already centred
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # centred
    # Y^T X = [1, -1] -> ||.||_F^2 = 2; X^T X = 2; Y^T Y = [[2, 1], [1, 2]] -> ||.||_F = sqrt(10)
    assert linear_cka(x, y).item() == pytest.approx(2 / (2 * math.sqrt(10)), abs=1e-6)


def test_linear_cka_invariances() -> None:
    x = torch.randn(16, 8, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, x @ q).item() == pytest.approx(1.0, abs=1e-10)
    y = torch.randn(16, 5, dtype=torch.float64)
    base = linear_cka(x, y).item()
    assert linear_cka(x @ q * 7.5, y * 0.01).item() == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 3.0, y - 2.0).item() == pytest.approx(base, abs=1e-10)  # centring removes offsets
    assert linear_cka(torch.ones(4, 3), torch.randn(4, 2)).item() == pytest.approx(0.0, abs=1e-6)


def test_cka_loss_layouts_and_gradients() -> None:
    s, t = torch.randn(4, 6, 3, 3), torch.randn(4, 10, 7)  # CNN map vs ViT tokens: different widths and counts
    loss = CKALoss("s", "t")
    assert 0.0 <= loss(s, t, {}).item() <= 1.0
    assert loss(t, t.clone(), {}).item() == pytest.approx(0.0, abs=1e-6)
    assert as_matrix(s, "tokens").shape == (36, 6) and as_matrix(s, "pool").shape == (4, 6)
    pooled = CKALoss("s", "t", flatten="pool")(s, t, {})
    assert pooled.item() == pytest.approx(1 - linear_cka(s.mean(dim=(2, 3)), t.mean(dim=1)).item(), abs=1e-6)
    other = torch.randn(4, 10, 7)
    pair = CKALoss(["a", "b"], ["a", "b"])((s, t), (s.clone(), other), {})  # mean over pairs; the first is exact
    assert pair.item() == pytest.approx(loss(t, other, {}).item() / 2, abs=1e-6)
    grads_reach_student_only(CKALoss("s", "t"), torch.randn(4, 6, 3, 3), torch.randn(4, 10, 7), {})
    with pytest.raises(ValueError, match="flatten"):
        CKALoss("s", "t", flatten="rows")  # type: ignore[arg-type]


def test_linear_cka_ignores_autocast() -> None:
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cka(x, y)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(linear_cka(x, y).item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------------- ND


def nd_by_loop(s: torch.Tensor, t: torch.Tensor, means: torch.Tensor, labels: torch.Tensor) -> float:
    total = 0.0
    for fs, ft, y in zip(s, t, labels, strict=True):
        e = means[y] / means[y].norm()
        total += 1 - float(fs @ e) / max(float(fs.norm()), float(ft.norm()))
    return total / len(labels)


def test_nd_by_hand_with_fixed_class_means(tmp_path: Path) -> None:
    path = tmp_path / "means.json"
    path.write_text(json.dumps({"0": [0.0, 2.0], "1": [3.0, 0.0]}))  # the official code's format
    loss = NormDirectionLoss("s", "t", num_classes=2, teacher_dim=2, class_means_path=str(path))
    s = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    t = torch.tensor([[0.0, 10.0], [1.0, 0.0]])
    # sample 0: <s, (0,1)> = 4, max(5, 10) = 10 -> 0.6 (norm term: the student is shorter than the teacher)
    # sample 1: <s, (1,0)> = 6, max(10, 1) = 10 -> 0.4 (= 1 - cos: the student is longer)
    out = loss(s, t, {"label": torch.tensor([0, 1])})
    assert out.item() == pytest.approx(0.5, abs=1e-6)
    before = loss.class_means.clone()
    loss.train()(s, t, {"label": torch.tensor([0, 1])})
    assert torch.equal(loss.class_means, before)  # a file's means stay fixed


def test_nd_matches_loop_and_loads_tensor_files(tmp_path: Path) -> None:
    means = torch.randn(5, 4)
    torch.save(means, tmp_path / "m.pt")
    np.save(tmp_path / "m.npy", means.numpy())
    for name in ("m.pt", "m.npy"):
        loaded, present = load_class_means(tmp_path / name, 5, 4)
        assert torch.allclose(loaded, means) and bool(present.all())
    with pytest.raises(ValueError, match="expected"):
        load_class_means(tmp_path / "m.pt", 6, 4)
    loss = NormDirectionLoss("s", "t", 5, 4, student_dim=4, class_means_path=str(tmp_path / "m.pt"))
    s, t, y = torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 5, (8,))
    assert loss(s, t, {"label": y}).item() == pytest.approx(nd_by_loop(s, t, means, y), abs=1e-5)
    onehot = torch.nn.functional.one_hot(y, 5).float()  # soft/one-hot labels are reduced by argmax
    assert loss(s, t, {"label": onehot}).item() == pytest.approx(nd_by_loop(s, t, means, y), abs=1e-5)


def test_nd_buffer_accumulates_exact_class_means_only_in_training() -> None:
    loss = NormDirectionLoss("s", "t", num_classes=3, teacher_dim=2)
    assert "class_means" in dict(loss.named_buffers()) and "class_means" in loss.state_dict()
    t1, y1 = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 0, 1])
    t2, y2 = torch.tensor([[5.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    loss.eval()(torch.randn(3, 2), t1, {"label": y1})
    assert loss.class_counts.sum().item() == 0 and loss.class_means.abs().sum().item() == 0
    loss.train()
    loss(torch.randn(3, 2), t1, {"label": y1})
    loss(torch.randn(2, 2), t2, {"label": y2})
    expected = class_means_from(torch.cat([t1, t2]), torch.cat([y1, y2]), 3)  # [[3, 0], [0, 3], [0, 0]]
    assert torch.allclose(loss.class_means, expected)
    assert loss.class_counts.tolist() == [3, 2, 0]
    # class 2 never seen: its direction falls back to the teacher's own embedding -> 1 - cos(s, t) when |s| > |t|
    s, t = torch.tensor([[0.0, 4.0]]), torch.tensor([[2.0, 0.0]])
    assert loss.eval()(s, t, {"label": torch.tensor([2])}).item() == pytest.approx(1.0, abs=1e-6)


def test_nd_ema_momentum() -> None:
    loss = NormDirectionLoss("s", "t", num_classes=2, teacher_dim=1, momentum=0.5).train()
    loss(torch.randn(1, 1), torch.tensor([[4.0]]), {"label": torch.tensor([0])})
    loss(torch.randn(1, 1), torch.tensor([[2.0]]), {"label": torch.tensor([0])})
    assert loss.class_means[0].item() == pytest.approx(3.0)  # first batch initialises, then 0.5 * 4 + 0.5 * 2


def test_nd_gradients_and_errors() -> None:
    loss = NormDirectionLoss("s", "t", num_classes=3, teacher_dim=6, student_dim=4)
    grads_reach_student_only(loss, torch.randn(5, 4), torch.randn(5, 6), {"label": torch.tensor([0, 1, 2, 0, 1])})
    with pytest.raises(KeyError, match="label"):
        loss(torch.randn(2, 4), torch.randn(2, 6), {})
    with pytest.raises(ValueError, match="pooled"):
        loss(torch.randn(2, 3, 4), torch.randn(2, 6), {"label": torch.tensor([0, 1])})


# ---------------------------------------------------------------------------------------------------- OFA


def ofa_by_loop(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, gamma: float, temp: float,
                code: bool = False) -> float:
    total = 0.0
    for s_row, t_row, y in zip(zs.tolist(), zt.tolist(), labels.tolist(), strict=True):
        es, et = [math.exp(v / temp) for v in s_row], [math.exp(v / temp) for v in t_row]
        ps, pt = [v / sum(es) for v in es], [v / sum(et) for v in et]
        for c in range(len(ps)):
            if c == y:
                w = (1 + pt[c]) ** gamma - (1 if code else 0)
            else:
                w = pt[c] ** gamma if code else pt[c]
            total -= w * math.log(ps[c])
    return total / len(labels)


def test_ofa_loss_by_hand() -> None:
    zs = torch.tensor([[0.0, math.log(3.0)]])  # p_s = [1/4, 3/4]
    zt = torch.tensor([[0.0, 0.0]])  # p_t = [1/2, 1/2]
    # label 0, gamma 2: -(1.5^2) log(1/4) - 0.5 log(3/4)
    expected = -(1.5**2) * math.log(0.25) - 0.5 * math.log(0.75)
    assert ofa_loss(zs, zt, torch.tensor([0]), gamma=2.0).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("formulation", ["paper", "code"])
def test_ofa_loss_matches_loops(formulation: str) -> None:
    zs, zt, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 3, 4, 3])
    got = ofa_loss(zs, zt, y, gamma=1.5, temperature=2.0, formulation=formulation)  # type: ignore[arg-type]
    assert got.item() == pytest.approx(ofa_by_loop(zs, zt, y, 1.5, 2.0, code=formulation == "code"), abs=1e-5)


def test_ofa_gamma_one_is_cross_entropy_plus_soft_cross_entropy() -> None:
    zs, zt, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([1, 0, 2])
    soft_ce = -(zt.softmax(-1) * zs.log_softmax(-1)).sum(-1).mean()
    expected = torch.nn.functional.cross_entropy(zs, y) + soft_ce
    assert ofa_loss(zs, zt, y, gamma=1.0).item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize(
    ("kind", "shape"), [("map", (2, 8, 8, 8)), ("tokens", (2, 5, 12)), ("vector", (2, 12)), ("logits", (2, 7))]
)
def test_ofa_branches_map_every_layout_to_logits(kind: str, shape: tuple[int, ...]) -> None:
    branch = OFABranch(shape[1] if kind != "tokens" else shape[2], 7, kind, depth=2)  # type: ignore[arg-type]
    assert branch(torch.randn(*shape)).shape == (2, 7)
    with pytest.raises(ValueError, match="expects"):
        branch(torch.randn(2, 3, 4, 5, 6))


def test_ofa_loss_sums_branches_and_trains_them_only() -> None:
    loss = OFALoss(["s.map", "s.tokens", "s.logits"], "t.logits", num_classes=4, student_dims=[6, 8, 4],
                   kinds=["map", "tokens", "logits"], gamma=[1.0, 1.0, 1.5], temperature=2.0)
    s = (torch.randn(3, 6, 4, 4), torch.randn(3, 5, 8), torch.randn(3, 4))
    t, batch = torch.randn(3, 4), {"label": torch.tensor([0, 1, 3])}
    total = loss(s, t, batch)
    parts = [ofa_loss(b(f), t, batch["label"], g, 2.0) for b, f, g in zip(loss.branches, s, loss.gammas, strict=True)]
    assert total.item() == pytest.approx(sum(p.item() for p in parts), abs=1e-5)
    assert parts[2].item() == pytest.approx(ofa_by_loop(s[2], t, batch["label"], 1.5, 2.0), abs=1e-5)
    grads_reach_student_only(loss, s, t, batch)  # also the map/token branch parameters
    single = OFALoss("s.vec", "t.logits", num_classes=4, student_dims=8, kinds="vector")
    assert len(single.branches) == 1 and single.name == "ofa"
    with pytest.raises(ValueError, match="student keys"):
        OFALoss(["a", "b"], "t", num_classes=4, student_dims=[1, 2, 3])


# ---------------------------------------------------------------------------------------------------- masked / DMAE


def test_random_patch_mask_and_helpers() -> None:
    g = torch.Generator().manual_seed(3)
    idx = random_patch_mask(4, 196, 0.98, generator=g)
    assert idx.shape == (4, 4) and idx.dtype == torch.long  # the paper's "four visible patches"
    assert all(len(set(row)) == 4 and row == sorted(row) for row in idx.tolist())
    assert torch.equal(idx, random_patch_mask(4, 196, 0.98, generator=torch.Generator().manual_seed(3)))
    assert random_patch_mask(2, 10, 0.75).shape == (2, 2)
    with pytest.raises(ValueError):
        random_patch_mask(2, 10, 1.0)
    mask = visible_mask(torch.tensor([[0, 2]]), 4)
    assert mask.tolist() == [[True, False, True, False]]


def test_partial_forward_runs_only_the_first_blocks() -> None:
    blocks = nn.ModuleList(nn.Linear(1, 1, bias=True) for _ in range(3))
    for i, block in enumerate(blocks):
        nn.init.ones_(block.weight)
        nn.init.constant_(block.bias, float(10**i))
    x = torch.zeros(1, 1)
    assert partial_forward(blocks, x, 2).item() == 11.0  # 0 + 1 + 10
    assert partial_forward(blocks, x, 0).item() == 0.0
    with pytest.raises(ValueError):
        partial_forward(blocks, x, 4)


def test_patchify_by_hand() -> None:
    img = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)  # C=2, 4x4, patches of 2
    patches = patchify(img, 2)
    assert patches.shape == (1, 4, 8)
    expected = [img[0, c, i, j].item() for i in (0, 1) for j in (2, 3) for c in (0, 1)]  # patch 1: top-right, (p,q,c)
    assert patches[0, 1].tolist() == expected


def test_masked_feature_loss_by_hand() -> None:
    loss = MaskedFeatureLoss(["s.tokens", "s.visible_index"], "t.tokens", num_prefix_tokens=1)
    teacher = torch.tensor([[[9.0], [0.0], [1.0], [2.0], [3.0]]])  # cls + 4 patches
    index = torch.tensor([[1, 3]])
    student = torch.tensor([[[8.0], [1.0], [5.0]]])  # cls, patch 1, patch 3 -> errors 1, 0, 2
    assert loss((student, index), teacher, {}).item() == pytest.approx((1 + 0 + 4) / 3)
    same = torch.cat([teacher[:, :1], gather_tokens(teacher[:, 1:], index)], dim=1)
    assert loss((same.clone(), index), teacher, {}).item() == pytest.approx(0.0)
    visible_only = MaskedFeatureLoss(["s.tokens", "s.visible_index"], "t.tokens", num_prefix_tokens=1,
                                     teacher_visible_only=True, beta=2.0, criterion="l1")
    assert visible_only((student, index), same, {}).item() == pytest.approx(2 * (1 + 0 + 2) / 3)


def test_masked_feature_loss_with_reconstruction() -> None:
    images = torch.rand(2, 3, 4, 4)
    index = torch.tensor([[0], [3]])
    target = patchify(images, 2)
    recon = target + 1.0  # error 1 everywhere
    recon[0, 1] = target[0, 1] + 3.0  # a masked patch of sample 0: error 9
    recon[1, 3] = target[1, 3] + 100.0  # visible: ignored
    expected_pixels = (9 + 1 + 1 + 1 + 1 + 1) / 6  # 3 masked patches per sample
    assert reconstruction_loss(recon, target, index).item() == pytest.approx(expected_pixels, abs=1e-5)
    loss = MaskedFeatureLoss(["t", "i", "r"], "t", patch_size=2, recon_weight=0.5)
    tokens = torch.randn(2, 1, 3)
    full = torch.randn(2, 4, 3)
    full[0, 0], full[1, 3] = tokens[0, 0], tokens[1, 0]  # the student matches the teacher on visible tokens
    uint8 = (images * 255).round().to(torch.uint8)  # the pixel target accepts raw uint8 batches
    pixels = patchify(uint8.float() / 255, 2)
    out = loss((tokens, index, pixels + 1.0), full, {"image": uint8})
    assert out.item() == pytest.approx(0.5 * 1.0, abs=1e-5)
    with pytest.raises(ValueError, match="patch_size"):
        MaskedFeatureLoss(["t", "i", "r"], "t")


def test_masked_feature_loss_projects_and_grads_student_only() -> None:
    loss = MaskedFeatureLoss(["s.tokens", "s.visible_index"], "t.tokens", student_dim=4, teacher_dim=6,
                             num_prefix_tokens=1, normalize=True)
    index = random_patch_mask(2, 8, 0.5)
    grads_reach_student_only(loss, (torch.randn(2, 5, 4), index), torch.randn(2, 9, 6), {})
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        MaskedFeatureLoss(["s", "i"], "t")((torch.randn(2, 3, 4), index), torch.randn(2, 8, 4), {})


# ---------------------------------------------------------------------------------------------------- configs


CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("features.FeatureMSELoss", {"student_key": "a", "teacher_key": "a", "student_dim": 3, "teacher_dim": 4}),
    ("features.FeatureCosineLoss", {"student_key": "a", "teacher_key": "a"}),
    ("nd.NormDirectionLoss", {"student_key": "s", "teacher_key": "t", "num_classes": 3, "teacher_dim": 4,
                              "student_dim": 2, "momentum": 0.9}),
    ("ofa.OFALoss", {"student_key": ["s.map", "s.tok"], "teacher_key": "t.logits", "num_classes": 5,
                     "student_dims": [4, 8], "kinds": ["map", "tokens"], "gamma": 1.5, "formulation": "code"}),
    ("cka.CKALoss", {"student_key": "s", "teacher_key": "t", "flatten": "pool", "weight": 0.5}),
    ("masked.MaskedFeatureLoss", {"student_key": ["s.tokens", "s.visible_index"], "teacher_key": "t.tokens",
                                  "student_dim": 4, "teacher_dim": 8, "num_prefix_tokens": 1}),
]


@pytest.mark.parametrize(("path", "init_args"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_loss_builds_from_a_config(path: str, init_args: dict[str, Any]) -> None:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=DistillLoss)
    cfg = parser.parse_object({"loss": {"class_path": f"xmodal.losses.{path}", "init_args": init_args}})
    loss = parser.instantiate_classes(cfg).loss
    assert isinstance(loss, DistillLoss)
    assert type(loss).__name__ == path.split(".")[1]
    assert loss.weight == init_args.get("weight", 1.0)

